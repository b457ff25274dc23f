"""The core's closed-form straggler (cpp/core/straggler.cc, ``_core.straggler_*``
behind qsengine.decode.straggler) against the numpy implementation it replaced
(tests/reference_straggler.py): uniform routing, popularity, redundant EPLB
slots, the ceiling and the layer-summed quantiles, on hypothesis lanes.

Agreement. The core's arithmetic is the oracle's operation by operation, its
sums numpy's pairwise sums; the one difference is the elementary functions:
numpy evaluates exp/expm1/log1p with its own SIMD kernels, the core with the
C library's. So (1) against the oracle run with the C library's exp/expm1/log1p
the core agrees to rel 1e-12 (in practice bit for bit): the proof that the
arithmetic is the same. (2) Against the plain numpy oracle, the results agree
to the oracle's own conditioning: its sd is sqrt(E[X²] − E[X]²), whose
cancellation loses (mean/sd)² ulps, so |Δ var| <= 1e-12·var + 1e3·eps·mean²;
under uniform routing the mean agrees to rel 1e-12; with popularity an ulp
of one π_e moves the oracle's 2049-point integral by up to ~1e4 ulps (measured:
2.9e-12 at 16k DeepSeek-V3 lanes) and can swap the order in which Clark folds
two slot classes of near-equal means (1.3e-9 measured), so there the mean is
held to rel 1e-8.
"""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qsengine import _core
from qsengine.decode import straggler as S
from qsengine.decode.slots import slot_layout

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_straggler as R  # noqa: E402

EPS = np.finfo(float).eps

# the oracle evaluates both branches of np.where: sqrt of a negative variance on lanes with tokens < 0, masked
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in sqrt:RuntimeWarning")


class _LibmNumpy(types.ModuleType):
    """numpy with exp, expm1 and log1p taken from the C library (math.*), as the core takes them."""

    def __init__(self) -> None:
        super().__init__("numpy_libm")
        for name, f in (("exp", math.exp), ("expm1", math.expm1), ("log1p", math.log1p)):
            uf = np.frompyfunc(f, 1, 1)
            setattr(self, name, lambda x, uf=uf: np.asarray(uf(x), dtype=np.float64))

    def __getattr__(self, name: str):
        return getattr(np, name)


@pytest.fixture
def libm_oracle(monkeypatch):
    monkeypatch.setattr(R, "np", _LibmNumpy())
    return R


def _rel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.abs(x - y) / np.maximum(np.abs(y), 1e-300)


# ---- hypothesis lanes ---------------------------------------------------------------------

@st.composite
def routing_cases(draw, slots: bool):
    """(experts, top_k, tokens, gpus, a, b, pi, redundant) over 1-8 lanes."""
    experts = draw(st.sampled_from([8, 16, 32, 64, 128, 256]))
    top_k = draw(st.integers(1, min(8, experts)))
    divisors = [g for g in (1, 2, 4, 8, 16, 32) if experts % g == 0]
    n = draw(st.integers(1, 8))
    gpus, red = [], []
    for _ in range(n):
        g = draw(st.sampled_from(divisors))
        r = 0
        if slots and g > 1:
            choices = [0] + [x for x in range(1, 2 * experts + 1) if (experts + x) % g == 0 and x <= experts * (g - 1)]
            r = draw(st.sampled_from(choices[:6]))
        gpus.append(g)
        red.append(r)
    tokens = draw(st.lists(st.one_of(st.just(0.0), st.floats(-5.0, 0.0),
                                     st.floats(0.01, 2e4, allow_nan=False)), min_size=n, max_size=n))
    a = draw(st.lists(st.floats(1e-7, 1e-4), min_size=n, max_size=n))
    b = draw(st.lists(st.floats(1e-9, 1e-6), min_size=n, max_size=n))
    pi = None
    if draw(st.booleans()):
        w = np.array(draw(st.lists(st.floats(0.01, 1.0), min_size=experts, max_size=experts)))
        pi = S._inclusion_probabilities(w, top_k)
    return (experts, top_k, np.array(tokens), np.array(gpus, dtype=np.int64), np.array(a), np.array(b), pi,
            np.array(red, dtype=np.int64) if slots else None)


def _oracle(case):
    experts, top_k, tokens, gpus, a, b, pi, red = case
    return R.straggler_closed_form(experts, top_k, tokens, gpus, a, b, pi, red)


_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_SETTINGS
@given(case=st.one_of(routing_cases(slots=False), routing_cases(slots=True)))
def test_core_equals_oracle_with_the_c_librarys_exp(case, libm_oracle):
    m0, s0 = _oracle(case)
    m1, s1 = S.straggler_closed_form(*case)
    assert np.all(_rel(m1, m0) <= 1e-12), (m1, m0)
    assert np.all(_rel(s1, s0) <= 1e-12), (s1, s0)


@_SETTINGS
@given(case=st.one_of(routing_cases(slots=False), routing_cases(slots=True)))
def test_core_equals_the_numpy_oracle(case):
    m0, s0 = _oracle(case)
    m1, s1 = S.straggler_closed_form(*case)
    assert np.all(_rel(m1, m0) <= (1e-12 if case[6] is None else 1e-8)), (m1, m0)
    assert np.all(np.abs(s1 ** 2 - s0 ** 2) <= 1e-12 * s0 ** 2 + 1e3 * EPS * m0 ** 2), (s1, s0, m0)


@_SETTINGS
@given(case=st.one_of(routing_cases(slots=False), routing_cases(slots=True)), seed=st.integers(0, 2 ** 32 - 1))
def test_a_lane_does_not_depend_on_its_neighbours(case, seed):
    experts, top_k, tokens, gpus, a, b, pi, red = case
    m, s = S.straggler_closed_form(*case)
    order = np.random.default_rng(seed).permutation(tokens.size)
    mp, sp = S.straggler_closed_form(experts, top_k, tokens[order], gpus[order], a[order], b[order], pi,
                                     None if red is None else red[order])
    assert np.array_equal(mp, m[order]) and np.array_equal(sp, s[order])
    for i in range(tokens.size):
        mi, si = S.straggler_closed_form(experts, top_k, tokens[i:i + 1], gpus[i:i + 1], a[i:i + 1], b[i:i + 1], pi,
                                         None if red is None else red[i:i + 1])
        assert mi[0] == m[i] and si[0] == s[i]


def test_max_iid_normal_equals_the_oracle():
    for g in [1, 2, 3, 5, 8, 16, 17, 64, 256, 1024]:
        c, s = S.max_iid_normal(g)
        c0, s0 = R.max_iid_normal(g)
        assert abs(c - c0) <= 1e-12 * max(abs(c0), 1e-300) and abs(s - s0) <= 1e-12 * s0
    assert S.max_iid_normal(2)[0] == pytest.approx(1 / math.sqrt(math.pi), rel=1e-10)


@settings(max_examples=40, deadline=None)
@given(e=st.integers(1, 64), k=st.integers(1, 16), tokens=st.floats(0, 1e5), a=st.floats(0, 1e-3),
       b=st.floats(0, 1e-5))
def test_ceiling_equals_the_oracle_and_broadcasts(e, k, tokens, a, b):
    assert S.straggler_ceiling(e, k, tokens, a, b) == R.straggler_ceiling(e, k, tokens, a, b)
    tok = np.array([[tokens], [2 * tokens]])  # (2, 1) against (3,): numpy broadcasting
    ee = np.array([e, e + 1, 2 * e])
    assert np.array_equal(S.straggler_ceiling(ee, k, tok, a, b), R.straggler_ceiling(ee, k, tok, a, b))


@_SETTINGS
@given(case=routing_cases(slots=True), layers=st.lists(st.sampled_from([0, 3, 58]), min_size=8, max_size=8),
       uniform=st.booleans())
def test_quantiles_equal_the_oracle(case, layers, uniform, libm_oracle):
    experts, top_k, tokens, gpus, a, b, pi, red = case
    n = tokens.size
    L = np.array(layers[:n], dtype=np.float64)
    moe = L > 0
    p = types.SimpleNamespace(
        moe_layers=L, experts=np.where(moe, experts, 1).astype(float), top_k=np.where(moe, top_k, 1).astype(float),
        ep=gpus.astype(float), redundant=np.where(moe, red, 0).astype(float), moe_a=a, moe_b=b)
    got = S.straggler_quantiles(p, tokens, pi, uniform)
    want = R.straggler_quantiles(p, tokens, pi, uniform)
    for g, w in zip(got, want):
        assert np.all(_rel(g, w) <= 1e-12), (g, w)
    assert np.all(got[2] >= got[0]) and np.array_equal(got[0], got[1])
    assert np.all(got[0][~moe] == 0) and np.all(got[2][~moe] == 0)


def test_quantiles_of_dense_lanes_are_zero_whatever_the_law():
    one = np.ones(3)
    p = types.SimpleNamespace(moe_layers=one * 0, experts=one, top_k=one, ep=one, redundant=one * 0,
                              moe_a=one * 0, moe_b=one * 0)
    for got in S.straggler_quantiles(p, np.array([1.0, 50.0, 0.0]), np.full(64, 0.1), uniform=False):
        assert np.array_equal(got, np.zeros(3))


def test_quantiles_one_routing_law_per_call():
    one = np.ones(2)
    p = types.SimpleNamespace(moe_layers=one * 4, experts=np.array([64.0, 32.0]), top_k=one * 2, ep=one * 4,
                              redundant=one * 0, moe_a=one * 1e-6, moe_b=one * 1e-8)
    with pytest.raises(ValueError, match="disagree on experts/top_k"):
        S.straggler_quantiles(p, np.array([10.0, 10.0]))


def test_bad_input_is_named():
    t, g, a, b = np.array([10.0, 20.0]), np.array([4, 4]), np.full(2, 1e-6), np.full(2, 1e-8)
    cf = S.straggler_closed_form
    with pytest.raises(ValueError, match=r"gpus\[1\] = 0: must be >= 1"):
        cf(16, 2, t, np.array([4, 0]), a, b)
    with pytest.raises(ValueError, match=r"tokens\[0\] = nan: must be finite"):
        cf(16, 2, np.array([np.nan, 1.0]), g, a, b)
    with pytest.raises(ValueError, match=r"b\[0\] = -1: must be finite and >= 0"):
        cf(16, 2, t, g, a, np.array([-1.0, 1e-8]))
    with pytest.raises(ValueError, match=r"pi has 15 entries: must be 1-d with one entry per expert \(16\)"):
        cf(16, 2, t, g, a, b, np.full(15, 0.125))
    with pytest.raises(ValueError, match=r"pi\[3\] = 2: an inclusion probability must be in \[0, 1\]"):
        cf(16, 2, t, g, a, b, np.where(np.arange(16) == 3, 2.0, 0.1))
    with pytest.raises(ValueError, match=r"gpus\[0\] = 3: must divide experts = 16 under popularity"):
        cf(16, 2, t, np.array([3, 4]), a, b, np.full(16, 0.125))
    with pytest.raises(ValueError, match=r"top_k = 17: must be in \[1, experts = 16\]"):
        cf(16, 17, t, g, a, b)
    with pytest.raises(ValueError, match=r"gpus has shape \(3\): must be 1-d with one entry per lane \(2\)"):
        _core.straggler_closed_form(16, 2, t, np.array([4, 4, 4]), a, b)
    with pytest.raises(ValueError, match=r"layouts has no slot layout for gpus = 4, redundant = 4 \(lane 0\)"):
        _core.straggler_closed_form(16, 2, t, g, a, b, None, np.array([4, 4]), [])
    lay = slot_layout(np.full(16, 2 / 16), 4, 4)
    bad = (4, 4, lay.class_expert + 16, lay.class_share, lay.class_count)
    with pytest.raises(ValueError, match=r"class_expert holds \d+: expert indices must be in \[0, experts\)"):
        _core.straggler_closed_form(16, 2, t, g, a, b, None, np.array([4, 4]), [bad])
    with pytest.raises(ValueError, match=r"field 'moe_b' is missing"):
        _core.straggler_quantiles(16, 2, t, {"moe_layers": t, "experts": t, "top_k": t, "ep": t, "redundant": t,
                                             "moe_a": t})
