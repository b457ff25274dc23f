"""The evaluation pipeline (qsengine.decode.pipeline): equal to a slow,
obvious reference (tests/reference_simulate.py), independent of what else is
in the call, and simulate is its one-lane case."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas.testing as pdt
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import qsengine
import reference_simulate as ref
from _helpers import CLUSTERS, MOE_MODELS, point_strategy, assert_matches_oracle, records, valid_point
from qsengine import Plan
from qsengine.decode.pipeline import RECORD_COLUMNS, encode_points, evaluate_columns
from qsengine.packing import admissible_batches, pack, plan_memory
from qsengine.specs.loaders import as_cluster, as_model, as_precision
from qsengine.sweeps.executors import simulate_point

DENSE = ["llama-3.1-70b", "qwen3-32b", "llama-3.1-8b"]


points = point_strategy()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(points, min_size=1, max_size=3))
@example(pts=[dict(model="deepseek-r1", cluster="8xh200", context=32768, precision="fp8", microbatches=0,
                   plan=Plan(tp=8, ep=8, attn_dp=True), break_even=True)])
@example(pts=[dict(model="mixtral-8x7b", cluster="8xh100", context=8192, dense="llama-3.1-70b", microbatches=0),
              dict(model="qwen3-235b-a22b", cluster="16xh100", context=4096, twin_attention="gqa", q=3.0,
                   microbatches=0, slo_tpot=0.03)])
@example(pts=[dict(model="deepseek-v3", cluster="16xh100", context=8192, precision="fp8", batch=64, microbatches=0),
              dict(model="qwen3-235b-a22b", cluster="8xh200", context=32768, batch=100000, microbatches=0)])
@example(pts=[dict(model="deepseek-v3", cluster="72xgb200", context=32768, microbatches=0, routing="powerlaw:1.01",
                   plan=Plan(dp=72, ep=72, redundant=32), slo_tpot=0.05, break_even=False),
              dict(model="grok-1", cluster="16xh100", context=8192, microbatches=0, routing="powerlaw:1.01",
                   q=2.0)])
def test_pipeline_equals_the_slow_reference(pts):
    """Several points in one call, each equal to the plain computation."""
    assert_matches_oracle(pts)


def test_fixed_batch_is_the_step_model_at_that_batch():
    from qsengine.decode.step import decode_step

    res = qsengine.simulate("deepseek-v3", "8xh200", 32768, precision="fp8", microbatches=0, batch=64)
    for side in (res.moe, res.dense):
        assert side.cluster_batch == 64 and side.batch_limit == "fixed"
        want = decode_step(side.model, as_precision("fp8"), as_cluster("8xh200").accelerator, side.plan,
                           64 // side.plan.dp, 32768)
        assert side.step.time == want.time and side.tokens_per_second == pytest.approx(64 / want.time, rel=1e-12)
    with pytest.raises(ValueError, match="not both"):
        qsengine.simulate("deepseek-v3", "8xh200", 32768, batch=64, slo_tpot=0.03, microbatches=0)
    with pytest.raises(ValueError, match="field 'batch' = 0"):
        qsengine.simulate("deepseek-v3", "8xh200", 32768, batch=0, microbatches=0)


def test_latency_target_holds_on_p99():
    free = qsengine.simulate("qwen3-235b-a22b", "8xh200", 8192, precision="fp8", microbatches=0, break_even=False,
                             routing="powerlaw:1.2")
    target = free.moe.step.time_p99 * 0.6
    capped = qsengine.simulate("qwen3-235b-a22b", "8xh200", 8192, precision="fp8", microbatches=0,
                               break_even=False, routing="powerlaw:1.2", slo_tpot=target)
    for side in (capped.moe, capped.dense):
        assert side.step.time_p99 <= target and side.batch_limit == "slo"
    mc = qsengine.simulate("qwen3-235b-a22b", "8xh200", 8192, precision="fp8", microbatches=300, seed=1,
                           break_even=False, routing="powerlaw:1.2", slo_tpot=target)
    assert mc.moe.step.time_p99 <= target or mc.moe.batch == 1


def test_default_compares_at_equal_latency_with_max_throughput_beside():
    from qsengine.decode.point import DEFAULT_SLO_TPOT

    kw = dict(model="deepseek-v3", cluster="16xh200", context=8192, microbatches=0, break_even=False)
    res = qsengine.simulate(**kw)
    assert res.inputs["slo_tpot"] == DEFAULT_SLO_TPOT == 0.05
    for side in (res.moe, res.dense):  # both sides under the same p99 target
        assert side.step.time_p99 <= DEFAULT_SLO_TPOT
    free = qsengine.simulate(**kw, slo_tpot=None)
    assert free.dense.step.time_p99 > DEFAULT_SLO_TPOT  # here the target binds: the two ratios differ
    rec, frec = res.to_record(), free.to_record()
    assert res.ratio_max_throughput == free.ratio == frec["ratio_max_throughput"] != res.ratio
    for side in ("moe", "dense"):
        assert rec[f"{side}_max_plan"] == frec[f"{side}_plan"] and rec[f"{side}_max_batch"] == frec[f"{side}_batch"]
        assert rec[f"{side}_max_tpot_ms"] == frec[f"{side}_tpot_ms"]
    assert "at maximum throughput" in res.summary() and "p99 TPOT <= 50 ms" in res.summary()
    fixed = qsengine.simulate(**kw, batch=64)  # the default target does not apply to a fixed batch
    assert fixed.ratio_max_throughput == fixed.ratio


def test_max_throughput_of_a_monte_carlo_point_is_its_own_monte_carlo():
    kw = dict(model="qwen3-235b-a22b", cluster="8xh200", context=8192, precision="fp8", microbatches=400,
              routing="powerlaw:1.2", seed=5, break_even=False)
    res = qsengine.simulate(**kw, slo_tpot=0.02)
    free = qsengine.simulate(**kw, slo_tpot=None)
    assert res.moe.batch_limit == "slo"
    assert res.ratio_max_throughput == free.ratio  # the same Monte Carlo (same seed) at the HBM-max point


def test_dense_attention_dp_keeps_the_ffn_tensor_parallel():
    """A dense model under attn_dp: attention and norms replicated on every GPU,
    FFN, embedding and LM head split tp ways (packing), the FFN computing all
    the replica's tokens on its shard plus a gather/scatter per dense layer
    (step), and plan "auto" picks it for the MLA twin at long context."""
    from qsengine.decode.step import decode_step

    res = qsengine.simulate("deepseek-v3", "16xh200", 131072, microbatches=0, break_even=False)
    plan = res.dense.plan
    assert plan.attn_dp and plan.tp > 1
    twin, prec = res.dense.model, as_precision("fp8")
    m = qsengine.pack(twin, "16xh200", 131072, plan=plan, precision=prec).gpu_map
    stage0 = m[m["stage"] == 0]
    assert stage0["attention"].nunique() == 1 and stage0["dense_ffn"].nunique() == 1
    layers0 = twin.num_layers // plan.pp if twin.num_layers % plan.pp == 0 else None
    if layers0 is not None:
        assert stage0["dense_ffn"].iloc[0] == pytest.approx(layers0 * twin.dense_ffn_params * prec.weight_bytes
                                                            / plan.tp, rel=1e-12)
        assert stage0["attention"].iloc[0] == pytest.approx(layers0 * twin.attention_params * prec.weight_bytes,
                                                            rel=1e-12)
    b = res.dense.batch
    st = decode_step(twin, prec, as_cluster("16xh200").accelerator, plan, b, 131072)
    ffn = st.piece("dense ffn")
    assert ffn.bytes == pytest.approx(twin.decode_dense_layers * twin.dense_ffn_params * prec.weight_bytes / plan.tp)
    assert ffn.flops == pytest.approx(twin.decode_dense_layers * 2 * (b / plan.pp) * twin.dense_ffn_params / plan.tp)
    gs = st.piece("attention-dp gather/scatter")
    assert gs.count == twin.decode_dense_layers + 1 and gs.time > 0
    # replicating the FFN too (the MoE's attn_dp) held this twin to 0.59x the MoE at 128K (docs/headline.md
    # before this plan existed); attention DP + TP FFN serves more than the MoE
    assert res.ratio > 1.0


def test_plans_may_leave_gpus_idle_and_they_count_per_gpu(monkeypatch):
    """On a cluster that is not a power of two, plan "auto" also deploys on the
    largest power of two below (the rest idle): the candidates come in that
    order, a plan on fewer GPUs is packed on its own GPUs, its idle GPUs are
    reported and still divide the per-GPU throughput, and the choice is never
    worse than the best plan on the smaller count."""
    import qsengine.decode.sides as sides
    from qsengine.decode.sides import candidate_plans, idle_candidates

    assert idle_candidates(72) == (72, 64) and idle_candidates(12) == (12, 8) and idle_candidates(16) == (16,)
    assert idle_candidates(1) == (1,)
    cands = candidate_plans(as_model("deepseek-v3"), as_cluster("72xgb200"))
    assert cands[0].num_gpus == 72 and {p.num_gpus for p in cands} == {72, 64}
    assert [p.num_gpus for p in cands] == sorted((p.num_gpus for p in cands), reverse=True)
    kw = dict(model="deepseek-v3", cluster="72xgb200", context=32768, microbatches=0, slo_tpot=None,
              break_even=False)
    best = qsengine.simulate(**kw)
    # only the 64-GPU candidates: the deployment leaves 8 GPUs idle
    sides._FAMILIES.clear()
    monkeypatch.setattr(sides, "candidate_plans", lambda m, c: [p for p in candidate_plans(m, c)
                                                                if p.num_gpus == 64])
    try:
        res = qsengine.simulate(**kw)
    finally:
        monkeypatch.undo()
        sides._FAMILIES.clear()  # no family built from the patched candidates outlives the test
    moe, rec = res.moe, res.to_record()
    assert moe.plan.num_gpus == 64 and moe.idle_gpus == 8 == rec["moe_idle_gpus"]
    assert moe.packing is not None and len(moe.packing.gpu_map) == 64
    assert rec["moe_tokens_per_s_per_gpu"] == pytest.approx(moe.tokens_per_second / 72, rel=1e-12)
    assert "+8 idle" in res.summary()
    assert best.moe.tokens_per_second >= moe.tokens_per_second * (1 - 1e-12)
    small = qsengine.simulate("deepseek-v3", "16xh200", 32768, microbatches=0, break_even=False).to_record()
    assert small["moe_idle_gpus"] == 0 and small["dense_idle_gpus"] == 0


def test_attention_dp_batch_agrees_with_packing_and_step():
    """Regression: under attn_dp the packer admits per GPU; the replica holds tp times that."""
    from qsengine.decode.step import decode_step

    plan = Plan(tp=8, ep=8, attn_dp=True)
    for ctx, prec in ((32768, "fp8"), (131072, "fp4")):
        res = qsengine.simulate("deepseek-r1", "8xgb200", ctx, precision=prec, plan=plan, microbatches=0,
                                break_even=False)
        pk = qsengine.pack("deepseek-r1", "8xgb200", ctx, precision=prec, plan=plan)
        assert res.moe.cluster_batch == pk.cluster_batch == pk.admissible_batch * 8
        st_ = decode_step(as_model("deepseek-r1"), as_precision(prec), as_cluster("8xgb200").accelerator, plan,
                          pk.admissible_batch * 8, ctx)
        assert res.moe.tokens_per_second == pytest.approx(st_.tokens_per_second, rel=1e-12)
        # the sweep and the plan ranking see the same numbers
        df = qsengine.sweep({"model": ["deepseek-r1"], "cluster": ["8xgb200"], "context": [ctx], "precision": [prec],
                             "plan": [plan], "microbatches": [0], "break_even": [False]}, progress=False, seed=1)
        assert int(df["moe_batch"][0]) == pk.cluster_batch


def test_simulate_is_the_one_lane_case():
    """simulate's record is the pipeline's; its breakdown is the same step model at the chosen point."""
    for kw in (dict(model="deepseek-v3", cluster="8xh200", context=32768, precision="fp8"),
               dict(model="grok-1", cluster="8xmi300x", context=8192, twin_attention="gqa"),
               dict(model="mixtral-8x7b", cluster="8xh100", context=4096, dense="llama-3.1-70b")):
        res = qsengine.simulate(microbatches=0, **kw)
        rec = records([dict(microbatches=0, **kw)])[0]
        assert ref.same(res.to_record(), rec) == []
        for side in (res.moe, res.dense):
            assert side.step.time * 1e3 == rec[f"{'moe' if side.model.is_moe else 'dense'}_tpot_ms"]
            assert side.packing.plan == side.plan


def test_one_definition_of_q_for_an_explicit_dense_model():
    res = qsengine.simulate("mixtral-8x7b", "8xh100", 4096, dense="llama-3.1-70b", microbatches=0)
    want = qsengine.qs("mixtral-8x7b", "llama-3.1-70b")
    assert res.qs.q == want.q == res.to_record()["q"]
    assert res.dense.model.id == "llama-3.1-70b"


def test_bad_points_are_refused_before_any_work():
    with pytest.raises(ValueError, match="field 'dense' = 'mixtral-8x7b': is an MoE model"):
        qsengine.simulate("qwen3-30b-a3b", "8xh100", 4096, dense="mixtral-8x7b", microbatches=0)
    with pytest.warns(qsengine.ContextWarning, match="maximum context"):
        qsengine.simulate("mixtral-8x7b", "8xh100", 131072, microbatches=0, break_even=False)
    with pytest.raises(ValueError, match="strict"):
        qsengine.simulate("mixtral-8x7b", "8xh100", 131072, microbatches=0, strict=True)
    with pytest.raises(ValueError, match="grid point 1 .*maximum context.*strict"):
        qsengine.sweep([dict(model="mixtral-8x7b", cluster="8xh100", context=4096, microbatches=0),
                        dict(model="mixtral-8x7b", cluster="8xh100", context=131072, microbatches=0)],
                       strict=True, progress=False)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(MOE_MODELS), st.sampled_from(["same", "gqa", qsengine.TwinSpec(aspect=96, ffn_ratio=4.0,
                                                                                      kv_heads=4)]),
       st.lists(st.floats(1.0, 40.0), min_size=1, max_size=12))
def test_twins_solved_together_equal_one_at_a_time(model, attention, qs_):
    """solve_twins is lane-independent and dense_twin is its one-lane case."""
    from qsengine.specs.twin import solve_twins

    m = as_model(model)
    sol = solve_twins(m, np.array(qs_), attention)
    for i, q in enumerate(qs_):
        one = solve_twins(m, np.array([q]), attention)
        assert one.ok[0] == sol.ok[i] and one.width[0] == sol.width[i]
        assert one.lines[0].shape == sol.lines[sol.line_of[i]].shape
        if sol.ok[i]:
            twin = m.dense_twin(q, attention=attention)
            assert twin.dense_intermediate == sol.width[i]
            assert twin.dense_ffn_params == sol.ffn_params()[i]
            assert abs(twin.active_params / (q * m.active_params) - 1) <= 0.005
        else:
            with pytest.raises(ValueError, match="field 'q'"):
                m.dense_twin(q, attention=attention)


@pytest.mark.parametrize("model", MOE_MODELS + ["llama-3.1-70b", "qwen3-32b"])
def test_batched_admissible_batches_equal_pack(model):
    m = as_model(model)
    rng = np.random.default_rng(0)
    for cluster in ["8xh100", "8xmi300x", "16xh200", "72xgb200"]:
        c = as_cluster(cluster)
        for prec in ["bf16", "fp8"]:
            p = as_precision(prec)
            pm = plan_memory(m, c, p)
            idx = rng.choice(len(pm.plans), size=min(12, len(pm.plans)), replace=False)
            for ctx in (1, 4096, 131072, 262144):
                got, _ = admissible_batches(pm, idx, np.full(idx.size, ctx))
                want = [pack(m, c, ctx, plan=pm.plans[i], precision=p).admissible_batch for i in idx]
                assert got.tolist() == want, (model, cluster, prec, ctx)


def test_twin_admission_from_one_plan_memory():
    m = as_model("qwen3-235b-a22b")
    c, p = as_cluster("8xh200"), as_precision("fp8")
    base = plan_memory(m.dense_twin(1.5), c, p)
    for q in (1.5, 2.7, 5.0):
        twin = m.dense_twin(q)
        idx = np.arange(len(base.plans))
        got, _ = admissible_batches(base, idx, np.full(idx.size, 32768),
                                    np.full(idx.size, twin.dense_ffn_params * p.weight_bytes))
        want, _ = admissible_batches(plan_memory(twin, c, p), idx, np.full(idx.size, 32768))
        assert got.tolist() == want.tolist()


def test_fullest_gpu_weight_equals_pack():
    m = as_model("qwen3-235b-a22b")
    c, p = as_cluster("8xh100"), as_precision("bf16")
    base = plan_memory(m.dense_twin(1.5), c, p)
    idx = np.arange(len(base.plans))
    for q in (1.5, 4.0, 9.0):  # large twins do not fit: the reason comes from the fullest GPU
        twin = m.dense_twin(q)
        _, _, fullest = admissible_batches(base, idx, np.full(idx.size, 4096),
                                           np.full(idx.size, twin.dense_ffn_params * p.weight_bytes), fullest=True)
        want = [float(np.max(pack(twin, c, 4096, plan=base.plans[i], precision=p).weight_bytes)) for i in idx]
        assert fullest.tolist() == want


def test_sweep_columns_equal_simulate_point_by_point():
    grid = {"model": ["qwen3-30b-a3b", "mixtral-8x7b"], "cluster": ["8xh100", "16xh200"],
            "context": [2048, 30000], "q": ["sqrt", 2.5], "slo_tpot": [None, 0.03], "microbatches": [0],
            "twin_attention": ["same", "gqa"]}
    fast = qsengine.sweep(grid, seed=3, progress=False)
    slow = qsengine.sweep(grid, seed=3, progress=False,
                          _evaluate=lambda kw, seed, threads: simulate_point(kw, seed, threads))
    pdt.assert_frame_equal(fast, slow)


# ---------------------------------------------------------------- columnar pieces

def test_point_fields_and_record_columns_match_simulate():
    import inspect

    from qsengine.decode.point import FIELDS as POINT_FIELDS
    from qsengine.decode.simulate import simulate

    params = inspect.signature(simulate).parameters
    assert set(POINT_FIELDS) == set(params) - {"seed", "threads", "strict"}
    for name, default in POINT_FIELDS.items():
        want = params[name].default
        assert (default is ... and want is inspect.Parameter.empty) or default == want, name
    rec = simulate("qwen3-30b-a3b", "8xh100", 4096, microbatches=0).to_record()
    kinds = {"str": str, "int": int, "float": float, "bool": bool}
    assert [n for n, _ in RECORD_COLUMNS] == list(rec)
    for name, kind in RECORD_COLUMNS:
        if kind == "bool?":
            assert rec[name] is None or isinstance(rec[name], bool)
        else:
            assert type(rec[name]) is kinds[kind], name


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40), st.integers(1, 25), st.integers(0, 2**32 - 1))
def test_in_order_best_equals_the_scan(n, p, seed):
    from qsengine.decode.sides import in_order_best

    rng = np.random.default_rng(seed)
    # near-ties (within and just outside 1e-12), exact ties, zeros and missing values
    pool = np.array([1.0, 1.0 + 1e-13, 1.0 + 9e-13, 1.0 + 2e-12, 2.0, 2.0 * (1 + 5e-13), 0.0, np.nan, 3.0])
    T = rng.choice(pool, size=(n, p)) if seed % 2 else np.where(rng.random((n, p)) < 0.3, np.nan,
                                                                 rng.random((n, p)))
    best, arg = np.full(n, np.nan), np.full(n, -1)
    for j in range(p):  # evaluate_side's rule
        t = T[:, j]
        better = ~np.isnan(t) & (np.isnan(best) | (t > best * (1 + 1e-12)))
        best, arg = np.where(better, t, best), np.where(better, j, arg)
    got_best, got_arg = in_order_best(T)
    assert got_arg.tolist() == arg.tolist()
    assert np.array_equal(got_best, best, equal_nan=True)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(MOE_MODELS), st.sampled_from(CLUSTERS + ["72xgb200"]),
                          st.sampled_from(["bf16", "fp8"]), st.integers(1, 262144),
                          st.one_of(st.none(), st.floats(0.002, 0.2)), st.floats(1.05, 6.0)),
                min_size=1, max_size=8))
@example(lanes=[("deepseek-v3", "8xh100", "bf16", 1, None, 2.0), ("grok-1", "8xh100", "bf16", 1, None, 4.0)])
def test_stacked_families_equal_one_family_at_a_time(lanes):
    """One _side call over several families (dense twins: one routing law)
    gives each lane what its own family's call gives."""
    from qsengine.decode.sides import _DEFAULT_OPTIONS, _side, family
    from qsengine.specs.twin import solve_twins

    fams, fam_of, ctx, slo, ffn = [], [], [], [], []
    for model, cluster, prec, context, s, q in lanes:
        m = as_model(model)
        sol = solve_twins(m, np.array([q]))
        if not sol.ok[0]:
            continue
        f = sol.ffn_params()
        fam = family(sol.lines[0].base, as_cluster(cluster), as_precision(prec), "auto", _DEFAULT_OPTIONS,
                     override=True)
        fams.append(fam)
        fam_of.append(len(fams) - 1)
        ctx.append(context)
        slo.append(np.nan if s is None else s)
        ffn.append(f[0])
    if not fams:
        return
    ctx, slo, ffn = np.array(ctx), np.array(slo), np.array(ffn)
    together = _side(fams, ctx, slo, ffn, family=np.array(fam_of))
    for i, fam in enumerate(fams):
        alone = _side(fam, ctx[i:i + 1], slo[i:i + 1], ffn[i:i + 1])
        for name in ("feasible", "plan", "batch", "limit", "time", "p99", "tps", "why", "why_kind", "why_fit", "why_adm"):
            a, b = getattr(together, name)[i], getattr(alone, name)[0]
            assert a == b or (np.isnan(a) and np.isnan(b)), (name, lanes[i])


def test_stacking_refuses_families_with_different_routing_laws():
    from qsengine.decode.sides import _DEFAULT_OPTIONS, _side, family

    c, p = as_cluster("8xh200"), as_precision("fp8")
    fams = [family(as_model(m), c, p, "auto", _DEFAULT_OPTIONS, "uniform") for m in ("qwen3-30b-a3b", "mixtral-8x7b")]
    with pytest.raises(ValueError, match="routing law"):
        _side(fams, np.array([4096, 4096]), np.full(2, np.nan), family=np.array([0, 1]))


def test_evaluate_columns_equals_records_and_refuses_bad_codes():
    pts = [dict(model="qwen3-30b-a3b", cluster=c, context=t, q=q, microbatches=0)
           for c in ("8xh100", "16xh200") for t in (1024, 65536) for q in ("sqrt", 3.0)]
    pts.append(dict(model="mixtral-8x7b", cluster="8xh100", context=2048, twin_attention="gqa", microbatches=0))
    cols, n = encode_points(pts)
    out = evaluate_columns(cols, n)
    assert set(out) == {name for name, _ in RECORD_COLUMNS} and all(len(v) == n for v in out.values())
    for i, p in enumerate(pts):
        rec = {name: out[name][i] for name, _ in RECORD_COLUMNS}
        want = qsengine.simulate(**p).to_record()
        for k, v in want.items():
            assert rec[k] == v or (isinstance(v, float) and math.isnan(v) and math.isnan(rec[k])), (k, p)
    with pytest.raises(ValueError, match="codes must be"):
        evaluate_columns({**cols, "context": (cols["context"][0], cols["context"][1] + 100)}, n)
    with pytest.raises(ValueError, match="codes must be"):
        evaluate_columns(cols, n + 1)
    with pytest.raises(ValueError, match="required field 'cluster'"):
        evaluate_columns({k: v for k, v in cols.items() if k != "cluster"}, n)
    assert all(len(v) == 0 for v in evaluate_columns({k: ([v[0][0]], np.zeros(0, int)) for k, v in cols.items()},
                                                     0).values())


@pytest.mark.parametrize("kw", [dict(model="deepseek-v3", cluster="8xh200", context=32768, precision="fp8"),
                                dict(model="qwen3-235b-a22b", cluster="16xh100", context=8192,
                                     routing="powerlaw:1.2"),
                                dict(model="mixtral-8x7b", cluster="8xh100", context=4096, dense="llama-3.1-70b")])
def test_frontier_is_pareto_and_ratio_at_interpolates(kw):
    res = qsengine.simulate(microbatches=0, break_even=False, **kw)
    f = res.frontier
    assert set(f["side"]) == {"moe", "dense"}
    for side in ("moe", "dense"):
        s = f[f["side"] == side]
        t, g = s["tpot"].to_numpy(), s["tokens_per_s_per_gpu"].to_numpy()
        assert np.all(np.diff(t) >= 0)
        # no point dominated: faster points never have a higher throughput
        for i in range(len(s)):
            assert not np.any((t <= t[i]) & (g > g[i]) & (np.arange(len(s)) != i))
        assert np.allclose(s["tokens_per_s_per_user"], 1 / t)
        # the maximum-throughput point (HBM-maximum batch) is the frontier's largest throughput,
        # and the operating point at the latency target lies on the frontier (up to the linear
        # interpolation between its 40 batches, which runs below a concave curve)
        assert g.max() == pytest.approx(res.to_record()[f"{side}_max_tokens_per_s_per_gpu"], rel=1e-9)
        r = res.moe if side == "moe" else res.dense
        at = res.throughput_at(r.tpot, side)
        assert r.tokens_per_second_per_gpu(res.cluster.num_gpus) == pytest.approx(at, rel=0.01)
        # at a frontier point the side's throughput is that point's; between two, in between
        for i in range(len(s) - 1):
            assert res.throughput_at(float(t[i]), side) == pytest.approx(g[i], rel=1e-12)
            mid = res.throughput_at(float((t[i] + t[i + 1]) / 2), side)
            assert min(g[i], g[i + 1]) - 1e-9 <= mid <= max(g[i], g[i + 1]) + 1e-9
        assert math.isnan(res.throughput_at(float(t[0]) * 0.5, side))
    t_both = float(max(f.groupby("side")["tpot"].min()))
    r = res.ratio_at(t_both * 1.5)
    assert r == pytest.approx(res.throughput_at(t_both * 1.5, "dense") / res.throughput_at(t_both * 1.5, "moe"))
    assert res.ratio_at(1e-9) is None
    with pytest.raises(ValueError, match="quantile"):
        res.ratio_at(0.05, quantile="p50")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(points, min_size=1, max_size=4), st.sampled_from(["none", "tbo", "full"]))
def test_why_factors_multiply_back_to_the_ratio(pts, overlap):
    from qsengine.decode.why import WHY

    pts = [dict(p, options=qsengine.StepOptions(overlap=overlap)) for p in pts]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qsengine.ContextWarning)
        pts = [p for p in pts if valid_point(p)]
        if not pts:
            return
        for rec in records(pts):
            factors = [rec[f"why_{k}"] for k in WHY]
            if math.isnan(rec["ratio"]):
                assert all(math.isnan(f) for f in factors)
                continue
            assert all(f > 0 and math.isfinite(f) for f in factors)
            assert math.prod(factors) == pytest.approx(rec["ratio"], rel=1e-9)
            assert rec["why_headroom"] == pytest.approx(rec["dense_batch"] / rec["moe_batch"], rel=1e-12)


def test_records_name_the_twin_shape_and_its_kv_cache():
    recs = records([dict(model="deepseek-v3", cluster="16xh200", context=8192, precision="fp8", microbatches=0,
                          twin_attention=att) for att in ("same", "gqa")]
                    + [dict(model="mixtral-8x7b", cluster="8xh100", context=4096, dense="llama-3.1-70b",
                            microbatches=0)])
    m = as_model("deepseek-v3")
    same, gqa, explicit = recs
    assert same["dense_kv_bytes_per_token"] == same["moe_kv_bytes_per_token"] == m.kv_bytes_per_token(1.0)
    twin = m.dense_twin("sqrt", attention="gqa")
    assert gqa["dense_kv_bytes_per_token"] == twin.num_layers * 2 * 8 * 128 * 1.0
    assert gqa["dense_shape"] == f"L{twin.num_layers} d{twin.hidden_size} gqa-kv8 ffn{twin.dense_intermediate}"
    assert same["dense_shape"].startswith("L61 d7168 mla-r512 ffn")
    assert explicit["dense_shape"] == "L80 d8192 gqa-kv8 ffn28672"
    assert explicit["dense_kv_bytes_per_token"] == as_model("llama-3.1-70b").kv_bytes_per_token(2.0)


def test_notebook_view_and_settings_line():
    res = qsengine.simulate("qwen3-30b-a3b", "8xh100", 4096, microbatches=0, break_even=False)
    h = res._repr_html_()
    assert "<table" in h and "<img" in h and "ratio dense/MoE" in h and "settings: precision" in h
    assert res.summary().splitlines()[-1].strip() == res.settings_line()
    assert "precision bf16" in res.settings_line() and "closed form" in res.settings_line()


def test_a_grid_past_max_context_warns_once():
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        qsengine.sweep({"model": ["grok-1", "mixtral-8x7b"], "cluster": ["8xh100"],
                        "context": [4096, 16384, 65536, 131072], "microbatches": [0], "break_even": [False]},
                       progress=False, seed=1)
    ctx = [w for w in got if issubclass(w.category, qsengine.ContextWarning)]
    assert len(ctx) == 1
    msg = str(ctx[0].message)
    assert "grok-1 (max 8,192 tokens): 3 context(s) from 16,384 to 131,072" in msg and "mixtral-8x7b" in msg


def test_side_empty_and_fill_cover_every_field():
    """Side.empty and _SideSet.fill take their fields from the dataclass: every
    field starts at its declared empty value and is copied by fill."""
    import dataclasses

    from qsengine.decode.sides import _SIDE_FIELDS, Side, _SideSet

    names = tuple(f.name for f in dataclasses.fields(Side))
    assert _SIDE_FIELDS == names
    e = Side.empty(3)
    assert all(getattr(e, k).shape == (3,) for k in names)
    assert not e.feasible.any() and (e.plan == -1).all() and np.isnan(e.time).all() and np.isnan(e.pf).all()
    full = Side.empty(2)
    for k in names:
        getattr(full, k)[:] = 1
    s = _SideSet.empty(3)
    s.fill(np.array([0, 2]), full, [], np.zeros(2, np.int64))
    assert all((getattr(s.side, k)[[0, 2]] == 1).all() and getattr(s.side, k)[1] != 1 for k in names)
