"""Sweep throughput: closed-form points/s in-process, Monte Carlo points/min at
1e4 microbatches, and the overhead of two Dask workers against in-process.

Run:  python benchmarks/bench_sweep.py [--quick]
Writes benchmarks/results/bench_sweep.txt. Each figure is the median of
repeated runs; every run's frame is checked equal to the first (correctness
is part of the benchmark).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import pandas.testing as pdt

import qsengine

MODELS = ["qwen3-30b-a3b", "mixtral-8x7b"]
CLUSTERS = ["8xh100", "8xh200"]


def timed(fn, repeats: int):
    times, frames = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        frames.append(fn())
        times.append(time.perf_counter() - t)
    for f in frames[1:]:
        pdt.assert_frame_equal(f, frames[0])
    return statistics.median(times), frames[0]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller grids, fewer repeats")
    args = ap.parse_args()
    rep = 2 if args.quick else 3
    lines = [f"qsengine {qsengine.__version__} sweep benchmark; {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores, python {platform.python_version()}"]

    # 0. the sweep machinery alone (validation, ids, seeds, chunk tables, assembly) with a
    #    trivial evaluator: the ceiling the sweep layer puts on any evaluator
    from qsengine._sweep_testing import fake_point

    grid_fake = {"model": MODELS, "cluster": CLUSTERS, "context": list(range(1024, 1024 + 2500 * (1 if args.quick else 5))),
                 "microbatches": [0]}
    t, df = timed(lambda: qsengine.sweep(grid_fake, seed=1, progress=False, _evaluate=fake_point), rep)
    lines.append(f"sweep machinery, trivial evaluator, in-process: {len(df):,} points, median {t:.2f} s "
                 f"-> {len(df) / t:,.0f} points/s")
    from qsengine import routing as _routing

    if not hasattr(_routing, "independent_popularity"):
        lines.append("simulate-based figures skipped: simulate is not wired to qsengine.routing "
                     "in this build (simulate cannot run)")
        return _finish(lines, args)

    # 1. closed form (microbatches=0): the vectorised fast path on a grid of >= 1e5 points,
    #    against the per-point simulate() path on a subset (checked equal)
    import numpy as np

    from qsengine.fastpath import evaluate_closed_form

    cf_models = ["deepseek-v3", "qwen3-235b-a22b", "grok-1", "qwen3-30b-a3b"]
    cf_clusters = ["8xh100", "8xh200", "8xb200", "8xmi300x", "8xmi355x", "16xh100", "16xh200", "8xa100"]
    cf_contexts = [int(x) for x in np.geomspace(1024, 262144, 64).round()]
    cf_qs = [float(x) for x in np.linspace(1.2, 8.0, 50)]
    pts = [dict(model=m, cluster=c, context=t, q=q, microbatches=0, precision="fp8")
           for m in cf_models for c in cf_clusters for t in cf_contexts for q in cf_qs]
    t0 = time.perf_counter()
    first = evaluate_closed_form(pts)
    t_cold = time.perf_counter() - t0
    t_fast = []
    for _ in range(rep):
        t0 = time.perf_counter()
        again = evaluate_closed_form(pts)
        t_fast.append(time.perf_counter() - t0)
        assert again == first or all(str(a) == str(b) for a, b in zip(again, first))
    t_fast = statistics.median(t_fast)
    lines.append(f"closed form fast path (evaluate_closed_form), {len(pts):,} points "
                 f"({len(cf_models)} models x {len(cf_clusters)} clusters x {len(cf_contexts)} contexts x "
                 f"{len(cf_qs)} q, break-even on): first call {t_cold:.2f} s (builds the plan caches) -> "
                 f"{len(pts) / t_cold:,.0f} points/s; median of {rep} warm calls {t_fast:.2f} s -> "
                 f"{len(pts) / t_fast:,.0f} points/s")
    # distinct (model, cluster, context) only: every point needs its own MoE side and q*
    pts_u = [dict(model=m, cluster=c, context=t, q=2.0, microbatches=0, precision="fp8")
             for m in cf_models for c in cf_clusters for t in range(4096, 4096 + 64 * 40, 40)]
    t0 = time.perf_counter()
    evaluate_closed_form(pts_u)
    t_u = time.perf_counter() - t0
    lines.append(f"closed form fast path, {len(pts_u):,} points with no shared MoE side (one q each, all "
                 f"distinct contexts): {t_u:.2f} s -> {len(pts_u) / t_u:,.0f} points/s")
    sub = pts[:: len(pts) // 6][:6]
    t0 = time.perf_counter()
    slow = [qsengine.simulate(**p).to_record() for p in sub]
    t_slow = (time.perf_counter() - t0) / len(sub)
    fast_sub = evaluate_closed_form(sub)
    same = all(str(a) == str(b) for a, b in zip(slow, fast_sub))
    lines.append(f"closed form per-point simulate() path on {len(sub)} of those points: {t_slow:.2f} s/point -> "
                 f"{1 / t_slow:,.1f} points/s; fast/per-point throughput ratio (warm) "
                 f"{(len(pts) / t_fast) * t_slow:,.0f}x; records identical: {same}")
    grid_big = {"model": cf_models, "cluster": cf_clusters, "context": cf_contexts, "q": cf_qs,
                "microbatches": [0], "precision": ["fp8"]}
    t0 = time.perf_counter()
    df_big = qsengine.sweep(grid_big, seed=1, progress=False)
    t_sw = time.perf_counter() - t0
    lines.append(f"the same {len(df_big):,} points through qsengine.sweep in-process (validation, ids, fast path, "
                 f"tables): {t_sw:.2f} s -> {len(df_big) / t_sw:,.0f} points/s")
    contexts = [4096, 8192, 16384, 32768, 65536, 131072]
    qs = [1.5, 2.0, 3.0, "sqrt"] if not args.quick else [2.0, "sqrt"]
    grid_cf = {"model": MODELS, "cluster": CLUSTERS, "context": contexts, "q": qs, "microbatches": [0]}

    # 2. Monte Carlo at 1e4 microbatches, in-process
    grid_mc = {"model": MODELS, "cluster": CLUSTERS, "context": [4096, 32768] if not args.quick else [32768],
               "microbatches": [10_000], "break_even": [False]}
    t_mc, df_mc = timed(lambda: qsengine.sweep(grid_mc, seed=1, progress=False), rep)
    lines.append(f"Monte Carlo 1e4 microbatches, in-process: {len(df_mc)} points, median {t_mc:.2f} s "
                 f"-> {len(df_mc) / t_mc * 60:,.1f} points/min")

    # 3. two Dask workers (processes, 1 thread each) vs in-process on the same sweep
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(lambda: __import__("qsengine.simulation"))  # warm imports outside the timing
        for name, g, t_local, ref in (("Monte Carlo 1e4", grid_mc, t_mc, df_mc),):
            t_dask, df_dask = timed(lambda: qsengine.sweep(g, seed=1, progress=False, executor=client,
                                                           chunk_size=1), rep)
            pdt.assert_frame_equal(df_dask, ref)
            lines.append(f"{name}: 2 Dask workers median {t_dask:.2f} s vs in-process {t_local:.2f} s "
                         f"-> Dask/in-process time ratio {t_dask / t_local:.2f} (identical frames)")
        g = {**grid_cf, "break_even": [False]}
        t_local, ref = timed(lambda: qsengine.sweep(g, seed=1, progress=False), rep)
        t_dask, df_dask = timed(lambda: qsengine.sweep(g, seed=1, progress=False, executor=client), rep)
        pdt.assert_frame_equal(df_dask, ref)
        lines.append(f"closed form ({len(ref)} points): 2 Dask workers median {t_dask:.3f} s vs in-process "
                     f"{t_local:.3f} s -> ratio {t_dask / t_local:.2f} (identical frames)")

    return _finish(lines, args)


def _finish(lines, args) -> int:
    text = "\n".join(lines) + "\n"
    print(text, end="")
    out = Path(__file__).parent / "results" / "bench_sweep.txt"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text + f"command: python benchmarks/bench_sweep.py{' --quick' if args.quick else ''}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
