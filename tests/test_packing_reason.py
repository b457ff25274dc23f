"""Infeasible packings name the binding shortfall first: total weights against
total usable HBM, before one plan's detail."""

from __future__ import annotations

import qsengine as q
from qsengine.packing import weights_shortfall


def test_total_weights_shortfall_comes_first():
    m, c = q.load_model("switch-c-2048"), q.load_cluster("8xh100")
    prec = q.default_precision(m)
    total, usable = m.weight_bytes(prec), c.num_gpus * c.accelerator.usable_bytes
    assert total > usable
    p = q.pack(m, c, 512)
    assert not p.feasible
    assert p.reason.startswith(f"weights {total / 1e9:,.0f} GB in total exceed the {usable / 1e9:,.0f} GB usable")
    assert "; this plan: " in p.reason and p.plan.label in p.reason
    assert weights_shortfall(m, c) == p.reason.split("; this plan: ")[0]


def test_no_total_shortfall_when_the_weights_fit_somewhere():
    m = q.load_model("deepseek-v3")
    c = q.load_cluster("8xh200")
    assert weights_shortfall(m, c, "fp8") == ""
    # a plan that cannot hold the weights on its GPUs although the cluster could: only the plan's detail
    p = q.pack(m, c, 4096, plan=q.Plan(tp=1, pp=1, dp=8, ep=1), precision="fp8")
    assert not p.feasible and "in total exceed" not in p.reason


def test_simulate_reason_names_the_total():
    r = q.simulate("switch-c-2048", "8xh100", 512, precision="bf16", microbatches=0, break_even=False)
    assert r.moe.reason.startswith("weights ") and "in total exceed" in r.moe.reason
