"""qsengine.sweep with the real simulate, and the sweep / report command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pandas.testing as pdt
import pytest

import qsengine
from qsengine._sweep_testing import fake_point
from qsengine.cli import main

ROOT = Path(__file__).resolve().parents[1]

GRID = {"model": ["qwen3-30b-a3b", "mixtral-8x7b"], "cluster": ["8xh100", "8xh200"], "context": [4096, 32768],
        "microbatches": [0, 50]}


def test_real_simulate_rows_match_simulate_and_executors_agree(tmp_path):
    from qsengine.decode.simulate import simulate
    from qsengine.sweeps import point_seed

    df = qsengine.sweep(GRID, seed=3, progress=False)
    assert len(df) == 16
    # a row is exactly simulate's record with the point's content-derived seed
    row = df.iloc[5]
    import numpy as np

    rec = simulate(row["in_model"], row["in_cluster"], int(row["in_context"]), microbatches=int(row["in_microbatches"]),
                   seed=point_seed(np.random.SeedSequence(3), row["point_id"])).to_record()
    for k, v in rec.items():
        assert (pd.isna(v) and pd.isna(row[k])) or row[k] == v, k
    pdt.assert_frame_equal(qsengine.sweep(GRID, seed=3, progress=False, executor="processes", chunk_size=3), df)
    assert {"moe_feasible", "moe_reason", "ratio", "break_even_q"} <= set(df.columns)


def test_closed_form_sweep_same_for_any_threads_and_chunking():
    """The fast path runs chunks on threads in-process: results must not
    depend on the thread count, the chunking or completion order."""
    grid = {"model": ["qwen3-30b-a3b", "mixtral-8x7b", "deepseek-v3"], "cluster": ["8xh100", "16xh200"],
            "context": [1024, 8192, 131072], "q": ["sqrt", 2.0, 4.5], "slo_tpot": [None, 0.02], "microbatches": [0]}
    ref = qsengine.sweep(grid, seed=1, progress=False, threads=1)
    assert len(ref) == 108 and ref["ratio"].notna().any()
    for kw in ({}, {"threads": 2, "chunk_size": 5}, {"threads": 2, "chunk_size": 1000}):
        pdt.assert_frame_equal(qsengine.sweep(grid, seed=1, progress=False, **kw), ref)


def test_cli_sweep_example_and_report(tmp_path):
    out = tmp_path / "res"
    assert main(["sweep", str(ROOT / "examples" / "sweep_small.toml"), "--out", str(out), "--no-progress"]) == 0
    for name in ("results.parquet", "results.csv", "meta.json"):
        assert (out / name).exists()
    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == 24 and df["point_id"].is_unique
    assert main(["report", str(out)]) == 0
    assert (out / "ratio_heatmap.png").stat().st_size > 1000
    assert (out / "throughput.png").exists()
    # a second run resumes everything from the checkpoint
    assert main(["sweep", str(ROOT / "examples" / "sweep_small.toml"), "--out", str(out), "--no-progress"]) == 0
    pdt.assert_frame_equal(pd.read_parquet(out / "results.parquet"), df)


def test_cli_report_from_checkpoint_only(tmp_path, capsys):
    ck = tmp_path / "ck"
    qsengine.sweep(GRID, seed=1, progress=False, checkpoint=ck, _evaluate=fake_point)
    assert main(["report", str(ck)]) == 0
    printed = capsys.readouterr().out.split()
    assert str(ck / "ratio_heatmap.png") in printed and (ck / "ratio_heatmap.png").exists()


def test_cli_sweep_bad_toml(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[grid]\nmodel = ["qwen3-30b-a3b"]\ncluster = ["8xh100"]\ncontxt = [4096]\n')
    assert main(["sweep", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "unknown field 'contxt' (did you mean 'context'?)" in capsys.readouterr().err
    bad.write_text('[grid\nmodel = 1')
    assert main(["sweep", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    bad.write_text('[grid]\nmodel = ["qwen3-30b-a3b"]\ncluster = ["8xh100"]\ncontext = [4096]\n[sweep]\nsed = 1\n')
    assert main(["sweep", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "unknown key 'sed' (did you mean 'seed'?)" in capsys.readouterr().err


def test_cli_help_lists_sweep_and_report():
    out = subprocess.run([sys.executable, "-m", "qsengine", "--help"], capture_output=True, text=True).stdout
    assert "sweep" in out and "report" in out


def test_real_simulate_dask_local_cluster_equals_in_process():
    distributed = pytest.importorskip("distributed")
    grid = {**GRID, "model": ["qwen3-30b-a3b"], "break_even": [False]}
    ref = qsengine.sweep(grid, seed=11, progress=False)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        pdt.assert_frame_equal(qsengine.sweep(grid, seed=11, progress=False, executor=client, chunk_size=1), ref)
