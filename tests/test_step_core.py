"""The core's step (cpp/core/step.cc's pass, cpp/core/step_time.cc's step over
lanes) as the Python layer calls it: the fields it reads are StepParams fields,
a lane's result does not depend on the lanes beside it (the pass evaluates
blocks of lanes together), the pieces sum to the time (drafts included), the
kernels it exposes agree with the calibration runtime, and bad input is named."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qsengine
from qsengine import _core
from qsengine.decode.params import STEP_FIELDS, StepOptions, StepParams, step_params
from qsengine.decode.step import step_time
from qsengine.specs import Plan
from qsengine.specs.loaders import as_model, as_precision


def _lanes(n: int, seed: int) -> tuple[StepParams, np.ndarray, np.ndarray]:
    """n lanes of real presets: dense models and an MoE with local-window layers, both kernel models, plans with TP/EP/PP/attention-DP."""
    rng = np.random.default_rng(seed)
    models = ["llama-3.1-8b", "llama-3.1-70b", "qwen3-32b", "gpt-oss-120b"]  # one MoE: one routing law per call
    parts, batch, ctx = [], [], []
    for _ in range(n):
        m = as_model(models[rng.integers(len(models))])
        tp = int(rng.choice([1, 2, 4, 8]))
        pp = int(rng.choice([1, 2]))
        plan = Plan(tp=tp, pp=pp, attn_dp=bool(rng.integers(2)) and tp > 1)
        opts = StepOptions(kernels=str(rng.choice(["calibrated", "roofline"])),
                           overlap=str(rng.choice(["none", "full"])), draft_tokens=int(rng.integers(0, 3)),
                           acceptance=0.7)
        acc = qsengine.as_accelerator(str(rng.choice(["h200-sxm", "b200", "mi300x", "h100-sxm"])))
        parts.append(step_params(m, as_precision(str(rng.choice(["bf16", "fp8"]))), acc, plan, opts))
        batch.append(float(rng.integers(1, 512)))
        ctx.append(float(rng.integers(1, 200_000)))
    return StepParams.stack(parts), np.array(batch), np.array(ctx)


def test_the_core_reads_step_params_fields():
    assert set(_core.STEP_PASS_FIELDS) <= set(STEP_FIELDS)
    assert len(set(_core.STEP_PASS_FIELDS)) == len(_core.STEP_PASS_FIELDS)
    pieces = _core.STEP_PIECES
    assert len(pieces) == len(_core.STEP_LINK_PIECES) and len(pieces) % 2 == 1
    half = len(pieces) // 2  # the verify pass's pieces, then the draft passes' and the MTP projection
    assert pieces[0] == "attention" and pieces[half - 1] == "pp send" and pieces[-1] == "draft: mtp projection"
    assert list(pieces[half:-1]) == ["draft: " + n for n in pieces[:half]]
    assert _core.STEP_LINK_PIECES[:half] == _core.STEP_LINK_PIECES[half:-1]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 700), st.integers(0, 2**32 - 1))
def test_a_lane_does_not_depend_on_its_neighbours(n, seed):
    """The pass evaluates lanes in blocks (their soft maxima together): every lane's
    times and pieces are the same bits alone, in any order, in any block."""
    p, b, c = _lanes(min(n, 40), seed)
    k = len(p)
    idx = np.random.default_rng(seed).integers(0, k, n)  # n lanes drawn from the k, repeated and shuffled
    whole = step_time(p.take(idx), b[idx], c[idx], detail=True)
    for j in np.unique(idx)[:5]:
        one = step_time(p.take(np.array([j])), b[[j]], c[[j]], detail=True)
        at = np.flatnonzero(idx == j)
        for name in ("time", "p50", "p99"):
            assert np.array_equal(getattr(whole, name)[at], np.repeat(getattr(one, name), at.size)), name
        for pw, po in zip(whole.pieces, one.pieces):
            assert pw.name == po.name
            assert np.array_equal(pw.time[at], np.repeat(po.time, at.size)), pw.name


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1))
def test_pieces_sum_to_the_time(seed):
    """Without overlap, a lane's time is its compute pieces plus its communication pieces, the draft
    passes' and the MTP projection's included (each per accepted token), and every piece that is absent
    on a lane takes no time there; without drafts the draft pieces are not reported."""
    p, b, c = _lanes(12, seed)
    p = p.replace(overlap=np.zeros(len(p)))
    plain = step_time(p.replace(draft=np.zeros(len(p))), b, c, detail=True)
    assert [pa.name for pa in plain.pieces] == [n for n in _core.STEP_PIECES if not n.startswith("draft: ")]
    p = p.replace(draft=np.arange(len(p)) % 3.0)  # speculative and plain lanes in one call
    for r in (plain, step_time(p, b, c, detail=True)):
        np.testing.assert_allclose(sum(pa.time for pa in r.pieces), r.time, rtol=1e-12)
        for pa in r.pieces:
            assert (pa.time[~pa.present] == 0).all(), pa.name
    assert [pa.name for pa in r.pieces] == list(_core.STEP_PIECES)


def test_kernels_match_the_calibration_runtime():
    from qsengine.calibration import runtime as rt
    from qsengine.decode import kernels as K

    m = as_model("llama-3.1-70b")
    acc = qsengine.as_accelerator("h200-sxm")
    p = step_params(m, as_precision("fp8"), acc, Plan(tp=4))
    seqs = np.array([1.0, 7.0, 64.0, 300.0])
    got, tb, tf = K._gemm(p, seqs, p.ap_n1, p.ap_k1)
    want = rt.gemm_time(acc, K.kernel_dtypes(as_precision("fp8"))["gemm"], seqs, p.ap_n1, p.ap_k1)
    np.testing.assert_allclose(got, want, rtol=1e-13)
    assert (tb > 0).all() and (tf > 0).all()
    # no such GEMM (n = 0): no time
    assert (K._gemm(p, seqs, np.zeros(1), p.ap_k1)[0] == 0).all()


def test_link_kernels_and_the_roofline_are_their_formulas():
    """The core's kernels over lanes (each reads only its own fields) against docs/model.md's formulas."""
    from qsengine.decode import kernels as K

    p, _, _ = _lanes(30, 11)
    nbytes = np.linspace(1e3, 1e8, len(p))
    group = np.array([1.0, 2.0, 4.0, 8.0, 16.0, 32.0] * 5)
    bw = np.where(group <= p.domain, p.scaleup, p.internode) * p.link_eff
    np.testing.assert_allclose(K._link_bw(p, group), bw, rtol=1e-15)
    ring = np.where(group > 1, p.latency + 2.0 * (group - 1) / group * nbytes / bw, 0.0)
    np.testing.assert_allclose(K._allreduce(nbytes, group, p), ring, rtol=1e-15)
    inter = np.where(group <= p.domain, 0.0, 1.0 - p.domain / group)
    a2a = p.latency + np.maximum(nbytes * (1 - inter) / (p.scaleup * p.link_eff) * np.maximum(p.a2a_torus, 1.0),
                                 nbytes * inter / (p.internode * p.link_eff))
    np.testing.assert_allclose(K._ep_alltoall(nbytes, group, p), a2a, rtol=1e-15)
    flops = nbytes * np.linspace(1, 2000, len(p))
    t, bound = K._roof(nbytes, flops, p)
    np.testing.assert_allclose(t, np.maximum(nbytes / p.bw, flops / p.flops), rtol=1e-15)
    assert np.array_equal(bound, nbytes / p.bw >= flops / p.flops)


def test_bad_input_is_named():
    p, b, c = _lanes(3, 1)
    cols = p.columns()
    z = np.zeros(3)
    del cols["tp"]
    with pytest.raises(ValueError, match="step_time: field 'tp' is missing"):
        _core.step_time(cols, b, c)
    cols = p.columns()
    cols["bw"] = np.ones(2)
    with pytest.raises(ValueError, match=r"field 'bw' has shape \(2\)"):
        _core.step_time(cols, b, c)
    with pytest.raises(ValueError, match="context must be 1-d with one entry per lane"):
        _core.step_time(p.columns(), b, np.zeros(2))
    with pytest.raises(ValueError, match="moe_mean must be 1-d with one entry per lane"):
        _core.step_time(p.columns(), b, c, moe_mean=np.zeros(2), moe_p50=z, moe_p99=z)
    with pytest.raises(ValueError, match="a given straggler needs moe_mean, moe_p50 and moe_p99"):
        _core.step_time(p.columns(), b, c, moe_mean=z)
    moe = step_params(as_model("qwen3-30b-a3b"), as_precision("fp8"), qsengine.as_accelerator("h200-sxm"),
                      Plan(tp=1, dp=8, ep=8))
    with pytest.raises(ValueError, match=r"experts = 128, top_k = 8; expected 0, 0\)"):
        _core.step_time(moe.columns(), b[:1], c[:1])  # no routing law given
    with pytest.raises(ValueError, match="MoE lanes disagree on experts/top_k"):
        _core.step_time(moe.columns(), b[:1], c[:1], experts=64, top_k=8)
    with pytest.raises(ValueError, match=r"pi has 3 entries: must be 1-d with one entry per expert \(128\)"):
        _core.step_time(moe.columns(), b[:1], c[:1], experts=128, top_k=8, pi=np.ones(3))
    with pytest.raises(ValueError, match="kind = 'nope': must be one of roof, gemm"):
        _core.step_kernel("nope", p.columns(), z, z, z)
    with pytest.raises(ValueError, match="step_kernel: x has shape"):
        _core.step_kernel("roof", p.columns(), np.zeros(5), z, z)
    # nothing to do: no lanes
    e = np.zeros(0)
    assert _core.step_time(p.take(np.zeros(0, np.int64)).columns(), e, e)["time"].size == 0
