"""qsengine.sweep: executors agree exactly, nothing is lost, bad grids are refused.

Most tests drive the sweep machinery with the cheap evaluators of
``qsengine._sweep_testing`` (same column kinds as simulate's records); the
tests at the end run the real simulate on small points.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pandas.testing as pdt
import pytest

import qsengine
from qsengine import QsengineWarning
from qsengine._sweep_testing import arm_interrupt, exit_once, fake_point, interrupt_after

import qsengine.sweeps.grid as sweep_mod  # noqa: E402

GRID = {
    "model": ["qwen3-30b-a3b", "mixtral-8x7b"],
    "cluster": ["8xh100", "8xh200"],
    "context": [4096, 8192, 32768],
    "q": ["sqrt", 2.0],
    "microbatches": [0, 50],
}
N = 2 * 2 * 3 * 2 * 2


def _sweep(**kw):
    kw.setdefault("seed", 7)
    kw.setdefault("progress", False)
    kw.setdefault("_evaluate", fake_point)
    return qsengine.sweep(GRID if "grid" not in kw else kw.pop("grid"), **kw)


@pytest.fixture(scope="module")
def reference():
    return _sweep()


def test_rows_columns_and_order(reference):
    df = reference
    assert len(df) == N and df["point_id"].is_unique
    for f in sweep_mod.FIELDS:
        assert f"in_{f}" in df.columns
    for c in ("ratio", "verdict", "agrees_with_qs", "moe_feasible", "moe_reason"):
        assert c in df.columns
    # grid order: the cartesian product in FIELDS order, last field fastest
    assert list(df["in_model"][:N // 2].unique()) == ["qwen3-30b-a3b"]
    assert list(df["in_microbatches"][:4]) == [0, 50, 0, 50]
    assert list(df["in_q"][:4]) == ["sqrt", "sqrt", "2.0", "2.0"]
    assert df["in_context"].dtype == np.int64 and df["ratio"].dtype == np.float64
    assert (~df["moe_feasible"]).any(), "infeasible points are rows too, with their reason"
    assert (df.loc[~df["moe_feasible"], "moe_reason"] != "").all()
    assert df.attrs["sweep"]["seed"] == {"entropy": 7, "spawn_key": []}


def test_point_seed_depends_on_content_not_position(reference):
    one = {"model": "mixtral-8x7b", "cluster": "8xh200", "context": 32768, "q": 2.0, "microbatches": 50}
    df = qsengine.sweep([one], seed=7, progress=False, _evaluate=fake_point)
    row = reference[reference["point_id"] == df["point_id"][0]]
    assert len(row) == 1
    results = [c for c in df.columns if not c.startswith("in_")]  # input column types follow the grid
    # a one-point frame types a nullable column by its one value (bool, or null when None)
    pdt.assert_frame_equal(df[results], row[results].reset_index(drop=True), check_dtype=False)
    # reversed grid: same rows, reversed
    rev = qsengine.sweep(list(reversed([{k: v for k, v in r.items()} for r in _points()])), seed=7,
                         progress=False, _evaluate=fake_point)
    pdt.assert_frame_equal(rev[::-1].reset_index(drop=True), reference)
    # another seed changes the draws
    other = _sweep(seed=8)
    assert not np.allclose(other["draw"], reference["draw"])


def _points():
    import itertools

    keys = list(GRID)
    return [dict(zip(keys, combo)) for combo in itertools.product(*GRID.values())]


def test_chunk_sizes_and_executors_agree(reference):
    from concurrent.futures import ThreadPoolExecutor

    for cs in (1, 5, 1000):
        pdt.assert_frame_equal(_sweep(chunk_size=cs), reference)
    with ThreadPoolExecutor(2) as ex:
        pdt.assert_frame_equal(_sweep(executor=ex, chunk_size=3), reference)
    pdt.assert_frame_equal(_sweep(executor="processes", chunk_size=4), reference)


@pytest.mark.parametrize("grid", [
    GRID,  # a product with constant fields after the varying ones
    {"model": "mixtral-8x7b", "cluster": "8xh100", "context": 4096},  # one point
    {"context": [4096, 4096, 8192], "model": ["mixtral-8x7b"], "cluster": ["8xh100", "8xh200"]},  # repeated value
    _points()[:5] + _points()[2:4] + [{"model": "mixtral-8x7b", "cluster": "8xh100", "context": 1, "q": 3}],
])
def test_point_ids_are_sha256_of_the_canonical_json(grid):
    pts = sweep_mod._expand(grid)
    n = len(pts.ids)
    for i in range(n):
        canon = "{" + ",".join(f'"{k}":{pts.values[k][int(pts.codes[k][i])].canon}' for k in sweep_mod.FIELDS) + "}"
        assert pts.ids[i] == sweep_mod.point_id(canon)
    # unique points: first occurrences in grid order; every position maps to its id's unique point
    first = {}
    for i, pid in enumerate(pts.ids):
        first.setdefault(pid, i)
    assert pts.unique.tolist() == list(first.values())
    assert [pts.unique_ids[u] for u in pts.unique_of.tolist()] == pts.ids


def test_duplicate_points_computed_once():
    pts = _points()[:3]
    df = qsengine.sweep(pts + pts[:1], seed=1, progress=False, _evaluate=fake_point)
    assert len(df) == 4 and df.attrs["sweep"]["unique_points"] == 3
    pdt.assert_series_equal(df.iloc[3], df.iloc[0], check_names=False)


@pytest.fixture(scope="module")
def dask_client():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        yield client


def test_dask_local_cluster_equals_in_process(reference, dask_client):
    pdt.assert_frame_equal(_sweep(executor=dask_client, chunk_size=3), reference)
    pdt.assert_frame_equal(_sweep(executor=dask_client.scheduler.address, chunk_size=7), reference)


def test_dask_never_has_more_chunks_in_flight_than_threads(reference, dask_client, monkeypatch):
    """Chunks are handed out as slots free (2 workers x 1 thread here), so a
    long chunk never holds others queued on its worker while another idles."""
    live, peak = [], [0]
    real = dask_client.submit

    def spy(*a, **kw):
        fut = real(*a, **kw)
        live[:] = [f for f in live if not f.done()] + [fut]
        peak[0] = max(peak[0], len(live))
        return fut

    monkeypatch.setattr(dask_client, "submit", spy)
    pdt.assert_frame_equal(_sweep(executor=dask_client, chunk_size=1), reference)
    assert 1 <= peak[0] <= 2


def _disarm():
    for k in ("QSENGINE_TEST_KILL_CONTEXT", "QSENGINE_TEST_MARKERS"):
        os.environ.pop(k, None)


def test_dask_worker_killed_mid_sweep_still_yields_every_point(reference, dask_client, tmp_path, monkeypatch):
    markers = tmp_path / "markers"
    markers.mkdir()
    # the workers were started before this test: give them the kill switch via their environment
    def arm(path=str(markers)):
        os.environ["QSENGINE_TEST_KILL_CONTEXT"] = "8192"
        os.environ["QSENGINE_TEST_MARKERS"] = path
    dask_client.run(arm)
    dask_client.run(arm, nanny=True)  # so that restarted workers inherit it
    try:
        df = _sweep(executor=dask_client, chunk_size=4, _evaluate=exit_once, checkpoint=tmp_path / "ck")
    finally:
        for nanny in (False, True):
            dask_client.run(_disarm, nanny=nanny)
    killed = len(list(markers.iterdir()))
    assert killed == N // 3, "every point at context 8192 killed its worker once"
    pdt.assert_frame_equal(df, reference)


def test_process_pool_worker_killed_still_yields_every_point(reference, tmp_path, monkeypatch):
    markers = tmp_path / "markers"
    markers.mkdir()
    monkeypatch.setenv("QSENGINE_TEST_KILL_CONTEXT", "32768")
    monkeypatch.setenv("QSENGINE_TEST_MARKERS", str(markers))
    df = _sweep(executor="processes", chunk_size=6, _evaluate=exit_once, retries=20)
    assert len(list(markers.iterdir())) == N // 3
    pdt.assert_frame_equal(df, reference)


def test_interrupted_then_resumed_equals_uninterrupted(reference, tmp_path):
    ck = tmp_path / "ck"
    arm_interrupt(10)
    with pytest.raises(KeyboardInterrupt):
        _sweep(checkpoint=ck, chunk_size=4, _evaluate=interrupt_after)
    chunks = sorted(ck.glob("chunk-*.parquet"))
    assert len(chunks) == 2, "the two completed chunks (8 points) are on disk"
    arm_interrupt(None)
    df = _sweep(checkpoint=ck, chunk_size=4, _evaluate=interrupt_after)
    assert df.attrs["sweep"]["resumed_points"] == 8 and df.attrs["sweep"]["computed_points"] == N - 8
    pdt.assert_frame_equal(df, reference)
    # a resume of a finished sweep computes nothing, and the dataset has no duplicates
    again = _sweep(checkpoint=ck, chunk_size=5)
    assert again.attrs["sweep"]["computed_points"] == 0
    pdt.assert_frame_equal(again, reference)
    ids = pd.concat([pd.read_parquet(p) for p in ck.glob("chunk-*.parquet")])["point_id"]
    assert ids.is_unique and set(ids) == set(reference["point_id"])
    # load_results reads the checkpoint dataset
    assert set(qsengine.load_results(ck)["point_id"]) == set(reference["point_id"])


def test_seed_none_resume_reuses_checkpoint_seed(tmp_path):
    ck = tmp_path / "ck"
    a = _sweep(checkpoint=ck, seed=None)
    b = _sweep(checkpoint=ck, seed=None)
    assert b.attrs["sweep"]["computed_points"] == 0
    assert a.attrs["sweep"]["seed"] == b.attrs["sweep"]["seed"]
    meta = json.loads((ck / "meta.json").read_text())
    assert meta["seed"] == a.attrs["sweep"]["seed"] and meta["format_version"] == 1


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "rename-foreign"])
def test_corrupted_chunk_detected_and_recomputed(reference, tmp_path, damage):
    ck = tmp_path / "ck"
    _sweep(checkpoint=ck, chunk_size=6)
    victim = sorted(ck.glob("chunk-*.parquet"))[1]
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        victim.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    elif damage == "garbage":
        victim.write_bytes(b"not parquet at all")
    else:  # a valid parquet file with points of another grid, under a matching hash name
        from qsengine.sweeps.checkpoint import Checkpoint
        import pyarrow as pa

        victim.unlink()
        t = pa.Table.from_pandas(_sweep(grid=[{"model": "qwen3-30b-a3b", "cluster": "8xh100", "context": 1}],
                                        ).iloc[:1], preserve_index=False)
        Checkpoint(ck).write_chunk(t)
    with pytest.warns(QsengineWarning, match="rejected"):
        df = _sweep(checkpoint=ck, chunk_size=6)
    assert df.attrs["sweep"]["computed_points"] == 6
    pdt.assert_frame_equal(df, reference)
    assert list(ck.glob("*.corrupt")), "the bad chunk is kept aside, not deleted"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = _sweep(checkpoint=ck, chunk_size=6)  # clean now
    assert again.attrs["sweep"]["computed_points"] == 0


def test_checkpoint_of_other_grid_or_seed_refused_then_overwritten(tmp_path):
    ck = tmp_path / "ck"
    _sweep(checkpoint=ck)
    with pytest.raises(ValueError, match="different grid; use a new directory or resume=False"):
        _sweep(checkpoint=ck, grid={**GRID, "context": [4096]})
    with pytest.raises(ValueError, match="different seed"):
        _sweep(checkpoint=ck, seed=99)
    df = _sweep(checkpoint=ck, seed=99, resume=False)
    assert df.attrs["sweep"]["computed_points"] == N
    assert json.loads((ck / "meta.json").read_text())["seed"]["entropy"] == 99


def test_checkpoint_format_version_refused(tmp_path):
    ck = tmp_path / "ck"
    _sweep(checkpoint=ck)
    meta = json.loads((ck / "meta.json").read_text())
    meta["format_version"] = 99
    (ck / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format version 99"):
        _sweep(checkpoint=ck)
    (ck / "meta.json").write_text("{truncated")
    with pytest.raises(ValueError, match="meta.json is unreadable"):
        _sweep(checkpoint=ck)


def _meta(ck):
    return json.loads((ck / "meta.json").read_text())


def test_checkpoint_records_its_code_and_the_same_code_resumes(reference, tmp_path):
    ck = tmp_path / "ck"
    first = _sweep(checkpoint=ck, chunk_size=5)
    here = qsengine.code_fingerprint()
    assert _meta(ck)["code"] == here == first.attrs["sweep"]["code"]
    again = _sweep(checkpoint=ck, chunk_size=5)
    assert again.attrs["sweep"]["computed_points"] == 0 and again.attrs["sweep"]["resumed_points"] == N
    pdt.assert_frame_equal(again, reference)


@pytest.mark.parametrize("stored", ["0123456789abcdef", "legacy"])
def test_checkpoint_of_other_code_refused_then_overwritten(reference, tmp_path, stored):
    """The qsengine version is the same at every commit: a checkpoint of other code (or of code
    before the fingerprint was recorded) would be resumed silently without the ``code`` key."""
    ck = tmp_path / "ck"
    _sweep(checkpoint=ck, chunk_size=5)
    meta = _meta(ck)
    if stored == "legacy":
        del meta["code"]
    else:
        meta["code"] = stored
    (ck / "meta.json").write_text(json.dumps(meta))
    files = sorted(p.name for p in ck.iterdir())
    here = qsengine.code_fingerprint()
    with pytest.raises(ValueError) as info:
        _sweep(checkpoint=ck, chunk_size=5)
    msg = str(info.value)
    there = "none there: written before qsengine recorded it" if stored == "legacy" else f"{stored} there"
    assert msg.startswith(f"checkpoint {ck} was written by other code (code fingerprint {there}; {here} here)"), msg
    assert "delete the directory" in msg and "resume=False" in msg and "--no-resume" in msg
    assert sorted(p.name for p in ck.iterdir()) == files  # refused before anything is touched
    with pytest.raises(ValueError, match="written by other code"):  # a seed=None resume too
        _sweep(checkpoint=ck, seed=None)
    df = _sweep(checkpoint=ck, chunk_size=5, resume=False)
    assert df.attrs["sweep"]["computed_points"] == N and _meta(ck)["code"] == here
    pdt.assert_frame_equal(df, reference)
    assert _sweep(checkpoint=ck).attrs["sweep"]["computed_points"] == 0


BASE = {"model": ["qwen3-30b-a3b"], "cluster": ["8xh100"], "context": [4096]}


@pytest.mark.parametrize("grid, exc, match", [
    ({**BASE, "contxt": [1]}, ValueError, r"unknown field 'contxt' \(did you mean 'context'\?\)"),
    ({**BASE, "seed": [1]}, ValueError, r"unknown field 'seed'"),
    ({**BASE, "q": []}, ValueError, r"field 'q' = \[\]: empty list"),
    ({**BASE, "context": ["4k"]}, TypeError, r"field 'context' = '4k': must be an int"),
    ({**BASE, "context": [0]}, ValueError, r"field 'context' = 0: must be >= 1"),
    ({**BASE, "context": [True]}, TypeError, r"field 'context' = True"),
    ({**BASE, "model": ["qwen3-30b-a3"]}, ValueError, r"field 'model' = 'qwen3-30b-a3'"),
    ({**BASE, "model": ["llama-3.1-8b"]}, ValueError, r"field 'model' = 'llama-3.1-8b': is a dense model"),
    ({**BASE, "cluster": [8]}, TypeError, r"field 'cluster' = 8"),
    ({**BASE, "q": [float("nan")]}, ValueError, r"field 'q' = nan"),
    ({**BASE, "q": ["cube"]}, ValueError, r"field 'q' = 'cube'"),
    ({**BASE, "q": [1e-9]}, ValueError, r"grid point 0 .*field 'q' = 1e-09: no dense twin"),
    ({**BASE, "q": [2.0], "dense": ["llama-3.1-8b"]}, ValueError, r"give either q or dense"),
    ({**BASE, "routing": ["powerlaw:abc"]}, ValueError, r"field 'routing' = 'powerlaw:abc'"),
    ({**BASE, "microbatches": [-1]}, ValueError, r"field 'microbatches' = -1"),
    ({**BASE, "microbatches": [1.5]}, TypeError, r"field 'microbatches' = 1.5"),
    ({**BASE, "slo_tpot": [0]}, ValueError, r"field 'slo_tpot' = 0"),
    ({**BASE, "precision": ["fp9"]}, ValueError, r"field 'precision' = 'fp9'"),
    ({**BASE, "twin_attention": ["mha"]}, ValueError, r"field 'twin_attention' = 'mha'"),
    ({**BASE, "plan": ["tp8"]}, ValueError, r"field 'plan' = 'tp8'"),
    ({**BASE, "context": {4096, 8192}}, TypeError, r"field 'context'.*must be a list"),
    ({"model": ["qwen3-30b-a3b"], "context": [4096]}, ValueError, r"required field 'cluster' is missing"),
    ([], ValueError, r"empty list of points"),
    ([{"model": "qwen3-30b-a3b", "cluster": "8xh100", "context": -5}], ValueError,
     r"grid point 0: field 'context' = -5"),
    ("model=x", TypeError, r"must be a dict of lists or a list of point dicts"),
])
def test_bad_grid_refused_before_any_work(grid, exc, match, tmp_path):
    calls = []

    def spy(kwargs, seed, threads):  # pragma: no cover - must never run
        calls.append(kwargs)
        return {}

    with pytest.raises(exc, match=match):
        qsengine.sweep(grid, checkpoint=tmp_path / "ck", progress=False, _evaluate=spy)
    assert not calls
    assert not (tmp_path / "ck").exists(), "nothing written before validation passed"


def test_bad_arguments():
    with pytest.raises(ValueError, match="chunk_size=0"):
        _sweep(chunk_size=0)
    with pytest.raises(ValueError, match="executor='threads'"):
        _sweep(executor="threads")
    with pytest.raises(TypeError, match="executor=3"):
        _sweep(executor=3)
    with pytest.raises(TypeError, match="seed"):
        _sweep(seed="abc")


def test_core_package_does_not_import_dask():
    code = "import sys, qsengine; qsengine.sweep; qsengine.simulate; assert 'distributed' not in sys.modules and 'dask' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_real_sigint_keeps_completed_chunks_and_resume_completes(tmp_path):
    """Ctrl-C (a real SIGINT) in a driver process: KeyboardInterrupt within a
    second, completed chunks on disk, and the resumed sweep is complete."""
    import signal
    import time

    ck = tmp_path / "ck"
    code = (
        "import qsengine, sys\n"
        "from qsengine._sweep_testing import slow_point\n"
        f"grid = {GRID!r}\n"
        "try:\n"
        f"    qsengine.sweep(grid, seed=7, progress=False, checkpoint={str(ck)!r}, chunk_size=2, _evaluate=slow_point)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True); sys.exit(130)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(list(ck.glob("chunk-*.parquet"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert time.monotonic() - t0 < 1.5
    assert proc.returncode == 130 and "interrupted" in out
    done = len(list(ck.glob("chunk-*.parquet")))
    assert 3 <= done < N // 2
    df = _sweep(checkpoint=ck, chunk_size=2)
    assert df.attrs["sweep"]["resumed_points"] == 2 * done
    pdt.assert_frame_equal(df, _sweep())
