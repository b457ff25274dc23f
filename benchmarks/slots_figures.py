"""Redundant expert slots (EPLB plans, ``Plan(redundant=R)``): ratio and winning
MoE plan with and without them in the plan search, closed form.

Run:  python benchmarks/slots_figures.py
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


def main() -> int:
    warnings.simplefilter("ignore")
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
