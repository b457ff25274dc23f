"""Packing: worked physics cases, API surface, bad input."""

from __future__ import annotations

import json
import math

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest

import qsengine
from qsengine import Cluster, Plan, Precision, Workload
from qsengine.packing import COMPONENTS, memory_description, search_plans

from _presets_for_packing import DEEPSEEK_V3, H100, H200, LLAMA_31_70B, QWEN3_235B, SWITCH_C, dense_twin


# ------------------------------------------------------------------ physics
@pytest.mark.parametrize("acc", [H100, H200], ids=["h100", "h200"])
def test_switch_c_infeasible_on_one_node_while_dense_twin_fits_one_gpu(acc):
    total_bytes = SWITCH_C.total_params * 2
    assert total_bytes == pytest.approx(3.14e12, rel=0.01)  # ~3.1 TB of bf16 weights
    ranked = qsengine.rank_plans(SWITCH_C, Cluster(acc, 8), 512)
    assert len(ranked) > 0 and not ranked["feasible"].any()
    p = qsengine.pack(SWITCH_C, Cluster(acc, 8), 512)
    assert not p.feasible and p.binding_constraint == "weights"
    assert "usable" in p.reason and p.cluster_batch == 0
    # the least overfull plan spreads the weights over all 8 GPUs
    assert p.weight_bytes.max() == pytest.approx(total_bytes / 8, rel=0.01)
    # nothing is placed beyond capacity: the excess is reported as overflow
    assert (p.column("kv") == 0).all() and (p.column("overflow") > 0).all()

    twin = dense_twin(SWITCH_C)  # q = 1/sqrt(s): N_dense = sqrt(N_active * N_total) ~ 47.6B
    assert twin.total_params == pytest.approx(math.sqrt(SWITCH_C.active_params * SWITCH_C.total_params), rel=0.01)
    # bf16 twin (95 GB) fits one H200; on an H100 it needs fp8
    prec = "bf16" if acc is H200 else "fp8"
    t = qsengine.pack(twin, Cluster(acc, 1), 512, precision=prec)
    assert t.feasible and t.admissible_batch > 0, t.reason


def test_switch_c_min_gpus_and_dense_twin_min_gpus():
    g = qsengine.min_gpus(SWITCH_C, H200, 512)
    assert g is not None and g > 8
    assert g >= math.ceil(SWITCH_C.total_params * 2 / H200.usable_bytes)
    assert qsengine.rank_plans(SWITCH_C, Cluster(H200, g), 512)["feasible"].any()
    assert not qsengine.rank_plans(SWITCH_C, Cluster(H200, g - 1), 512)["feasible"].any()
    assert qsengine.min_gpus(dense_twin(SWITCH_C), H200, 512) == 1


def test_mla_latent_kv_is_not_split_across_tp():
    p = qsengine.pack(DEEPSEEK_V3, Cluster(H200, 16), 4096, plan=Plan(tp=8, dp=2, ep=16), precision="fp8")
    per_seq = p.column("kv_per_sequence")
    want = DEEPSEEK_V3.kv_bytes_per_sequence(4096, 1.0)  # whole latent on every TP rank
    assert np.allclose(per_seq, want, rtol=1e-12)


def test_gqa_kv_split_over_tp_down_to_one_head_then_replicated():
    full = QWEN3_235B.kv_bytes_per_sequence(8192, 2.0)  # 4 KV heads
    for tp, frac in [(1, 1.0), (2, 0.5), (4, 0.25), (8, 0.25)]:
        p = qsengine.pack(QWEN3_235B, Cluster(H200, 8), 8192, plan=Plan(tp=tp, dp=8 // tp, ep=8))
        assert np.allclose(p.column("kv_per_sequence"), full * frac, rtol=1e-12), tp
    llama = qsengine.pack(LLAMA_31_70B, Cluster(H100, 4), 8192, plan=Plan(tp=4))
    assert np.allclose(llama.column("kv_per_sequence"), LLAMA_31_70B.kv_bytes_per_sequence(8192) / 4)


def test_attn_dp_each_gpu_holds_its_own_sequences_full_kv():
    plan = Plan(tp=8, ep=8, attn_dp=True)
    p = qsengine.pack(DEEPSEEK_V3, Cluster(H200, 8), 4096, plan=plan, precision="fp8")
    assert len(p.replica_batches) == 8  # dp*tp attention replicas
    assert p.cluster_batch == p.replica_batches.sum()
    # attention is replicated, not sharded
    assert p.gpu_map["attention"].iloc[0] == pytest.approx(DEEPSEEK_V3.params_by_component()["attention"] * (1 + 4 / 128**2))
    assert np.allclose(p.column("kv"), p.replica_batches * DEEPSEEK_V3.kv_bytes_per_sequence(4096, 1.0))


def test_deepseek_fp8_on_8xh200_long_context_batch_is_kv_bound():
    p = qsengine.pack(DEEPSEEK_V3, Cluster(H200, 8), 131072, precision="fp8")
    assert p.feasible and p.binding_constraint == "kv"
    # the admissible batch is the free HBM of the binding GPU over one sequence's KV there
    g = p.binding_gpu
    row = p.gpu_map.iloc[g]
    free_before_kv = row["free"] + row["kv"]
    assert p.admissible_batch == int(free_before_kv // row["kv_per_sequence"])
    assert row["free"] < row["kv_per_sequence"]


def test_auto_plan_is_best_ranked_and_ties_prefer_less_communication():
    cl = Cluster(H200, 8)
    ranked = qsengine.rank_plans(QWEN3_235B, cl, 32768)
    p = qsengine.pack(QWEN3_235B, cl, 32768)
    assert p.cluster_batch == ranked["cluster_batch"].max()
    assert p.plan.label == ranked["plan"].iloc[0]
    best = ranked[ranked["cluster_batch"] == ranked["cluster_batch"].max()]
    comm = best["tp"] * best["pp"]
    assert p.plan.tp * p.plan.pp == comm.min()
    assert p.plan.ep == best[comm == comm.min()]["ep"].min()


def test_plans_cover_rules():
    ps = qsengine.plans(DEEPSEEK_V3, Cluster(H200, 8))
    assert Plan(tp=8) in ps and Plan(tp=8, ep=8) in ps and Plan(tp=8, ep=8, attn_dp=True) in ps
    assert all(p.num_gpus == 8 for p in ps)
    assert len(set(ps)) == len(ps)
    dense = qsengine.plans(LLAMA_31_70B, 8)
    assert all(p.ep == 1 for p in dense) and all(p.tp > 1 for p in dense if p.attn_dp)
    assert Plan(tp=8, attn_dp=True) in dense  # attention DP + TP FFN
    assert Plan(tp=3) not in qsengine.plans(LLAMA_31_70B, 3)  # 3 does not divide 64 heads


def test_precision_presets_and_memory_description():
    d_bf16 = memory_description(DEEPSEEK_V3, None, H200)
    d_fp8 = memory_description(DEEPSEEK_V3, "fp8", H200)
    assert d_fp8.expert_bytes == pytest.approx(d_bf16.expert_bytes / 2 * (1 + 4 / 128**2))
    assert d_fp8.kv_bytes_per_token_per_layer == 576 and d_bf16.kv_bytes_per_token_per_layer == 1152
    assert sum(d_bf16.layer_is_moe) == 58 and d_bf16.layer_is_moe[:3] == [0, 0, 0]
    d_sw = memory_description(SWITCH_C, None, H200)
    assert sum(d_sw.layer_has_kv) == 15 and d_sw.layer_has_kv[:15] == [0] * 15
    assert qsengine.pack(LLAMA_31_70B, Cluster(H200, 2), 1024, precision=Precision()).feasible


def test_local_layers_cap_kv():
    att = LLAMA_31_70B.attention.__class__(kind="gqa", num_heads=64, num_kv_heads=8, head_dim=128,
                                           local_layers=40, local_window=1024)
    m = LLAMA_31_70B.replace(attention=att, id="llama-local")
    p = qsengine.pack(m, Cluster(H200, 4), 65536, plan=Plan(tp=4))
    assert p.column("kv_per_sequence")[0] == pytest.approx(m.kv_bytes_per_sequence(65536) / 4, rel=1e-12)
    full = qsengine.pack(LLAMA_31_70B, Cluster(H200, 4), 65536, plan=Plan(tp=4))
    assert p.admissible_batch > full.admissible_batch


# ------------------------------------------------------------------ API surface
def test_summary_plot_to_dict_and_pandas():
    p = qsengine.pack(QWEN3_235B, Cluster(H200, 8), 32768, plan=Plan(tp=2, dp=4, ep=8), replicas=8,
                      popularity=np.arange(1, 129, dtype=float) ** -1.2)
    text = p.summary()
    assert "FEASIBLE" in text and "routed_experts" in text and "imbalance" in text
    assert str(p) == text
    ax = p.plot()
    assert ax.get_ylabel() == "HBM (GB)" and len(ax.patches) >= 8 * 4
    d = p.to_dict()
    json.dumps(d)
    assert d["plan"]["label"] == p.plan.label and d["replication"]["replicas"] == 8
    df = p.to_pandas()
    assert isinstance(df, pd.DataFrame) and len(df) == 8
    assert set(COMPONENTS) <= set(df.columns)
    stack = df[list(COMPONENTS) + ["replicas", "kv", "a2a", "reserve", "unusable", "free"]].sum(axis=1)
    assert np.allclose(stack - df["overflow"], H200.hbm_bytes, rtol=1e-12)


def test_infeasible_plot_is_agg_safe():
    p = qsengine.pack(SWITCH_C, Cluster(H100, 8), 512)
    ax = p.plot()
    assert "infeasible" in ax.get_title()


def test_search_plans_many_cluster_sizes():
    df = search_plans(DEEPSEEK_V3, H200, 8192, max_gpus=64, precision="fp8")
    assert set(df["num_gpus"]) == set(range(1, 65))
    assert not df[df["num_gpus"] < 5]["feasible"].any()
    first = df.groupby("num_gpus")["cluster_batch"].first()
    assert (first == df.groupby("num_gpus")["cluster_batch"].max()).all()


def test_cli_pack(capsys):
    from qsengine.cli import main

    rc = main(["pack", "--model", "deepseek-v3", "--cluster", "8xH200", "--context", "4096", "--precision", "fp8"])
    out = capsys.readouterr()
    assert rc == 0 and "plan" in out.out


# ------------------------------------------------------------------ bad input
CL8 = Cluster(H200, 8)


@pytest.mark.parametrize(
    "kwargs, exc, needle",
    [
        (dict(plan=Plan(tp=2, dp=2)), ValueError, "field 'tp*pp*dp' = 4: must equal the cluster's GPUs (8)"),
        (dict(plan=lambda: Plan(tp=8, pp=1, dp=1, ep=3)), ValueError, "field 'ep' = 3"),
        (dict(plan=lambda: Plan(tp=8, ep=8, etp=16)), ValueError, "field 'ep' = 8"),
        (dict(context=0), ValueError, "context=0"),
        (dict(context=-5), ValueError, "context=-5"),
        (dict(context=4096.5), TypeError, "context"),
        (dict(replicas=-1), ValueError, "replicas=-1"),
        (dict(replicas=10**6, plan=Plan(ep=8, dp=8)), ValueError, "replicas=1000000"),
        # refused from the ranks' total room, before any O(replicas) work (this used to hang)
        (dict(replicas=2**53, plan=Plan(ep=8, dp=8)), ValueError, "replicas=9007199254740992: expert replicas do not fit"),
        (dict(popularity=np.zeros(128), plan=Plan(ep=8, dp=8)), ValueError, "no mass"),
        (dict(popularity=np.full(128, np.nan), plan=Plan(ep=8, dp=8)), ValueError, "popularity[0]=nan"),
        (dict(popularity=np.ones(7)), ValueError, "one value per routed expert"),
        (dict(lengths=[]), ValueError, "no mass"),
        (dict(lengths=[100, 0, 5]), ValueError, "lengths[1]=0"),
        (dict(lengths=[100.0, np.nan]), ValueError, "lengths"),
        (dict(lengths=lambda: Workload.distribution([100, 200], [0.0, 0.0]), num_sequences=10), ValueError,
         "positive total mass"),
        (dict(block_size=16), ValueError, "block_size"),
        (dict(lengths=[10, 20], block_size=0), ValueError, "block_size=0"),
        (dict(precision="fp3"), ValueError, "'fp3'"),
        (dict(plan="best"), ValueError, "plan='best'"),
        (dict(threads=0), ValueError, "threads=0"),
    ],
)
def test_bad_input_raises_naming_the_field(kwargs, exc, needle):
    args = dict(model=QWEN3_235B, cluster=CL8, context=4096)
    with pytest.raises(exc) as info:
        # Plans that are invalid on their own are refused when constructed.
        args.update({k: v() if callable(v) else v for k, v in kwargs.items()})
        qsengine.pack(**args)
    assert needle in str(info.value)


def test_bad_heads_and_accelerator():
    with pytest.raises(ValueError, match=r"field 'tp' = 3: must divide num_heads \(64\)"):
        qsengine.pack(LLAMA_31_70B, Cluster(H200, 3), 1024, plan=Plan(tp=3))
    with pytest.raises(ValueError, match="hbm_bytes"):
        qsengine.pack(LLAMA_31_70B, Cluster(H200.__class__(**{**H200.__dict__, "hbm_bytes": float("nan")}), 1), 1024)
    with pytest.raises(ValueError, match="usable HBM"):
        qsengine.pack(LLAMA_31_70B, Cluster(H200.__class__(**{**H200.__dict__, "runtime_reserve_bytes": 200e9}), 1), 1)
    with pytest.raises(ValueError, match="expert replication needs a MoE"):
        qsengine.pack(LLAMA_31_70B, Cluster(H200, 2), 1024, replicas=2)
    with pytest.raises(TypeError, match="model: must be a Model"):
        qsengine.pack(42, CL8, 1024)
