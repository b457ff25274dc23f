"""Sweep throughput: closed-form points/s through qsengine.sweep in-process (and
its pieces), Monte Carlo points/min at 1e4 microbatches, and the overhead of two
Dask workers against in-process.

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
import warnings
from pathlib import Path

import pandas.testing as pdt

import qsengine

MODELS = ["qwen3-30b-a3b", "mixtral-8x7b"]
CLUSTERS = ["8xh100", "8xh200"]


def timed_plain(fn, repeats: int):
    """(median seconds, last result) of ``repeats`` calls."""
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def timed(fn, repeats: int):
    """timed_plain for frame-returning calls, each frame checked equal to the first."""
    frames = []
    t, _ = timed_plain(lambda: frames.append(fn()), repeats)
    for f in frames[1:]:
        pdt.assert_frame_equal(f, frames[0])
    return t, frames[0]


def main() -> int:
    warnings.simplefilter("ignore", qsengine.ContextWarning)  # the grids run past some models' maximum context
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller grids, fewer repeats")
    args = ap.parse_args()
    rep = 2 if args.quick else 3
    lines = [f"qsengine {qsengine.__version__} sweep benchmark; {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores, python {platform.python_version()}"]

    # 0. the per-point evaluator path (custom evaluators, Monte Carlo points) with a trivial
    #    evaluator: validation, ids, a seed per point, record tables, assembly
    from qsengine._sweep_testing import fake_point

    grid_fake = {"model": MODELS, "cluster": CLUSTERS, "context": list(range(1024, 1024 + 2500 * (1 if args.quick else 5))),
                 "microbatches": [0]}
    t, df = timed(lambda: qsengine.sweep(grid_fake, seed=1, progress=False, _evaluate=fake_point), rep)
    lines.append(f"per-point evaluator path, trivial evaluator, in-process: {len(df):,} points, median {t:.2f} s "
                 f"-> {len(df) / t:,.0f} points/s")
    # 1. closed form (microbatches=0): the vectorised fast path, through qsengine.sweep (the
    #    figure a user sees) and its pieces, against the per-point simulate() path (checked equal)
    import numpy as np

    from qsengine.decode.pipeline import encode_points, evaluate_columns

    cf_models = ["deepseek-v3", "qwen3-235b-a22b", "grok-1", "qwen3-30b-a3b"]
    cf_clusters = ["8xh100", "8xh200", "8xb200", "8xmi300x", "8xmi355x", "16xh100", "16xh200", "8xa100"]
    cf_contexts = [int(x) for x in np.geomspace(1024, 262144, 64).round()]
    cf_qs = [float(x) for x in np.linspace(1.2, 8.0, 50)]
    grid_big = {"model": cf_models, "cluster": cf_clusters, "context": cf_contexts, "q": cf_qs,
                "microbatches": [0], "precision": ["fp8"]}
    t0 = time.perf_counter()
    df_big = qsengine.sweep(grid_big, seed=1, progress=False)
    t_cold = time.perf_counter() - t0
    n_big = len(df_big)
    shape = (f"{len(cf_models)} models x {len(cf_clusters)} clusters x {len(cf_contexts)} contexts x "
             f"{len(cf_qs)} q, fp8, break-even q* on")
    lines.append(f"closed form through qsengine.sweep in-process, {n_big:,} points ({shape}): first sweep "
                 f"{t_cold:.2f} s (builds the plan caches) -> {n_big / t_cold:,.0f} points/s")
    t_sw, _ = timed(lambda: qsengine.sweep(grid_big, seed=1, progress=False), rep + 1)
    lines.append(f"  warm, median of {rep + 1}: {t_sw:.2f} s -> {n_big / t_sw:,.0f} points/s "
                 f"(validation, point ids, fast path on {os.cpu_count()} threads, tables, DataFrame)")
    t_1, df_1 = timed(lambda: qsengine.sweep(grid_big, seed=1, progress=False, threads=1), rep)
    pdt.assert_frame_equal(df_1, df_big)
    lines.append(f"  the same on 1 thread: {t_1:.2f} s -> {n_big / t_1:,.0f} points/s; "
                 f"{os.cpu_count()} threads / 1 thread speed-up {t_1 / t_sw:.2f}x (identical frames)")
    pts = [dict(model=m, cluster=c, context=t, q=q, microbatches=0, precision="fp8")
           for m in cf_models for c in cf_clusters for t in cf_contexts for q in cf_qs]
    cols, n = encode_points(pts)
    t_cols, out = timed_plain(lambda: evaluate_columns(cols, n), rep)
    names = list(out)
    recs = [dict(zip(names, vals)) for vals in zip(*[out[k].tolist() for k in names])]
    lines.append(f"  pipeline alone, one call on 1 thread: evaluate_columns {t_cols:.2f} s -> "
                 f"{n / t_cols:,.0f} points/s")
    # the same grid shape with the conventional (GQA) twin, and with explicit dense models
    def first_and_warm(grid, label: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", qsengine.ContextWarning)  # models studied past their max context
            t0 = time.perf_counter()
            df = qsengine.sweep(grid, seed=1, progress=False)
            t0 = time.perf_counter() - t0
            t, _ = timed(lambda: qsengine.sweep(grid, seed=1, progress=False), rep)
        lines.append(f"closed form, {label}, {len(df):,} points: first sweep {t0:.2f} s, warm median {t:.2f} s "
                     f"-> {len(df) / t:,.0f} points/s")

    first_and_warm({**grid_big, "twin_attention": ["gqa"]}, "twin_attention='gqa'")
    first_and_warm({**grid_big, "output": [2048], "prefill": ["colocated"]},
                   "whole requests (context in, 2048 out, prefill colocated)")
    first_and_warm({**grid_big, "output": [2048], "prefill": ["disaggregated"]},
                   "whole requests (context in, 2048 out, prefill disaggregated)")
    first_and_warm({"model": cf_models, "cluster": cf_clusters,
                    "context": [int(x) for x in np.geomspace(1024, 262144, 200).round()],
                    "dense": ["llama-3.1-70b", "qwen3-32b", "llama-3.1-8b", "llama-3.1-405b"],
                    "microbatches": [0], "precision": ["fp8", "bf16", "fp8-kvbf16", "fp4"]}, "explicit dense models")
    if not args.quick:
        grid_m = {**grid_big, "q": [float(x) for x in np.linspace(1.2, 8.0, 500)]}
        t_m, df_m = timed(lambda: qsengine.sweep(grid_m, seed=1, progress=False), 1)
        lines.append(f"  a million-point grid (500 q): {len(df_m):,} points in {t_m:.1f} s -> "
                     f"{len(df_m) / t_m:,.0f} points/s")
    sub = pts[:: len(pts) // 6][:6]
    t0 = time.perf_counter()
    slow = [qsengine.simulate(**p).to_record() for p in sub]
    t_slow = (time.perf_counter() - t0) / len(sub)
    same = all(str(a) == str(recs[pts.index(p)]) for a, p in zip(slow, sub))
    lines.append(f"one point at a time, simulate(microbatches=0).to_record() on {len(sub)} of those points: "
                 f"{t_slow:.2f} s/point -> {1 / t_slow:,.1f} points/s; sweep/per-point throughput ratio "
                 f"{(n_big / t_sw) * t_slow:,.0f}x; records identical: {same}")
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
        client.run(lambda: __import__("qsengine.decode.simulate"))  # warm imports outside the timing
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
