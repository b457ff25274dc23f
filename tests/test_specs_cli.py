"""``qsengine list`` and ``qsengine show``."""

from __future__ import annotations

from pathlib import Path

from qsengine.cli import main


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_list_models(capsys):
    rc, out, _ = run(capsys, "list", "models")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["model", "layers", "hidden"]
    row = next(line for line in lines if line.startswith("deepseek-v3 "))
    assert "671.03B" in row and "70,272" in row and "256/8+1" in row and "mla" in row
    assert len(lines) == 2 + 17


def test_list_accelerators_and_clusters(capsys):
    rc, out, _ = run(capsys, "list", "accelerators")
    assert rc == 0
    row = next(line for line in out.splitlines() if line.startswith("h200-sxm "))
    assert row.split()[1:4] == ["141", "4.8", "989.4"]
    rc, out, _ = run(capsys, "list", "clusters")
    assert rc == 0
    row = next(line for line in out.splitlines() if line.startswith("72xgb200 "))
    assert row.split()[1:4] == ["gb200", "72", "18"]
    rc, out, _ = run(capsys, "list", "precisions")
    assert "mxfp4-experts" in out


def test_show_model(capsys):
    rc, out, _ = run(capsys, "show", "DeepSeek-V3")
    assert rc == 0
    assert "DeepSeek-V3 (671B) (deepseek-v3)" in out
    for component in ("attention", "dense_ffn", "routed_experts", "shared_experts", "router", "lm_head"):
        assert any(line.startswith(component + " ") for line in out.splitlines())
    assert "s (active/total) 0.0546" in out
    assert "70,272" in out and "1,152" in out
    for p in ("bf16", "fp8", "fp4"):
        assert any(line.startswith(p + " ") for line in out.splitlines())
    # an MLA cache also as FlashMLA's fp8 layout stores it (512 + 4*4 + 64*2 = 656 B per layer)
    assert "fp8 FlashMLA bytes" in out
    assert any(line.startswith("per token per layer") and line.split()[-1] == "656" for line in out.splitlines())
    assert any(line.startswith("per token (all decode layers)") and line.split()[-1] == "40,016"
               for line in out.splitlines())
    _, gqa, _ = run(capsys, "show", "llama-3.1-70b")
    assert "FlashMLA" not in gqa  # the layout stores MLA caches only


def test_show_windowed_model(capsys):
    rc, out, _ = run(capsys, "show", "gpt-oss-120b")
    assert rc == 0
    assert "18 sliding layers of 128 tokens" in out
    assert any(line.startswith("per token beyond windows") and "36,864" in line for line in out.splitlines())


def test_show_accelerator_and_cluster(capsys):
    rc, out, _ = run(capsys, "show", "H200")
    assert rc == 0 and "NVIDIA H200 SXM 141GB (h200-sxm)" in out and "141 GB" in out
    rc, out, _ = run(capsys, "show", "8xH200")
    assert rc == 0 and "cluster 8xh200" in out and "1,128 GB" in out
    rc, out, _ = run(capsys, "show", "24xh100")
    assert rc == 0 and "cluster 24xh100-sxm" in out


def test_show_file(capsys):
    p = Path(__file__).parent / "data" / "hf" / "llama-3.1-8b.json"
    rc, out, _ = run(capsys, "show", str(p))
    assert rc == 0 and "(llama-3.1-8b)" in out


def test_show_unknown(capsys):
    rc, _, err = run(capsys, "show", "deepsek-v3")
    assert rc == 2
    assert "not a shipped model, accelerator or cluster (did you mean 'deepseek-v3'?)" in err
