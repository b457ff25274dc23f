"""The study: a validated, resumable sweep whose outputs state their settings
and put the answer first; figures that render for any outcome."""

from __future__ import annotations

import json
import math

import pandas as pd
import pyarrow.parquet as pq
import pytest

import qsengine
from qsengine import study as S
from qsengine.study import StudyConfig, format_summary, format_table, parse_tokens, run_study
from qsengine.study.figures import _plot_ratio

SMALL = dict(models=("qwen3-30b-a3b",), clusters=("8xh100",), microbatches=0, twins=("same",))


def _cfg(tmp_path, **kw) -> StudyConfig:
    return StudyConfig(**{**SMALL, "out": tmp_path / "out", **kw})


# ---------------------------------------------------------------- inputs
@pytest.mark.parametrize("text, n", [("128K", 131072), ("128k", 131072), ("4096", 4096), (4096, 4096),
                                     ("1M", 1048576), ("32_768", 32768), (" 8K ", 8192), ("1.5K", 1536)])
def test_parse_tokens(text, n):
    assert parse_tokens(text) == n


@pytest.mark.parametrize("text", ["0", "0K", "-4K", "12Q", "", "1.1K", "K", True])
def test_parse_tokens_refuses(text):
    with pytest.raises((ValueError, TypeError), match="context"):
        parse_tokens(text)


def test_format_tokens_round_trip():
    for n in (512, 4096, 131072, 1048576, 999999999):
        assert parse_tokens(S.format_tokens(n).replace(",", "")) == n


def test_whole_study_is_validated_before_any_work(tmp_path):
    cfg = _cfg(tmp_path, clusters=("8xh100", "8xH2000"), contexts=(4096, 8192, 16384))
    with pytest.raises(ValueError, match="8xH2000"):
        run_study(cfg, figures=False)
    assert not (tmp_path / "out").exists()  # nothing computed, nothing written


@pytest.mark.parametrize("kw, match", [
    (dict(q=0), "field 'q' = 0: must be a finite number > 0"), (dict(q=-1.0), "field 'q' = -1.0"),
    (dict(slo_tpot=0), "field 'slo_tpot' = 0"), (dict(slo_tpot=0.0), "slo_tpot"),
    (dict(microbatches=-1), "field 'microbatches' = -1"), (dict(routing="zipf"), "field 'routing' = 'zipf'"),
    (dict(q=None), "field 'q' = None"),
    (dict(models=("llama-3.1-70b",)), "is dense"), (dict(contexts=("12Q",)), "12Q"),
    (dict(beyond_max_context="drop"), "beyond_max_context"), (dict(tie=1.5), "tie"),
    (dict(context_dist="gauss"), "field 'context_dist' = 'gauss'"), (dict(serving="tgi"), "field 'serving' = 'tgi'"),
    (dict(draft_tokens=-1), "field 'draft_tokens' = -1"), (dict(acceptance=1.5), "field 'acceptance' = 1.5"),
    (dict(output=-5), "field 'output' = -5"),
])
def test_bad_inputs_named(tmp_path, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        run_study(_cfg(tmp_path, **kw), figures=False)


# ---------------------------------------------------------------- defaults and settings
def test_study_uses_each_models_deployed_precision(tmp_path):
    df = run_study(_cfg(tmp_path, models=("qwen3-30b-a3b", "deepseek-v3"), contexts=(8192,)), figures=False)
    got = dict(zip(df["model"], df["precision"]))
    assert got == {m: qsengine.default_precision(m).name for m in ("qwen3-30b-a3b", "deepseek-v3")}
    assert got["deepseek-v3"] == "fp8" and got["qwen3-30b-a3b"] == "bf16"
    # and that is what ran: the sweep's input column
    assert list(df["in_precision"]) == list(df["precision"])


SETTINGS = ["precision", "routing", "twin", "workload", "slo_tpot_ms", "microbatches", "seed", "qsengine_version",
            "qsengine_code"]


def test_run_settings_recorded_everywhere(tmp_path):
    cfg = _cfg(tmp_path, contexts=(4096, 16384), slo_tpot=0.05, seed=7)
    df = run_study(cfg, figures=False)
    out = tmp_path / "out"
    csv = pd.read_csv(out / "results.csv")
    for col in SETTINGS:
        assert col in csv.columns, col
    assert set(csv["precision"]) == {"bf16"} and set(csv["seed"]) == {7}
    assert set(csv["slo_tpot_ms"]) == {50.0} and set(csv["qsengine_version"]) == {qsengine.__version__}
    assert set(csv["qsengine_code"]) == {qsengine.code_fingerprint()}
    table = pq.read_table(out / "results.parquet")
    meta = json.loads(table.schema.metadata[b"qsengine.study"])
    assert meta["seed"] == 7 and meta["slo_tpot_ms"] == 50.0 and meta["routing"] == "uniform"
    assert meta["precision"] == {"qwen3-30b-a3b": "bf16"} and meta["qsengine_version"] == qsengine.__version__
    assert meta["qsengine_code"] == qsengine.code_fingerprint()
    for col in SETTINGS:
        assert col in table.column_names
    summary = (out / "summary.md").read_text()
    for text in ("precision: qwen3-30b-a3b bf16", "routing: uniform", "twin: q = sqrt", "workload:",
                 "both sides at p99 ≤ 50.0 ms per token", "seed: 7",
                 f"qsengine {qsengine.__version__} (code {qsengine.code_fingerprint()})"):
        assert text in summary, text
    assert format_summary(df).splitlines()[0].startswith("qsengine study")


def test_workload_serving_and_speculation_reach_every_point(tmp_path):
    """The study's workload, serving-engine and speculative-decoding options are
    the points' own fields: each row equals ``simulate`` at those fields, and
    the settings say what ran (columns, parquet metadata, summary)."""
    opts = dict(output=1024, prefill="colocated", context_dist="uniform:0.5", output_dist="exponential",
                serving="vllm", draft_tokens=1, acceptance=0.8)
    cfg = _cfg(tmp_path, contexts=(4096,), slo_tpot=None, **opts)
    df = run_study(cfg, figures=False)
    row = df.iloc[0]
    want = qsengine.simulate(model="qwen3-30b-a3b", cluster="8xh100", context=4096, microbatches=0, slo_tpot=None,
                             q="sqrt", precision="bf16", seed=cfg.seed, **opts).to_record()
    for k in ("ratio", "moe_tokens_per_s", "dense_tokens_per_s", "moe_plan", "dense_batch", "ratio_basis"):
        assert row[k] == want[k], k
    assert row["serving"] == "vllm" and row["draft_tokens"] == 1 and row["acceptance"] == 0.8
    assert row["workload"] == "requests: context in, 1K out, prefill colocated (prompt uniform:0.5, output exponential)"
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "serving engine: vllm; speculative decoding: 1 draft token(s) per step at acceptance 0.8" in summary
    assert "lengths: prompt uniform:0.5, output exponential" in summary
    # the defaults leave the points as before (no extra fields, same checkpoint key as a config without them)
    plain = S.config._validate(_cfg(tmp_path, contexts=(4096,)))
    assert all(set(p) & {"output", "serving", "draft_tokens", "context_dist"} == set() for p in plain.points)


# ---------------------------------------------------------------- answer first
def test_summary_has_one_verdict_line_per_model_and_cluster(tmp_path):
    df = run_study(_cfg(tmp_path, models=("qwen3-30b-a3b", "deepseek-v3"), clusters=("8xh100", "8xh200"),
                        contexts=(4096, 131072)), figures=False)
    lines = S.verdict_lines(df)
    assert [(m, c) for m, c, _ in lines] == [(m, c) for m in ("qwen3-30b-a3b", "deepseek-v3")
                                             for c in ("8×H100", "8×H200")]
    text = format_summary(df)
    for _, c, t in lines:
        assert t in text
    # DeepSeek-V3 does not fit 8xH100 at fp8: the line names the total shortfall
    ds = dict(((m, c), t) for m, c, t in lines)[("deepseek-v3", "8×H100")]
    assert ds.startswith("4K–128K: dense twin only") and "in total exceed" in ds


def test_both_twin_shapes_reported_and_share_the_moes_monte_carlo(tmp_path):
    """The default study compares every MoE point with both twin shapes; the
    two rows of one MoE point share its Monte Carlo (same MoE numbers)."""
    assert StudyConfig().twins == ("same", "gqa")
    df = run_study(_cfg(tmp_path, twins=("same", "gqa"), contexts=(8192,), clusters=("8xh200",),
                        microbatches=200), figures=False)
    assert list(df["twin_shape"]) == ["same", "gqa"]
    assert df["dense_model"].iloc[1].endswith("-gqa") and df["dense_shape"].iloc[0] != df["dense_shape"].iloc[1]
    for col in ("moe_tokens_per_s", "moe_tpot_p99_ms", "mc_microbatches"):
        assert df[col].iloc[0] == df[col].iloc[1]
    text = format_summary(df)
    assert "vs twin qwen3-30b-a3b-dense-q" in text and "(gqa: L" in text and "(same: L" in text
    with pytest.raises(ValueError, match="twins="):
        run_study(_cfg(tmp_path, twins=("same", "same")), figures=False)
    with pytest.raises(ValueError, match="twins="):
        run_study(_cfg(tmp_path, twins=("wide",)), figures=False)


def test_near_ties_are_ties():
    r = [1.0 + 0.5 * S.DEFAULT_TIE, 1.0 - 0.5 * S.DEFAULT_TIE, 0.986, 1.3, 0.7, 1.05, math.nan]
    v = ["dense", "moe", "moe", "dense", "moe", "dense", "dense-only"]
    got, band = S.tie_aware_verdict(r, v, [0, 0, 0, 0, 0, 0.03, 0])
    assert list(got) == ["tie", "tie", "tie", "dense", "moe", "tie", "dense-only"]  # 1.05 is within 2 SE (6%)
    assert list(band) == [S.DEFAULT_TIE] * 5 + [0.06, S.DEFAULT_TIE]


def test_monte_carlo_uncertainty_widens_the_tie_band(tmp_path):
    cfg = _cfg(tmp_path, contexts=(4096,), microbatches=20)
    df = run_study(cfg, figures=False)
    rel = float(df["ratio_rel_err"].iloc[0])
    spread = (df["moe_tpot_p99_ms"] - df["moe_tpot_ms"]).abs().iloc[0] / df["moe_tpot_ms"].iloc[0]
    assert rel == pytest.approx(spread / 2.326 / math.sqrt(20))
    assert float(df["tie_band"].iloc[0]) == pytest.approx(max(S.DEFAULT_TIE, 2 * rel))
    closed = run_study(_cfg(tmp_path / "c", contexts=(4096,)), figures=False)
    assert float(closed["ratio_rel_err"].iloc[0]) == 0.0  # the closed form has no sampling error


def test_table_columns_and_number_formats(tmp_path):
    df = run_study(_cfg(tmp_path, clusters=("8xh100", "32xh100"), contexts=(4096, 131072)), figures=False)
    text = format_table(df)
    head = text.splitlines()[0]
    for col in ("MoE TPOT ms", "MoE p99 ms", "MoE tok/s/user", "dense TPOT ms", "dense p99 ms", "dense tok/s/user"):
        assert col in head
    assert "e+" not in text and "e-" not in text  # no exponents
    assert "32×H100" in text and "8×H100" in text and "xh100" not in text  # canonical names
    assert "128K" in text and "131072" not in text
    assert (df["moe_tokens_per_s_per_user"] * df["moe_tpot_ms"]).round(6).eq(1000.0).all()


# ---------------------------------------------------------------- max context
def test_beyond_max_context_flagged_or_skipped(tmp_path):
    cfg = _cfg(tmp_path, models=("grok-1",), contexts=(4096, 8192, 16384))  # Grok-1: 8K
    df = run_study(cfg, figures=False)
    assert list(df["beyond_max_context"]) == [False, False, True]
    assert "⚠ beyond max context 8K" in format_summary(df) and "grok-1 > 8K" in format_summary(df)
    assert "16K⚠" in format_table(df)
    df2 = run_study(_cfg(tmp_path / "skip", models=("grok-1",), contexts=(4096, 8192, 16384),
                         beyond_max_context="skip"), figures=False)
    assert list(df2["context"]) == [4096, 8192]
    assert "Skipped (beyond max context): grok-1 16K (max 8K)" in format_summary(df2)


# ---------------------------------------------------------------- resume
def test_resume_after_interrupt_equals_uninterrupted(tmp_path, monkeypatch):
    import qsengine.sweeps.run as sw

    kw = dict(models=("qwen3-30b-a3b",), clusters=("8xh100", "8xh200"), contexts=(4096, 8192, 16384, 32768,
                                                                                   65536, 131072),
              microbatches=10, twins=("same",))
    whole = run_study(StudyConfig(**kw, out=tmp_path / "a"), figures=False)

    real = sw.simulate_point
    calls = {"n": 0}

    def stop_after_9(kwargs, seed, threads):  # a Ctrl-C in the second chunk (Monte Carlo chunks hold 8)
        if calls["n"] >= 9:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(kwargs, seed, threads)

    monkeypatch.setattr(sw, "simulate_point", stop_after_9)
    cfg = StudyConfig(**kw, out=tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        run_study(cfg, figures=False)
    monkeypatch.setattr(sw, "simulate_point", real)
    resumed = run_study(cfg, figures=False)
    assert resumed.attrs["resumed_points"] == 8 and resumed.attrs["computed_points"] == 4
    pd.testing.assert_frame_equal(resumed, whole)


def test_checkpoint_is_per_grid(tmp_path):
    a = S.checkpoint_dir(_cfg(tmp_path, contexts=(4096,)))
    b = S.checkpoint_dir(_cfg(tmp_path, contexts=(8192,)))
    assert a != b and a.parent == b.parent == tmp_path / "out" / "checkpoint"
    assert a == S.checkpoint_dir(_cfg(tmp_path, contexts=("4K",)))


# ---------------------------------------------------------------- figures
FIGS = ("ratio_vs_context.png", "hbm_per_gpu.png", "fragmentation.png", "frontier.png", "why.png")


@pytest.mark.parametrize("name, kw", [
    ("one point", dict(contexts=(8192,))),
    ("all infeasible", dict(contexts=(999_999_999,))),
    ("some infeasible", dict(contexts=(4096, 999_999_999))),
    ("twenty contexts", dict(contexts=tuple(4096 * (i + 1) for i in range(20)), clusters=("8xh100", "8xh200"))),
])
def test_every_figure_renders(tmp_path, name, kw):
    df = run_study(_cfg(tmp_path, twins=("same", "gqa"), **kw), figures=True)
    for f in FIGS:
        p = tmp_path / "out" / f
        assert p.is_file() and p.stat().st_size > 5000, (name, f)
    assert (tmp_path / "out" / "summary.md").is_file() and len(df) == len(kw["contexts"]) * len(
        kw.get("clusters", SMALL["clusters"])) * 2


def test_ratio_figure_marks_infeasible_outside_the_data(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = run_study(_cfg(tmp_path, models=("deepseek-v3",), clusters=("8xh100", "8xh200"),
                        contexts=(4096, 131072)), figures=False)
    captured = {}
    orig = plt.Figure.savefig

    def keep(fig, *a, **k):
        captured["fig"] = fig
        return orig(fig, *a, **k)

    plt.Figure.savefig = keep
    try:
        _plot_ratio(df, tmp_path / "r.png")
    finally:
        plt.Figure.savefig = orig
    fig = captured["fig"]
    ax = fig.axes[0]
    ratios = df["ratio"].dropna().astype(float)
    marks = [c for c in ax.collections if c.get_offsets().shape[0] and type(c).__name__ == "PathCollection"]
    ys = [float(y) for c in marks for _, y in c.get_offsets()]
    assert ys and max(ys) < ratios.min()  # every "does not fit" marker sits below every ratio drawn
    texts = [t.get_text() for t in ax.texts]
    assert any("dense twin serves more" in t for t in texts) and any("MoE serves more" in t for t in texts)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["4K", "128K"]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "only the dense twin fits" in legend


def test_hf_config_and_cluster_files_work(tmp_path):
    from pathlib import Path

    hf = Path(__file__).parent / "data" / "hf" / "mixtral-8x7b.json"
    cl = tmp_path / "four.toml"
    cl.write_text('name = "4xh200-test"\naccelerator = "H200"\nnum_gpus = 4\n')
    df = run_study(_cfg(tmp_path, models=(str(hf),), clusters=(str(cl), "12x MI300X"), contexts=("8K",)),
                   figures=True)
    assert list(df["cluster_name"]) == ["4×H200", "12×MI300X"]
    assert df["model"].iloc[0] == "mixtral-8x7b-v0.1" and set(df["precision"]) == {"bf16"}
