"""Whole requests, issue #12's remaining items: colocated prefill stalls in the
TPOT (decode/sides.py, decode/montecarlo.py, decode/frontier.py), the
end-to-end frontier, and length distributions of the input and output
(decode/prefill.py, docs/model.md "Whole requests"). The pipeline against the
slow oracle with stalls is ``tests/test_requests.py``'s oracle test."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import qsengine
from qsengine import Plan
from qsengine.decode.prefill import prefill_ctx_flops, prefill_time
from qsengine.decode.step import step_params
from qsengine.specs.loaders import as_cluster, as_precision

I, O = 6144, 2048
BASE = dict(model="qwen3-235b-a22b", cluster="8xh200", precision="fp8", microbatches=0, break_even=False,
            context=I, output=O)


def _t_pf(side: qsengine.SideResult, cluster: str = "8xh200", prec: str = "fp8", prompt: float = I) -> float:
    """Seconds of one replica per prefilled request at the side's chosen plan (the dense side is its own
    model here: ``SideResult.model`` is the twin)."""
    acc = as_cluster(cluster).accelerator
    p = step_params(side.model, as_precision(prec), acc, side.plan)
    return float(prefill_time(p, np.array([float(prompt)]), np.array([prefill_ctx_flops(side.model)]))[0])


@pytest.mark.parametrize("plan", ["auto", Plan(tp=1, dp=8, ep=8)])
def test_colocated_tpot_is_the_step_plus_the_amortised_stall(plan):
    """TPOT (mean and p99) = t_step + (B/O)·t_pf with B the sequences per replica, the p99 meets the
    target, and the end-to-end rate B·dp/TPOT equals the harmonic combination of decode and prefill."""
    slo = 0.05
    res = qsengine.simulate(prefill="colocated", slo_tpot=slo, plan=plan, **BASE)
    rec = res.to_record()
    gpus = res.cluster.num_gpus
    for name, side in (("moe", res.moe), ("dense", res.dense)):
        t_pf = _t_pf(side)
        stall = side.batch * t_pf / O
        assert side.prefill_stall == pytest.approx(stall, rel=1e-12)
        assert rec[f"{name}_tpot_ms"] == pytest.approx((side.step.time + stall) * 1e3, rel=1e-12)
        assert rec[f"{name}_tpot_p99_ms"] == pytest.approx((side.step.time_p99 + stall) * 1e3, rel=1e-12)
        assert rec[f"{name}_tpot_p99_ms"] <= slo * 1e3 * (1 + 1e-12)
        assert side.tpot == pytest.approx(side.step.time + stall, rel=1e-15)
        # the decode throughput does not count the stalls ...
        assert rec[f"{name}_tokens_per_s"] == pytest.approx(side.cluster_batch / side.step.time, rel=1e-12)
        # ... the end-to-end rate is B·dp / (t_step + (B/O)·t_pf), the harmonic combination
        e2e = rec[f"{name}_request_tokens_per_s_per_gpu"] * gpus
        assert e2e == pytest.approx(side.cluster_batch / side.tpot, rel=1e-12)
        dec, pf = rec[f"{name}_tokens_per_s_per_gpu"], rec[f"{name}_prefill_tokens_per_s_per_gpu"]
        assert e2e / gpus == pytest.approx(1 / (1 / dec + (I / O) / pf), rel=1e-12)
        assert pf * gpus == pytest.approx(I * side.replicas / t_pf, rel=1e-12)


def test_stalls_bind_the_target_only_when_colocated():
    """On one plan and target: colocated admits no more sequences than decode only (its TPOT is the step's
    plus a stall that grows with B), and one admission unit more would miss the target; "disaggregated" and
    "none" see the decode step alone (the same batch and TPOT)."""
    plan = Plan(tp=8)
    slo = 0.04
    got = {pf: qsengine.simulate(prefill=pf, slo_tpot=slo, plan=plan, **BASE) for pf in
           ("none", "colocated", "disaggregated")}
    for name in ("moe", "dense"):
        none, col, dis = (getattr(got[k], name) for k in ("none", "colocated", "disaggregated"))
        assert dis.batch == none.batch and dis.tpot == none.tpot and dis.prefill_stall == 0.0
        assert none.prefill_stall == 0.0
        assert col.batch < none.batch and col.batch_limit == "slo"
        # one more sequence would miss the target (the bisection is on the TPOT with stalls)
        from qsengine.decode.step import decode_step

        acc = as_cluster("8xh200").accelerator
        nxt = decode_step(col.model, as_precision("fp8"), acc, col.plan, col.batch + 1, I + (O + 1) / 2)
        assert nxt.time_p99 + (col.batch + 1) * _t_pf(col) / O > slo


def test_monte_carlo_tpot_includes_the_stall():
    """The routing Monte Carlo steps the batch down on the p99 with stalls, and reports it with them."""
    slo = 0.05
    res = qsengine.simulate(prefill="colocated", slo_tpot=slo, seed=3, **dict(BASE, microbatches=2000))
    rec = res.to_record()
    side = res.moe
    stall = side.batch * _t_pf(side) / O
    assert side.prefill_stall == pytest.approx(stall, rel=1e-12) and stall > 0
    assert rec["moe_tpot_ms"] == pytest.approx((side.step.time + stall) * 1e3, rel=1e-9)
    assert rec["moe_tpot_p99_ms"] <= slo * 1e3 * (1 + 1e-12)
    assert rec["moe_tokens_per_s"] == pytest.approx(side.cluster_batch / side.step.time, rel=1e-9)


@pytest.mark.parametrize("prefill", ["none", "colocated", "disaggregated"])
def test_frontier_with_requests(prefill):
    """The frontier's TPOTs include the colocated stalls; its end-to-end column is B·dp/TPOT per GPU
    (colocated) or the harmonic combination with the prefill pool (disaggregated), nan without prefill; the
    chosen operating point lies on or under it; ratio_at takes the headline ratio's basis."""
    res = qsengine.simulate(prefill=prefill, slo_tpot=None, **BASE)
    front = res.frontier
    rec = res.to_record()
    gpus = res.cluster.num_gpus
    for name, side in (("moe", res.moe), ("dense", res.dense)):
        f = front[front["side"] == name]
        assert len(f) > 1
        assert (np.diff(f["tpot"].to_numpy()) >= 0).all()
        col = "tokens_per_s_per_gpu" if prefill == "none" else "request_tokens_per_s_per_gpu"
        assert (np.diff(f[col].to_numpy()) > 0).all()  # Pareto on the basis column
        if prefill == "none":
            assert f["request_tokens_per_s_per_gpu"].isna().all()
            continue
        e2e = f["request_tokens_per_s_per_gpu"].to_numpy()
        if prefill == "colocated":
            assert np.allclose(e2e, f["batch"] / f["tpot"] / gpus, rtol=1e-12)
        else:
            pool = rec[f"{name}_prefill_tokens_per_s_per_gpu"]
            want = 1 / (1 / f["tokens_per_s_per_gpu"] + (I / O) / pool)
            assert np.allclose(e2e, want, rtol=1e-12)
        # the operating point (the largest batch HBM holds, the best end-to-end plan) is on or under the frontier
        at = res.throughput_at(side.tpot * (1 + 1e-9), name, basis="end-to-end")
        assert rec[f"{name}_request_tokens_per_s_per_gpu"] <= at * (1 + 1e-9)
    r = res.ratio_at(0.06)
    d = res.throughput_at(0.06, "dense")
    m = res.throughput_at(0.06, "moe")
    assert r is None or r == pytest.approx(d / m, rel=1e-12)
    if prefill == "none":
        with pytest.raises(ValueError, match="basis='end-to-end'"):
            res.ratio_at(0.06, basis="end-to-end")
    with pytest.raises(ValueError, match="basis='x'"):
        res.ratio_at(0.06, basis="x")
