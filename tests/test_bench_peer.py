"""The pure helpers of benchmarks/bench_peer.py (piece matching, ratios, report),
with a fake peer result: no aiconfigurator needed."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import sys
from pathlib import Path

import pytest

from qsengine import Plan, as_accelerator, as_model, as_precision
from qsengine.decode.step import decode_step

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_peer.py"
_spec = importlib.util.spec_from_file_location("bench_peer", _PATH)
assert _spec is not None and _spec.loader is not None
bp = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("bench_peer", bp)  # dataclasses look their module up there
_spec.loader.exec_module(bp)

#: Generation op names of aiconfigurator-core 0.12 (llama.py, deepseek.py, moe.py) and their piece.
PEER_NAMES = {
    "generation_embedding": "other",
    "generation_add_norm_1": "other",
    "generation_add_norm_2": "other",
    "generation_act_gate": "other",
    "generation_shared_act_gate": "other",
    "generation_qkv_gemm": "attention",
    "generation_attention": "attention",
    "generation_proj_gemm": "attention",
    "generation_downscale_gemm": "attention",
    "generation_q_b_proj_gemm": "attention",
    "generation_bmm_pre": "attention",
    "generation_bmm_post": "attention",
    "generation_mla_block": "attention",
    "generation_gate_ffn1_gemm": "dense ffn",
    "generation_ffn2_gemm": "dense ffn",
    "generation_router_gemm": "router + shared",
    "generation_shared_gate_up_gemm": "router + shared",
    "generation_shared_ffn2_gemm": "router + shared",
    "generation_moe": "routed experts",
    "generation_moe_pre_dispatch": "communication",
    "generation_moe_post_dispatch": "communication",
    "generation_ar_1": "communication",
    "generation_ar_2": "communication",
    "generation_embedding_ar": "communication",
    "generation_tp_allreduce": "communication",
    "generation_p2p": "communication",
    "generation_logits_gemm": "lm head",
}


@pytest.mark.parametrize("name,cat", sorted(PEER_NAMES.items()))
def test_peer_op_names_map_to_their_piece(name: str, cat: str) -> None:
    assert bp.peer_category(name) == cat


@pytest.mark.parametrize("model,plan", [("deepseek-v3", Plan(tp=8, ep=8)), ("qwen3-235b-a22b", Plan(tp=4, ep=2)),
                                        ("llama-3.1-70b", Plan(tp=4, pp=2)), ("gpt-oss-120b", Plan(tp=2))])
def test_every_qsengine_piece_is_matched(model: str, plan: Plan) -> None:
    """A piece renamed or added in step.py must get a category here (else it would hide in 'other')."""
    br = decode_step(as_model(model), as_precision("fp8"), as_accelerator("h200-sxm"), plan, 16, 4096)
    for p in br.pieces:
        assert p.name in bp.QS_PIECES, p.name
    cats = bp.by_category([(p.name, p.time) for p in br.pieces], bp.qs_category)
    assert set(cats) == set(bp.CATEGORIES)
    assert math.isclose(sum(cats.values()), sum(p.time for p in br.pieces), rel_tol=1e-12)
    assert cats["other"] == 0.0


def _row(qs_attn: float, peer_attn: float, qs_t: float, peer_t: float) -> object:
    qs = dict.fromkeys(bp.CATEGORIES, 0.0) | {"attention": qs_attn, "lm head": 1.0}
    peer = dict.fromkeys(bp.CATEGORIES, 0.0) | {"attention": peer_attn, "lm head": 2.0, "other": 0.5}
    return bp.Row("fake", 8, 1024, qs_t, peer_t, peer_t * 1.1, qs, peer, sum(peer.values()))


def test_ratios_and_summary_with_a_fake_peer() -> None:
    rows = [_row(1.0, 4.0, 2.0, 4.0), _row(3.0, 3.0, 6.0, 4.0), _row(2.0, 1.0, 5.0, 5.0)]
    assert rows[0].ratio == 0.5
    r = rows[0].ratios
    assert r["attention"] == 0.25 and r["lm head"] == 0.5
    assert math.isnan(r["other"]) and math.isnan(r["routed experts"])  # a piece one side lacks: no ratio
    s = bp.summarize(rows)
    assert s["end-to-end"] == 1.0 and s["attention"] == 1.0 and s["lm head"] == 0.5
    assert math.isnan(s["dense ffn"])
    text = "\n".join(bp.report(rows, ["a note"], ["header"]))
    assert "ALL (median over every point)" in text and "a note" in text and text.startswith("header")


def test_script_skips_cleanly_without_the_peer(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path) -> None:
    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(bp.importlib.metadata, "version", missing)
    out = tmp_path / "r.txt"
    assert bp.main(["--out", str(out)]) == 0
    assert "skipped: aiconfigurator-core is not installed" in capsys.readouterr().out
    assert not out.exists()


@pytest.mark.parametrize("cfg", bp.CONFIGS, ids=lambda c: c.label)
def test_qsengine_side_of_every_configuration(cfg: object) -> None:
    """Each configuration's qsengine plan is valid on its cluster and every piece is matched."""
    t, cats, raw = bp.qs_step(cfg, cfg.batches[0], bp.ISLS[0])
    assert t > 0 and cats["other"] == 0.0
    assert math.isclose(sum(cats.values()), sum(x for _, x in raw), rel_tol=1e-12)
    assert cfg.batches[0] % cfg.adp == 0  # AIConfigurator's per-rank batch is whole
