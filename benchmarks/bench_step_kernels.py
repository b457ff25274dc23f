"""Cost of the calibrated kernels in the closed-form sweep: bench_sweep.py's
102,400-point grid through qsengine.sweep on one thread, with
StepOptions(kernels="calibrated") (the default) and kernels="roofline",
interleaved in one process (so both see the same machine load); medians of
wall and CPU time (CPU time is what a busy shared machine distorts least).

Run:  python benchmarks/bench_step_kernels.py [--repeats N]
Writes benchmarks/results/bench_step_kernels.txt.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import numpy as np

import qsengine


def main() -> int:
    warnings.simplefilter("ignore", qsengine.ContextWarning)
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    grid = {"model": ["deepseek-v3", "qwen3-235b-a22b", "grok-1", "qwen3-30b-a3b"],
            "cluster": ["8xh100", "8xh200", "8xb200", "8xmi300x", "8xmi355x", "16xh100", "16xh200", "8xa100"],
            "context": [int(x) for x in np.geomspace(1024, 262144, 64).round()],
            "q": [float(x) for x in np.linspace(1.2, 8.0, 50)], "microbatches": [0], "precision": ["fp8"]}
    wall: dict[str, list[float]] = {"calibrated": [], "roofline": []}
    cpu: dict[str, list[float]] = {"calibrated": [], "roofline": []}
    n = 0
    for k in wall:  # warm the plan caches of both
        n = len(qsengine.sweep(dict(grid, options=[qsengine.StepOptions(kernels=k)]), seed=1, progress=False,
                               threads=1))
    for _ in range(args.repeats):
        for k in wall:
            g = dict(grid, options=[qsengine.StepOptions(kernels=k)])
            t, c = time.perf_counter(), time.process_time()
            qsengine.sweep(g, seed=1, progress=False, threads=1)
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    lines = [f"qsengine {qsengine.__version__} step-kernels benchmark; {platform.machine()}, {os.cpu_count()} cores, "
             f"python {platform.python_version()}; {n:,} closed-form points (bench_sweep.py's grid), 1 thread, "
             f"median of {args.repeats} interleaved runs"]
    for k in wall:
        w, c = statistics.median(wall[k]), statistics.median(cpu[k])
        lines.append(f"  kernels={k!r}: wall {w:.2f} s -> {n / w:,.0f} points/s; CPU {c:.2f} s -> {n / c:,.0f} points/CPU-s")
    ratio = statistics.median(cpu["calibrated"]) / statistics.median(cpu["roofline"])
    lines.append(f"  calibrated / roofline CPU time: {ratio:.2f}")
    lines.append("command: python benchmarks/bench_step_kernels.py")
    text = "\n".join(lines)
    print(text)
    out = Path(__file__).resolve().parent / "results" / "bench_step_kernels.txt"
    out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
