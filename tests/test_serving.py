"""Serving-engine memory policies and batch caps (qsengine.specs.serving, the
``serving`` point field): each engine's budget from its own formula, the KV
fraction in packing, the cap per scheduler, the pipeline equal to the slow
oracle under every policy, and bad input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qsengine
from _helpers import CLUSTERS, MOE_MODELS, assert_matches_oracle
from qsengine import Plan
from qsengine.packing import pack
from qsengine.specs.loaders import as_cluster, as_model
from qsengine.specs.serving import SERVING_POLICIES, serving_policy

EXACT = ("dense_model", "q", "qs", "moe_feasible", "moe_plan", "moe_batch", "moe_batch_limit", "moe_tokens_per_s",
         "moe_tpot_ms", "moe_tpot_p99_ms", "dense_feasible", "dense_plan", "dense_batch", "dense_batch_limit",
         "dense_tokens_per_s", "dense_tpot_ms", "dense_tpot_p99_ms", "verdict")


def test_sglang_fraction_is_its_heuristic_by_hand():
    """mem_fraction_static = (M - R)/M, R in MiB (sglang server_args._handle_gpu_memory_settings) for one
    8-GPU node: H200 (141 GB = 134,466 MiB, below 160 GiB): chunk 8192, graphs 512:
    R = 512 + 1.5*8192 + 2*512 + 1024 = 14,848; B200 (180 GB, above 160 GiB): chunk 16384:
    R = 512 + 24,576 + 1024 + 1024 = 27,136."""
    pol = serving_policy("sglang")
    for acc, r_mib in (("h200-sxm", 14848), ("b200", 27136)):
        a = as_cluster(f"8x{acc}").accelerator
        m = a.hbm_bytes / 2**20
        got = pol.accelerator(a)
        assert got.usable_hbm_fraction == round((m - r_mib) / m, 3)
        assert got.runtime_reserve_bytes == 0 and got.kv_fraction == 1.0 and pol.max_sequences(a) == 0


def test_vllm_and_trtllm_defaults():
    h100, a100 = as_cluster("8xh100").accelerator, as_cluster("8xa100").accelerator
    v, t = serving_policy("vllm"), serving_policy("TensorRT-LLM")
    assert v.max_sequences(h100) == 1024 and v.max_sequences(a100) == 256  # >= 70 GiB and not an A100
    assert v.accelerator(h100).usable_hbm_fraction == 0.9
    assert v.accelerator(h100).runtime_reserve_bytes == h100.runtime_reserve_bytes
    assert t.max_sequences(h100) == 2048
    assert t.accelerator(h100).kv_fraction == 0.9 and t.accelerator(h100).usable_hbm_fraction == 1.0
    assert serving_policy("qsengine").accelerator(h100) is h100


@pytest.mark.parametrize("model,cluster,plan", [("deepseek-v3", "8xh200", Plan(tp=8, ep=8, attn_dp=True)),
                                                ("llama-3.1-70b", "2xh100", Plan(tp=2)),
                                                ("qwen3-235b-a22b", "8xb200", Plan(tp=2, pp=2, dp=2, ep=2))])
def test_kv_gets_its_fraction_of_the_memory_left_after_weights(model, cluster, plan):
    """TensorRT-LLM's free_gpu_memory_fraction: per GPU, KV <= 0.9 x (usable - weights), and the batch is the
    largest that fits it (one more sequence would not)."""
    cl = as_cluster(cluster)
    acc = serving_policy("trtllm").accelerator(cl.accelerator)
    pk = pack(as_model(model), qsengine.Cluster(acc, cl.num_gpus), 8192, plan=plan)
    assert pk.feasible
    g = pk.gpu_map
    free_after_weights = g["kv"] + g["free"]
    assert (g["kv"] <= 0.9 * free_after_weights * (1 + 1e-12)).all()
    per_seq_unit = g["kv"] / pk.admissible_batch  # KV of one sequence per admission unit, per GPU
    assert ((pk.admissible_batch + 1) * per_seq_unit > 0.9 * free_after_weights).any()
    # the same budget with all of it for KV: 0.9 of its batch, to one sequence (floors)
    full = pack(as_model(model), qsengine.Cluster(dataclasses.replace(acc, kv_fraction=1.0), cl.num_gpus), 8192,
                plan=plan)
    assert abs(pk.admissible_batch - 0.9 * full.admissible_batch) <= 1


def test_cap_binds_per_scheduler():
    """vLLM's max_num_seqs (1024 on H200): a small MoE at a short context would hold far more sequences per
    GPU; capped, each scheduler runs at most 1024, the batch reports 'cap', and the throughput falls."""
    kw = dict(model="qwen3-30b-a3b", cluster="8xh200", context=256, microbatches=0, slo_tpot=None,
              plan=Plan(tp=1, dp=8, ep=1), break_even=False)
    free = qsengine.simulate(**kw)
    capped = qsengine.simulate(**kw, serving="vllm")
    assert free.moe.batch > 1024 and free.moe.batch_limit == "hbm"  # sequences per replica = per scheduler
    assert capped.moe.batch == 1024 and capped.moe.batch_limit == "cap"
    assert capped.moe.tokens_per_second < free.moe.tokens_per_second
    assert capped.inputs["serving"] == "vllm"
    # the frontier stops at the cap too
    assert capped.frontier[capped.frontier.side == "moe"].batch.max() <= 8 * 1024


serving_points = st.fixed_dictionaries({
    "model": st.sampled_from(MOE_MODELS),
    "cluster": st.sampled_from(CLUSTERS),
    "context": st.one_of(st.sampled_from([256, 1024, 8192, 32768]), st.integers(64, 131072)),
    "serving": st.sampled_from(list(SERVING_POLICIES)),
    "slo_tpot": st.sampled_from([None, 0.05, 0.1]),
    "microbatches": st.just(0),
    "break_even": st.just(False),
})


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pts=st.lists(serving_points, min_size=1, max_size=3))
def test_pipeline_equals_the_oracle_under_every_policy(pts):
    assert_matches_oracle(pts, exact=EXACT, close=("ratio",))


@pytest.mark.parametrize("serving", ["vllm", "sglang", "trtllm"])
def test_hand_picked_points_equal_the_oracle(serving):
    pts = [dict(model="deepseek-v3", cluster="8xh200", context=4096, microbatches=0, slo_tpot=None, serving=serving),
           dict(model="qwen3-30b-a3b", cluster="8xh100", context=256, microbatches=0, slo_tpot=None, serving=serving,
                precision="fp8", plan=Plan(tp=1, dp=8)),
           dict(model="qwen3-235b-a22b", cluster="8xb200", context=32768, microbatches=0, serving=serving)]
    got = [g for _, g in assert_matches_oracle(pts, exact=EXACT)]
    assert len(got) == len(pts)
    assert any(g["moe_batch_limit"] == "cap" or g["dense_batch_limit"] == "cap" for g in got) or serving == "sglang"


def test_default_policy_is_todays_model_exactly():
    kw = dict(model="deepseek-v3", cluster="8xh200", context=8192, microbatches=0)
    a, b = qsengine.simulate(**kw).to_record(), qsengine.simulate(**kw, serving="qsengine").to_record()
    assert {k: v for k, v in a.items() if not (isinstance(v, float) and np.isnan(v))} == \
           {k: v for k, v in b.items() if not (isinstance(v, float) and np.isnan(v))}


def test_sweep_over_policies():
    df = qsengine.sweep({"model": ["deepseek-v3"], "cluster": ["8xh200"], "context": [4096],
                         "serving": ["qsengine", "vllm", "trtllm"], "microbatches": [0], "slo_tpot": [None]},
                        progress=False)
    assert list(df["in_serving"]) == ["qsengine", "vllm", "trtllm"]
    assert df["moe_batch"].iloc[2] > df["moe_batch"].iloc[0]  # TRT-LLM: all HBM less 10% of the free part


@pytest.mark.parametrize("bad,exc,match", [("foo", ValueError, r"field 'serving' = 'foo': must be one of"),
                                           (3, TypeError, r"field 'serving' = 3: must be one of")])
def test_bad_policy_names_the_field(bad, exc, match):
    with pytest.raises(exc, match=match):
        qsengine.simulate(model="deepseek-v3", cluster="8xh200", context=4096, microbatches=0, serving=bad)
