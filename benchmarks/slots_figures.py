"""Redundant expert slots (EPLB plans, ``Plan(redundant=R)``): ratio and winning
MoE plan with and without them in the plan search, closed form.

Run:  python benchmarks/slots_figures.py [CONTEXT]     (default 32768)
      python benchmarks/slots_figures.py --sweep     (sweep points/s with and without slot plans)
"Without" restricts ``plan="auto"`` to the plans with redundant = 0 (the plan
space before slots existed) by filtering the core's enumeration; "with" is the
default search. Same step model, same admission otherwise.
"""

from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager

import qsengine
from qsengine import _core
from qsengine.packing import memory as _memory
from qsengine.study.config import DEFAULT_CLUSTERS

MODELS = ("deepseek-v3", "qwen3-235b-a22b")
ROUTINGS = ("uniform", "powerlaw:1.01", "powerlaw:1.2")


@contextmanager
def without_slots():
    """plan='auto' searches only plans with redundant = 0."""
    real = _core.enumerate_plans

    class _Filtered:
        def __getattr__(self, name):
            return getattr(_core, name)

        @staticmethod
        def enumerate_plans(desc, g):
            return [p for p in real(desc, g) if p.redundant == 0]

    from qsengine.decode import sides

    _memory._core = _Filtered()
    sides._FAMILIES.clear()
    try:
        yield
    finally:
        _memory._core = _core
        sides._FAMILIES.clear()


def one(model: str, cluster: str, routing: str, context: int) -> tuple[str, float, str, float]:
    r = qsengine.simulate(model=model, cluster=cluster, context=context, routing=routing, microbatches=0,
                          break_even=False).to_record()
    return str(r["moe_plan"]), float(r["moe_tokens_per_s"] or 0.0), str(r["verdict"]), r["ratio"]


def sweep_ab(repeats: int = 3) -> None:
    """Closed-form sweep points/s with and without slot plans in the search,
    alternated in one process (same load): bench_sweep.py's main grid, and the
    same grid on the 72-GPU GB200 rack where slot plans are most numerous."""
    import statistics
    import time

    import numpy as np

    grid = {"model": ["deepseek-v3", "qwen3-235b-a22b", "grok-1", "qwen3-30b-a3b"],
            "cluster": ["8xh100", "8xh200", "8xb200", "8xmi300x", "8xmi355x", "16xh100", "16xh200", "8xa100"],
            "context": [int(x) for x in np.geomspace(1024, 262144, 64).round()],
            "q": [float(x) for x in np.linspace(1.2, 8.0, 50)], "microbatches": [0], "precision": ["fp8"]}
    for label, g in (("bench_sweep grid", grid), ("the same on 72xgb200", {**grid, "cluster": ["72xgb200"]})):
        times: dict[str, list[float]] = {"without": [], "with": []}
        n = 0
        for i in range(repeats + 1):  # the first round builds the plan caches: dropped
            for mode in ("without", "with"):
                ctx = without_slots() if mode == "without" else _nothing()
                with ctx:
                    qsengine.sweep(g, seed=1, progress=False)  # warm this mode's caches
                    t0 = time.perf_counter()
                    df = qsengine.sweep(g, seed=1, progress=False)
                    dt = time.perf_counter() - t0
                n = len(df)
                if i:
                    times[mode].append(dt)
        a, b = statistics.median(times["without"]), statistics.median(times["with"])
        print(f"{label}, {n:,} points, warm medians of {repeats}: without slots {n / a:,.0f} points/s, "
              f"with slots {n / b:,.0f} points/s (ratio with/without time {b / a:.2f})")


@contextmanager
def _nothing():
    yield


def main() -> int:
    warnings.simplefilter("ignore")
    if sys.argv[1:] == ["--sweep"]:
        sweep_ab()
        return 0
    context = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
    print(f"context {context}; closed form; MoE tok/s and ratio dense/MoE, plan search without -> with redundant slots")
    for model in MODELS:
        for routing in ROUTINGS:
            for cluster in DEFAULT_CLUSTERS:
                with without_slots():
                    before = one(model, cluster, routing, context)
                after = one(model, cluster, routing, context)
                fmt = lambda x: "-" if x is None else f"{x:.3f}"
                print(f"{model:16s} {routing:14s} {cluster:9s} {before[0]:>24s} {before[1]:>10,.0f} ratio {fmt(before[3])}"
                      f"  ->  {after[0]:>26s} {after[1]:>10,.0f} ratio {fmt(after[3])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
