"""The core's side search (cpp/core/side_search.h, called by decode/sides.py)
gives exactly the answer of trying every batch of every plan: the regula-falsi
bisection and its exact pruning (in-bracket pruning of dense rows relies on
B / TPOT growing with B, checked here too), for dense twins and MoE lanes; bad
input to the search is named."""

from __future__ import annotations

import numpy as np
import pytest

from qsengine.decode.sides import _DEFAULT_OPTIONS, _side, _stacked, family, in_order_best
from qsengine.decode.step import step_time
from qsengine.packing import admissible_batches
from qsengine.specs.loaders import as_cluster, as_model, as_precision
from qsengine.specs.twin import solve_twins

DENSE = ["llama-3.1-8b", "qwen3-32b", "llama-3.1-70b"]
CLUSTERS = ["8xh100", "8xmi300x", "16xh200", "8xa100"]


def _twin_family(model: str, cluster: str, prec: str, q: float):
    sol = solve_twins(as_model(model), np.array([q]))
    assert sol.ok[0]
    return family(sol.lines[0].base, as_cluster(cluster), as_precision(prec), "auto", _DEFAULT_OPTIONS,
                  override=True), float(sol.ffn_params()[0])


@pytest.mark.parametrize("model", DENSE)
@pytest.mark.parametrize("cluster", CLUSTERS)
@pytest.mark.parametrize("prec", ["fp8", "bf16"])
def test_dense_tpot_per_sequence_never_grows_with_the_batch(model, cluster, prec):
    """What the bisection's pruning of dense rows relies on: for every plan,
    TPOT(B)/B is nonincreasing in B (mean and p99), from 1 to 4096 sequences."""
    fam = family(as_model(model), as_cluster(cluster), as_precision(prec), "auto", _DEFAULT_OPTIONS)
    if not fam.plans:
        pytest.skip("no plan")
    B = np.arange(1, 4097, dtype=np.float64)
    for k in range(len(fam.plans)):
        p = fam.params.take(np.full(B.size, k))
        for ctx in (1024.0, 32768.0, 262144.0):
            r = step_time(p, B, np.full(B.size, ctx))
            for name in ("time", "p99"):
                per = getattr(r, name) / B
                assert np.all(np.diff(per) <= 1e-12 * per[1:]), (fam.plans[k].label, ctx, name)


def _exhaustive(fams, fam_of, ctx, slo, ffn, override=True):
    """(plan, batch, time, p99, tps) per lane by evaluating every admissible
    batch of every plan: the largest that meets the p99 target, then the
    in-order best plan by tokens/s."""
    out = []
    for i in range(ctx.size):
        fam = fams[fam_of[i]]
        P = len(fam.plans)
        T = np.full((1, P), np.nan)
        at = {}
        for k in range(P):
            fb = np.array([ffn[i] * fam.precision.weight_bytes]) if override else None
            adm = int(admissible_batches(fam.memory, np.array([k]), np.array([ctx[i]]), fb)[0][0])
            if adm < 1:
                continue
            u = np.arange(1, adm + 1)
            b = (u * fam.unit[k]).astype(np.float64)
            p = fam.params.take(np.full(u.size, k))
            if override:
                p = p.replace(ffn_params=np.full(u.size, ffn[i]))
            r = step_time(p, b, np.full(u.size, float(ctx[i])), pi=fam.pi, uniform=fam.pi is None)
            ok = np.flatnonzero(r.p99 <= slo[i]) if not np.isnan(slo[i]) else np.array([u.size - 1])
            if ok.size == 0:
                continue
            j = ok[-1]
            tps = b[j] / r.time[j] * fam.dp[k]
            T[0, k] = tps
            at[k] = (int(b[j]), r.time[j], r.p99[j], tps)
        _, arg = in_order_best(T)
        out.append(None if arg[0] < 0 else (int(arg[0]), *at[int(arg[0])]))
    return out


@pytest.mark.parametrize("seed", range(3))
def test_bisection_with_pruning_equals_the_exhaustive_scan(seed):
    """Dense twin lanes under binding TPOT targets: the chosen plan, batch,
    time, p99 and tokens/s are exactly those of trying every batch."""
    rng = np.random.default_rng(seed)
    fams, fam_of, ctx, slo, ffn = [], [], [], [], []
    for _ in range(6):
        fam, f = _twin_family(str(rng.choice(["qwen3-30b-a3b", "mixtral-8x7b"])), str(rng.choice(CLUSTERS[:3])),
                              "fp8", float(rng.uniform(1.2, 5.0)))
        if not fam.plans:
            continue
        fams.append(fam)
        fam_of.append(len(fams) - 1)
        ctx.append(int(rng.choice([1024, 8192, 65536])))
        slo.append(float(rng.choice([0.008, 0.015, 0.03, 0.06])))
        ffn.append(f)
    ctx, slo, ffn, fam_of = np.array(ctx), np.array(slo), np.array(ffn), np.array(fam_of)
    side = _side(fams, ctx, slo, ffn, family=fam_of)
    want = _exhaustive(fams, fam_of, ctx, slo, ffn)
    bound = 0
    for i, w in enumerate(want):
        if w is None:
            assert not side.feasible[i]
            continue
        got = (int(side.plan[i]), int(side.batch[i]), side.time[i], side.p99[i], side.tps[i])
        assert got == w, (i, got, w)
        bound += side.limit[i] == 1
    assert bound > 0  # the targets bind somewhere, so the bisection ran


@pytest.mark.parametrize("seed", range(3))
def test_moe_lanes_under_binding_targets_equal_the_exhaustive_scan(seed):
    """MoE lanes (closed-form straggler, uniform and power-law routing; not pruned inside the bracket):
    the chosen plan, batch, time, p99 and tokens/s are exactly those of trying every batch."""
    rng = np.random.default_rng(100 + seed)
    routing = str(rng.choice(["uniform", "powerlaw:1.2"]))
    fam = family(as_model("qwen3-30b-a3b"), as_cluster(str(rng.choice(CLUSTERS[:2]))), as_precision("fp8"), "auto",
                 _DEFAULT_OPTIONS, routing=routing)
    n = 5
    ctx = rng.choice([1024, 8192, 65536], n)
    slo = rng.choice([0.004, 0.008, 0.015, np.nan], n)
    ffn = np.zeros(n)  # MoE families do not override the dense FFN
    side = _side(fam, ctx, slo)
    want = _exhaustive([fam], np.zeros(n, np.int64), ctx, slo, ffn, override=False)
    assert (side.limit == 1).any()  # the targets bind somewhere, so the bisection ran
    for i, w in enumerate(want):
        if w is None:
            assert not side.feasible[i]
            continue
        assert (int(side.plan[i]), int(side.batch[i]), side.time[i], side.p99[i], side.tps[i]) == w, i


def test_the_core_search_names_bad_input():
    from qsengine import _core

    fam = family(as_model("llama-3.1-8b"), as_cluster("8xh100"), as_precision("fp8"), "auto", _DEFAULT_OPTIONS)
    stack = _stacked([fam])
    one = np.zeros(1, np.int64)
    args = dict(plans=stack.fields, unit=stack.unit, lanes=1, context=np.ones(1), slo=np.full(1, np.nan))
    with pytest.raises(ValueError, match=r"plan\[0\] = 99: must be in \[0, "):
        _core.side_search(plan=np.array([99]), lane=one, units=np.ones(1, np.int64), **args)
    with pytest.raises(ValueError, match=r"lane\[0\] = 3: must be in \[0, 1\)"):
        _core.side_search(plan=one, lane=np.array([3]), units=np.ones(1, np.int64), **args)
    with pytest.raises(ValueError, match=r"units\[0\] = 0: must be >= 1"):
        _core.side_search(plan=one, lane=one, units=one, **args)
    with pytest.raises(ValueError, match="units must be 1-d with one entry per row"):
        _core.side_search(plan=one, lane=one, units=np.ones(2, np.int64), **args)
    got = _core.side_search(plan=np.zeros(0, np.int64), lane=np.zeros(0, np.int64), units=np.zeros(0, np.int64),
                            **{**args, "context": np.zeros(0), "slo": np.zeros(0)})
    assert got["time"].size == 0
