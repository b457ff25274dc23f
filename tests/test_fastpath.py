"""The closed-form fast path equals simulate(microbatches=0).to_record() exactly."""

from __future__ import annotations

import math

import numpy as np
import pandas.testing as pdt
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import qsengine
from qsengine.fastpath import evaluate_closed_form
from qsengine.packing import admissible_batches, pack, plan_memory
from qsengine.specs.loaders import as_cluster, as_model, as_precision
from qsengine.sweeping import simulate_point

MOE_MODELS = ["deepseek-v3", "qwen3-235b-a22b", "grok-1", "switch-c-2048", "qwen3-30b-a3b", "mixtral-8x7b",
              "gpt-oss-120b", "llama-4-scout", "dbrx", "kimi-k2"]
CLUSTERS = ["8xh100", "8xh200", "8xb200", "8xmi300x", "16xh100", "8xa100"]


def _same(slow: dict, fast: dict) -> list:
    assert list(slow) == list(fast)
    bad = []
    for k, a in slow.items():
        b = fast[k]
        if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
            continue
        if a != b or type(a) is not type(b):
            bad.append((k, a, b))
    return bad


points = st.fixed_dictionaries({
    "model": st.sampled_from(MOE_MODELS),
    "cluster": st.sampled_from(CLUSTERS),
    "context": st.one_of(st.sampled_from([1, 4096, 32768, 131072, 262144]), st.integers(1, 262144)),
    "q": st.one_of(st.just("sqrt"), st.none(), st.floats(1.05, 12.0)),
    "slo_tpot": st.one_of(st.none(), st.floats(0.002, 0.2)),
    "precision": st.sampled_from([None, "bf16", "fp8"]),
    "routing": st.sampled_from(["uniform", "uniform", "powerlaw:1.01"]),
    "break_even": st.booleans(),
    "microbatches": st.just(0),
})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(points, min_size=1, max_size=3))
def test_fast_path_equals_simulate_bit_for_bit(pts):
    fast = evaluate_closed_form(pts)
    for p, f in zip(pts, fast):
        try:
            slow = qsengine.simulate(**p).to_record()
        except ValueError:  # e.g. q too small for a twin: the fast path must raise too
            with pytest.raises(ValueError):
                evaluate_closed_form([p])
            continue
        assert _same(slow, f) == [], p


def test_covers_infeasible_slo_and_no_break_even_cases():
    pts = [
        dict(model="switch-c-2048", cluster="8xh100", context=4096, microbatches=0),  # MoE does not fit
        dict(model="deepseek-v3", cluster="8xa100", context=262144, microbatches=0),  # KV/weights
        dict(model="qwen3-30b-a3b", cluster="8xh100", context=8192, slo_tpot=1e-4, microbatches=0),  # SLO
        dict(model="qwen3-30b-a3b", cluster="8xh100", context=8192, q=40.0, microbatches=0),  # no crossing
        dict(model="qwen3-30b-a3b", cluster="8xh100", context=8192, routing="powerlaw:1.2", microbatches=0),
        dict(model="mixtral-8x7b", cluster="16xh100", context=1, q=1.5, slo_tpot=0.01, precision="fp8",
             microbatches=0),
    ]
    fast = evaluate_closed_form(pts)
    for p, f in zip(pts, fast):
        assert _same(qsengine.simulate(**p).to_record(), f) == [], p
    assert not fast[0]["moe_feasible"] and fast[0]["moe_reason"]
    assert "TPOT target" in fast[2]["moe_reason"]


def test_uncovered_points_fall_back_to_simulate():
    p = dict(model="qwen3-30b-a3b", cluster="8xh100", context=4096, twin_attention="gqa", microbatches=0,
             break_even=False)
    assert _same(qsengine.simulate(**p).to_record(), evaluate_closed_form([p])[0]) == []


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


def test_sweep_fast_path_equals_slow_path():
    grid = {"model": ["qwen3-30b-a3b", "mixtral-8x7b"], "cluster": ["8xh100", "16xh200"],
            "context": [2048, 65536], "q": ["sqrt", 2.5], "slo_tpot": [None, 0.03], "microbatches": [0]}
    fast = qsengine.sweep(grid, seed=3, progress=False)
    slow = qsengine.sweep(grid, seed=3, progress=False,
                          _evaluate=lambda kw, seed, threads: simulate_point(kw, seed, threads))
    pdt.assert_frame_equal(fast, slow)


# ---------------------------------------------------------------- columnar pieces

def test_point_fields_and_record_columns_match_simulate():
    import inspect

    from qsengine.fastpath import RECORD_COLUMNS
    from qsengine.simulation import POINT_FIELDS, simulate

    params = inspect.signature(simulate).parameters
    assert set(POINT_FIELDS) == set(params) - {"seed", "threads"}
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
    from qsengine.fastpath import _in_order_best

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
    got_best, got_arg = _in_order_best(T)
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
    from qsengine.fastpath import _DEFAULT_OPTIONS, _family, _side, _twin_line, _twin_widths

    fams, fam_of, ctx, slo, ffn = [], [], [], [], []
    for model, cluster, prec, context, s, q in lanes:
        m = as_model(model)
        width, ok, f = _twin_widths(m, np.array([q]))
        if not ok[0]:
            continue
        fam = _family(_twin_line(m)[0], as_cluster(cluster), as_precision(prec), "auto", _DEFAULT_OPTIONS, "uniform")
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
        for name in ("feasible", "plan", "batch", "limit", "time", "p99", "tps", "why", "why_slo", "why_fit"):
            a, b = getattr(together, name)[i], getattr(alone, name)[0]
            assert a == b or (np.isnan(a) and np.isnan(b)), (name, lanes[i])


def test_stacking_refuses_families_with_different_routing_laws():
    from qsengine.fastpath import _DEFAULT_OPTIONS, _family, _side

    c, p = as_cluster("8xh200"), as_precision("fp8")
    fams = [_family(as_model(m), c, p, "auto", _DEFAULT_OPTIONS, "uniform") for m in ("qwen3-30b-a3b", "mixtral-8x7b")]
    with pytest.raises(ValueError, match="routing law"):
        _side(fams, np.array([4096, 4096]), np.full(2, np.nan), family=np.array([0, 1]))


def test_evaluate_columns_equals_records_and_refuses_bad_codes():
    from qsengine.fastpath import RECORD_COLUMNS, encode_points, evaluate_columns

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
