"""Calibration runtime benchmark (checks correctness too).

Times each vectorised kernel-time function of :mod:`qsengine.calibration` on
10^5 lanes against the obvious per-element Python loop (the same function
called once per lane with scalars, on a sample of lanes and scaled up),
reports the medians of repeated runs and the ratio, and checks that both give
the same numbers.

    python benchmarks/bench_calibration.py [--lanes 100000] [--repeats 5] [--out benchmarks/results/bench_calibration.txt]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np

from qsengine import load_accelerator
from qsengine.calibration import allreduce_time, alltoall_time, attention_time, gemm_time, grouped_gemm_time


def cases(n: int, rng: np.random.Generator) -> dict[str, tuple]:
    acc = load_accelerator("h200-sxm")
    return {
        "gemm_time": (gemm_time, (acc, "fp8"), (rng.integers(1, 4096, n), rng.choice([1024, 4096, 7168, 18432], n),
                                                rng.choice([1024, 2048, 7168], n))),
        "grouped_gemm_time": (grouped_gemm_time, (acc, "fp8"), (rng.uniform(0.05, 64, n), rng.choice([8, 16, 32], n),
                                                                np.full(n, 7168), rng.choice([256, 2048], n))),
        "attention_time(gqa)": (attention_time, (acc, "gqa"), (rng.integers(1, 512, n), rng.integers(1, 32768, n),
                                                               np.full(n, 8), np.full(n, 1))),
        "attention_time(mla)": (attention_time, (acc, "mla"), (rng.integers(1, 512, n), rng.integers(1, 32768, n),
                                                               np.full(n, 16))),
        "allreduce_time": (allreduce_time, (acc,), (rng.choice([1, 2, 4, 8], n), rng.uniform(0, 3e7, n))),
        "alltoall_time": (alltoall_time, (acc,), (rng.choice([2, 4, 8], n), rng.uniform(0, 3e7, n))),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lanes", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--loop-sample", type=int, default=2000, help="lanes timed in the per-element loop (scaled up)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    lines = [f"bench_calibration: {args.lanes} lanes, median of {args.repeats}, python {platform.python_version()}, "
             f"numpy {np.__version__}",
             f"{'function':22s} {'vectorised s':>13s} {'loop s (est.)':>14s} {'ratio':>8s} {'lanes/s':>12s}"]
    for name, (fn, head, cols) in cases(args.lanes, rng).items():
        tv = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            vec = fn(*head, *cols)
            tv.append(time.perf_counter() - t0)
        s = args.loop_sample
        tl = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            loop = np.array([float(fn(*head, *(c[i] for c in cols))) for i in range(s)])
            tl.append((time.perf_counter() - t0) * args.lanes / s)
        if not np.allclose(vec[:s], loop, rtol=1e-14, atol=0):
            raise AssertionError(f"{name}: vectorised and per-element results differ")
        v, lp = statistics.median(tv), statistics.median(tl)
        lines.append(f"{name:22s} {v:13.4f} {lp:14.2f} {lp / v:8.0f} {args.lanes / v:12.3g}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
