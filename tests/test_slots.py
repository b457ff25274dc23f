"""Redundant expert slots (EPLB plans, ``Plan(redundant=R)``): packing charges
their bytes, the EPLB placement lowers the straggler under skewed routing (in
the routing Monte Carlo, an independent engine, and in the closed form, which
agrees with it), R = 0 leaves every lane untouched, and the search finds
EP72 for DeepSeek-V3 on a GB200 NVL72 rack."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import qsengine as q
from qsengine import Plan
from qsengine.decode.slots import slot_layout, slot_placement
from qsengine.decode.straggler import _inclusion_probabilities, moe_cost_coefficients, straggler_closed_form
from qsengine.packing import memory_description, pack, plans
from qsengine.specs.loaders import as_precision


def test_ep72_on_72_gb200_packs_deepseek_v3_with_its_slots_charged():
    m, c = q.load_model("deepseek-v3"), q.load_cluster("72xgb200")
    prec = as_precision("fp8")
    desc = memory_description(m, prec, c.accelerator)
    slots = Plan(dp=72, ep=72, redundant=32)
    assert slots.slots_per_gpu(m.routed_experts) == 4
    pk = pack(m, c, 32768, plan=slots, precision=prec)
    assert pk.feasible
    routed = pk.gpu_map["routed_experts"].to_numpy()
    want = 4 * m.moe_layers * desc.expert_bytes  # (256 + 32)/72 slots in every MoE layer, on every GPU
    assert np.allclose(routed, want, rtol=1e-12)
    # the bytes of 32 slots are charged against the KV cache: EP64 on 64 of the GPUs holds 4 experts per GPU
    # too, so a GPU of either plan admits the same number of sequences; 8 extra GPUs of slots buy 72/64 of it
    ep64 = pack(m, q.Cluster(c.accelerator, 64), 32768, plan=Plan(dp=64, ep=64), precision=prec)
    assert pk.admissible_batch == ep64.admissible_batch
    # with a popularity the slots are placed (EPLB) and the batch they cost is reported
    pop = np.arange(1, 257, dtype=float) ** -1.01
    pr = pack(m, c, 32768, plan=slots, precision=prec, popularity=pop)
    assert pr.cluster_batch == pk.cluster_batch
    rep = pr.replication
    assert rep is not None and rep.replicas == 32 and int(rep.expert_copies.sum()) == 256 + 32
    assert rep.imbalance_after < rep.imbalance_before
    assert rep.batch_cost > 0
    # the search lists it: slots only where EP spans the stage, the smallest count that makes ep divide E + R
    listed = plans(m, c)
    assert slots in listed and Plan(dp=72, ep=72) not in listed
    assert all((m.routed_experts + p.redundant) % p.ep == 0 and p.redundant < p.ep for p in listed)
    assert all(p.redundant == 0 or p.ep == p.dp * p.tp for p in listed)


def test_pack_refuses_extra_replicas_on_a_plan_with_slots():
    with pytest.raises(ValueError, match=r"replicas=8: plan tp1-pp1-dp72-ep72-red32 already holds redundant=32"):
        pack("deepseek-v3", "72xgb200", 4096, plan=Plan(dp=72, ep=72, redundant=32), replicas=8)


@pytest.mark.parametrize("experts, ep, red", [(256, 72, 32), (256, 48, 32), (128, 12, 4), (8, 6, 4), (16, 4, 8)])
def test_slot_layout_fills_every_gpu_and_the_placement_is_the_engines(experts, ep, red):
    load = _inclusion_probabilities(np.arange(1, experts + 1, dtype=float) ** -1.2, 2)
    lay = slot_layout(load, ep, red)
    per = (experts + red) // ep
    assert lay.expert.shape == (experts + red,) and lay.per_gpu == per
    assert np.array_equal(np.bincount(lay.expert, minlength=experts), lay.copies)
    for g in range(ep):
        on = lay.expert[g * per:(g + 1) * per]
        assert np.unique(on).size == per  # no two copies of an expert on one GPU
    pl = slot_placement(experts, 2, ep, red, load)
    gpus = pl.expert_gpus(experts)
    assert [len(x) for x in gpus] == lay.copies.tolist()
    assert np.array_equal(np.bincount([g for x in gpus for g in x], minlength=ep), np.full(ep, per))


def _mc_and_closed_form(ep: int, red: int, alpha: float, tokens: int, seed: int = 7):
    """Mean straggler of one layer: routing Monte Carlo with the plan's placement, and the closed form."""
    m = q.load_model("qwen3-30b-a3b")
    prec, acc = as_precision("bf16"), q.load_accelerator("h100")
    plan = Plan(dp=ep, ep=ep, redundant=red)
    a, b = moe_cost_coefficients(m, prec, acc, plan)
    pop = np.arange(1, m.routed_experts + 1, dtype=float) ** -alpha
    pi = _inclusion_probabilities(pop, m.top_k)
    placement = slot_placement(m.routed_experts, m.top_k, ep, red, pi) if red else q.Placement.contiguous(ep)
    stats = q.route(m.routed_experts, m.top_k, tokens, 4000, routing=f"powerlaw:{alpha}", placement=placement,
                    seed=seed, layers=1, cost=(a, b))
    cf, _ = straggler_closed_form(m.routed_experts, m.top_k, np.array([float(tokens)]), np.array([ep]),
                                  np.array([a]), np.array([b]), pi, np.array([red]) if red else None)
    return stats.step_time.mean, float(cf[0])


@pytest.mark.parametrize("tokens, gain", [(64, 0.97), (2048, 0.6)])
def test_eplb_slots_lower_the_monte_carlo_straggler_under_power_law_routing(tokens, gain):
    """Qwen3-30B-A3B (E=128, k=8) at EP8: 8 redundant slots (one per GPU) placed
    from the power-law (alpha 1.2) popularity lower the routing Monte Carlo's mean
    straggler (at 2048 tokens the hot GPU's assignments bind: by more than 40%), and
    the closed form follows the Monte Carlo (within 3%) with and without them."""
    mc0, cf0 = _mc_and_closed_form(8, 0, 1.2, tokens)
    mc8, cf8 = _mc_and_closed_form(8, 8, 1.2, tokens)
    assert mc8 < gain * mc0
    assert cf8 < gain * cf0
    assert cf0 == pytest.approx(mc0, rel=0.03)
    assert cf8 == pytest.approx(mc8, rel=0.03)


def test_slots_cost_a_read_when_every_expert_is_touched():
    """At 512 tokens every slot is touched and reads bind: 17 slots per GPU
    instead of 16 make the straggler ~1/16 slower, in the Monte Carlo and the
    closed form alike (slots are not free)."""
    mc0, cf0 = _mc_and_closed_form(8, 0, 1.2, 512)
    mc8, cf8 = _mc_and_closed_form(8, 8, 1.2, 512)
    assert mc8 > mc0 and cf8 > cf0
    assert mc8 / mc0 == pytest.approx(17 / 16, rel=0.02)
    assert cf8 == pytest.approx(mc8, rel=0.03)


def test_slots_cost_kv_and_buy_a_faster_step_in_simulate():
    """At a fixed cluster batch under power-law routing (Monte Carlo), the plan with
    slots is faster; its packing admits fewer sequences (the slots' bytes)."""
    kw = dict(model="qwen3-30b-a3b", cluster="8xh100", context=1024, routing="powerlaw:1.2", batch=2048,
              microbatches=2000, seed=3, break_even=False, q=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", q.ContextWarning)
        r0 = q.simulate(plan=Plan(dp=8, ep=8), **kw)
        r8 = q.simulate(plan=Plan(dp=8, ep=8, redundant=8), **kw)
    assert r8.moe.plan == Plan(dp=8, ep=8, redundant=8)
    assert r8.moe.tpot < r0.moe.tpot
    p0 = pack("qwen3-30b-a3b", "8xh100", 1024, plan=Plan(dp=8, ep=8))
    p8 = pack("qwen3-30b-a3b", "8xh100", 1024, plan=Plan(dp=8, ep=8, redundant=8))
    assert p8.cluster_batch < p0.cluster_batch


def test_zero_redundant_lanes_are_bit_identical():
    """The slot code path is only entered by lanes with R > 0: a zero redundant
    array gives the same bits as none, with and without popularity."""
    E, k = 256, 8
    B = np.array([1.0, 37.0, 512.0, 4096.0])
    G = np.array([8, 16, 32, 64])
    a, b = np.full(4, 1e-5), np.full(4, 2e-7)
    for pi in (None, _inclusion_probabilities(np.arange(1, E + 1, dtype=float) ** -1.01, k)):
        m0, s0 = straggler_closed_form(E, k, B, G, a, b, pi)
        m1, s1 = straggler_closed_form(E, k, B, G, a, b, pi, np.zeros(4, dtype=np.int64))
        assert np.array_equal(m0, m1) and np.array_equal(s0, s1)


def test_uniform_slots_read_more_bytes_when_everything_is_touched():
    """Uniform routing at a large batch touches every slot: the straggler reads
    (E+R)/ep experts, so the slots only cost (4 -> 5 per GPU at EP64, R=64)."""
    E, k = 256, 8
    B = np.array([1e6])
    a, b = np.array([1e-5]), np.array([1e-12])
    m0, _ = straggler_closed_form(E, k, B, np.array([64]), a, b)
    m1, _ = straggler_closed_form(E, k, B, np.array([64]), a, b, None, np.array([64]))
    assert m0[0] == pytest.approx(4e-5, rel=1e-6)
    assert m1[0] == pytest.approx(5e-5, rel=1e-6)


def test_deepseek_v3_on_gb200_nvl72_wins_with_ep72_slots():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", q.ContextWarning)
        r = q.simulate(model="deepseek-v3", cluster="72xgb200", context=32768, microbatches=0, break_even=False)
    assert r.moe.plan == Plan(dp=72, ep=72, redundant=32)
