"""The EP all-to-all buffers in the HBM budget (docs/packing.md "All-to-all buffers").

DeepEP's low-latency buffers (csrc/legacy/config.hpp ``LowLatencyLayout``) grow with
the tokens a GPU dispatches per step; the packer charges them per admitted sequence on
every GPU of a stage with decode MoE layers under ep > 1."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qsengine
from qsengine import Plan
from qsengine.packing import a2a_buffer_bytes_per_token
from qsengine.specs import as_cluster, as_model
from reference_packing import deepep_low_latency_bytes


def test_deepseek_v3_buffer_per_token_from_the_layout():
    # H = 7168: 56 scale groups; dispatch message 16 + max(14336, 7168 + 224) = 14352 B,
    # combine message 56*4 + 14336 = 14560 B; E = 256:
    # 2 * (256 * 14560 + 256 * max(14352, 14560)) = 14,909,440 B per token of T
    assert a2a_buffer_bytes_per_token(7168, 256) == 2 * (256 * 14560 + 256 * 14560) == 14_909_440


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([1024, 2048, 2880, 4096, 5120, 6144, 7168]), st.sampled_from([2, 8, 16, 64, 128, 256, 384]),
       st.integers(1, 512))
def test_linear_in_tokens_and_equal_to_the_layout(hidden, experts, tokens):
    per = a2a_buffer_bytes_per_token(hidden, experts)
    assert math.isclose(per * tokens, deepep_low_latency_bytes(hidden, experts, tokens), rel_tol=1e-12)


@pytest.mark.parametrize("plan", [Plan(tp=8, ep=8, attn_dp=True), Plan(tp=8, ep=8), Plan(tp=4, pp=2, ep=4)])
def test_admission_closed_form_with_buffers(plan):
    """Per GPU: B = floor((usable - weights) / (KV per sequence + buffer per sequence)), the buffer per
    sequence a2a_bytes_per_token * 1/(pp * shard) (shard = tp, or 1 under attention-DP)."""
    m = as_model("deepseek-v3")
    p = qsengine.pack(m, "8xh200", 8192, plan=plan, precision="fp8")
    shard = 1 if plan.attn_dp else plan.tp
    per_tok = a2a_buffer_bytes_per_token(m.hidden_size, m.routed_experts)
    g = p.gpu_map
    assert np.allclose(g["a2a_per_sequence"], per_tok / (plan.pp * shard), rtol=1e-12)
    usable = as_cluster("8xh200").accelerator.usable_bytes
    from qsengine.packing import COMPONENTS

    weights = g[list(COMPONENTS)].sum(axis=1)
    per = g["kv_per_sequence"] + g["a2a_per_sequence"]
    want = np.floor((usable - weights) / per).astype(np.int64)
    assert p.admissible_batch == int(want.min())
    # the map places the buffers of the admitted sequences and still stacks to the HBM
    assert np.allclose(g["a2a"], p.admissible_batch * g["a2a_per_sequence"], rtol=1e-12)
    assert (g["free"] >= 0).all()


def test_buffers_cost_sequences_and_only_under_expert_parallelism():
    m = as_model("deepseek-v3")
    ep = qsengine.pack(m, "8xh200", 4096, plan=Plan(tp=8, ep=8, attn_dp=True), precision="fp8")
    no_ep = qsengine.pack(m, "8xh200", 4096, plan=Plan(tp=8), precision="fp8")
    dense = qsengine.pack("llama-3.1-70b", "8xh200", 4096, plan=Plan(tp=8), precision="fp8")
    assert (ep.gpu_map["a2a"] > 0).all()
    assert (no_ep.gpu_map["a2a"] == 0).all() and (dense.gpu_map["a2a"] == 0).all()
    # 14.9 MB per sequence against ~144 MB of KV at 4K: about 9% fewer sequences than without buffers
    kv = ep.gpu_map["kv_per_sequence"].iloc[0]
    a2a = ep.gpu_map["a2a_per_sequence"].iloc[0]
    free = ep.gpu_map["kv"].iloc[0] + ep.gpu_map["a2a"].iloc[0] + ep.gpu_map["free"].iloc[0]
    assert ep.admissible_batch == math.floor(free / (kv + a2a))
    assert math.floor(free / kv) > ep.admissible_batch >= 0.85 * math.floor(free / kv)


def test_draft_tokens_scale_the_buffer():
    m = as_model("deepseek-v3")
    plan = Plan(tp=8, ep=8, attn_dp=True)
    one = qsengine.pack(m, "8xh200", 4096, plan=plan, precision="fp8", draft_module=True)
    three = qsengine.pack(m, "8xh200", 4096, plan=plan, precision="fp8", draft_module=True, draft_tokens=2)
    assert np.allclose(three.gpu_map["a2a_per_sequence"], 3 * one.gpu_map["a2a_per_sequence"], rtol=1e-12)
    assert three.admissible_batch < one.admissible_batch
    with pytest.raises(ValueError, match="draft_tokens=-1"):
        qsengine.pack(m, "8xh200", 4096, plan=plan, precision="fp8", draft_tokens=-1)


def test_pipeline_admits_what_the_packer_admits():
    """simulate's MoE side at a fixed plan holds the packer's batch (buffers included), with and without
    speculative decoding."""
    plan = Plan(tp=8, ep=8, attn_dp=True)
    for draft in (0, 2):
        r = qsengine.simulate("deepseek-v3", "8xh200", context=4096, plan=plan, slo_tpot=None, microbatches=0,
                              draft_tokens=draft, acceptance=0.8 if draft else 0.0)
        pk = qsengine.pack("deepseek-v3", "8xh200", 4096, plan=plan, draft_module=draft > 0, draft_tokens=draft)
        assert r.moe.admissible_batch == pk.admissible_batch
        assert r.moe.packing.gpu_map["a2a"].iloc[0] == pytest.approx(pk.gpu_map["a2a"].iloc[0], rel=1e-12)
