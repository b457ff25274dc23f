"""The EP all-to-all on TPU tori, before (every scale-up domain a crossbar) and
after (the torus's bisection bound), issue #14 item 3.

Run:  python examples/torus_alltoall.py

For Qwen3-235B-A22B and DeepSeek-V3 on 64xtpu-v5p (3D torus, one 4x4x4 cube)
and 256xtpu-v6e (2D torus, one 16x16 pod) at 8K and 32K context, closed form
(``microbatches=0``), the models' deployed precision, q = 1/sqrt(s), the default
50 ms p99 TPOT target: the MoE's plan, its EP all-to-all time per decode step
(dispatch + combine over all MoE layers, at the operating point), its tokens/s
per GPU, and the dense/MoE ratio. "before" is the same accelerator with its
scale-up taken as a switch (``scaleup_topology="switch"``: today's model).
Writes benchmarks/results/torus_alltoall.txt.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from pathlib import Path

import qsengine
from qsengine.specs.loaders import as_cluster


def as_switch(cluster: str) -> qsengine.Cluster:
    """``cluster`` with its accelerator's scale-up domain taken as a crossbar."""
    c = as_cluster(cluster)
    acc = dataclasses.replace(c.accelerator, scaleup_topology="switch", torus_dims=None, torus_wraparound=None)
    return dataclasses.replace(c, accelerator=acc)


def row(res: qsengine.SimulationResult) -> tuple[str, float, float, float]:
    """(MoE plan, EP all-to-all ms per step, MoE tokens/s per GPU, ratio) of a result."""
    rec = res.to_record()
    ep = 0.0
    if res.moe.feasible and res.moe.step is not None:
        ep = sum(p.time for p in res.moe.step.pieces if p.name == "ep all-to-all")
    return rec["moe_plan"] or "-", ep * 1e3, rec["moe_tokens_per_s_per_gpu"], rec["ratio"]


def main() -> int:
    lines = ["EP all-to-all on TPU tori: before (crossbar) -> after (torus bisection); closed form, 50 ms p99 TPOT",
             "", f"{'model':17} {'cluster':12} {'ctx':>5}  {'MoE plan (before -> after)':44} "
                 f"{'EP a2a ms/step':>16} {'MoE tok/s/GPU':>15} {'ratio dense/MoE':>16}"]
    for model in ("qwen3-235b-a22b", "deepseek-v3"):
        for cluster in ("64xtpu-v5p", "256xtpu-v6e"):
            for ctx in (8192, 32768):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", qsengine.ContextWarning)
                    before = row(qsengine.simulate(model, as_switch(cluster), ctx, microbatches=0, break_even=False))
                    after = row(qsengine.simulate(model, cluster, ctx, microbatches=0, break_even=False))
                lines.append(f"{model:17} {cluster:12} {ctx // 1024:>4}K  {before[0] + ' -> ' + after[0]:44} "
                             f"{before[1]:6.2f} -> {after[1]:6.2f} {before[2]:6.1f} -> {after[2]:6.1f} "
                             f"{before[3]:6.3f} -> {after[3]:6.3f}")
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    out = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "torus_alltoall.txt"
    out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
