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

    # 1. closed form (microbatches=0), in-process
    contexts = [4096, 8192, 16384, 32768, 65536, 131072]
    qs = [1.5, 2.0, 3.0, "sqrt"] if not args.quick else [2.0, "sqrt"]
    grid_cf = {"model": MODELS, "cluster": CLUSTERS, "context": contexts, "q": qs, "microbatches": [0]}
    for be in (True, False):
        g = {**grid_cf, "break_even": [be]}
        t, df = timed(lambda: qsengine.sweep(g, seed=1, progress=False), rep)
        lines.append(f"closed form, in-process, break_even={be}: {len(df)} points, median {t:.3f} s "
                     f"-> {len(df) / t:,.0f} points/s")

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
