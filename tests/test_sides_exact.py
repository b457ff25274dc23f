"""The fast paths of decode/sides.py give the same floats as the plain ones:
shared step fields broadcast instead of gathered, and the bisection's
in-bracket pruning of dense rows (which relies on B / TPOT growing with B)."""

from __future__ import annotations

import numpy as np
import pytest

from qsengine.decode.params import STEP_FIELDS
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


@pytest.mark.parametrize("models", [DENSE, ["qwen3-30b-a3b", "mixtral-8x7b"]])
def test_stack_take_broadcasts_the_fields_every_plan_shares(models):
    """_Stack.take: shared fields are one-element arrays equal to every plan's
    value, the others gathered; the step model gives bit-identical floats."""
    fams = [family(as_model(m), as_cluster(c), as_precision("fp8"), "auto", _DEFAULT_OPTIONS)
            for m in models for c in CLUSTERS[:2]]
    fams = [f for f in fams if f.plans]
    if models[0] in DENSE:
        stack = _stacked(fams)
    else:  # MoE families stack only with their own routing law: one model
        fams = fams[:1]
        stack = _stacked(fams)
    assert stack.varying_matrix is not None and stack.shared and stack.varying
    assert set(stack.shared) | set(stack.varying) == set(STEP_FIELDS)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(stack.params), 3000)
    cheap, full = stack.take(idx), stack.params.take(idx)
    for f in STEP_FIELDS:
        a, b = getattr(cheap, f), getattr(full, f)
        assert a.shape == ((1,) if f in stack.shared else (idx.size,)), f
        assert np.array_equal(np.broadcast_to(a, b.shape), b, equal_nan=True), f
    batch = rng.integers(1, 512, idx.size).astype(np.float64)
    ctx = rng.integers(512, 131072, idx.size).astype(np.float64)
    pi = fams[0].pi
    r1 = step_time(cheap, batch, ctx, pi=pi, uniform=pi is None)
    r2 = step_time(full, batch, ctx, pi=pi, uniform=pi is None)
    for name in ("time", "p50", "p99", "tokens"):
        assert np.array_equal(getattr(r1, name), getattr(r2, name)), name


def test_two_batch_overlap_stacks_gather_every_field():
    from qsengine.decode.params import StepOptions

    fam = family(as_model("llama-3.1-8b"), as_cluster("8xh100"), as_precision("fp8"), "auto",
                 StepOptions(overlap="tbo"))
    stack = _stacked([fam])
    assert stack.varying_matrix is None
    idx = np.arange(len(stack.params))
    assert np.array_equal(stack.take(idx).matrix, stack.params.take(idx).matrix, equal_nan=True)


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


def _exhaustive(fams, fam_of, ctx, slo, ffn):
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
            adm = int(admissible_batches(fam.memory, np.array([k]), np.array([ctx[i]]),
                                         np.array([ffn[i] * fam.precision.weight_bytes]))[0][0])
            if adm < 1:
                continue
            u = np.arange(1, adm + 1)
            b = (u * fam.unit[k]).astype(np.float64)
            p = fam.params.take(np.full(u.size, k)).replace(ffn_params=np.full(u.size, ffn[i]))
            r = step_time(p, b, np.full(u.size, float(ctx[i])))
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
