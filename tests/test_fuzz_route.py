"""Fuzz qsengine.route and the routing models (see tests/_fuzz.py for the rules)."""

from __future__ import annotations

import functools
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qsengine as q
from _fuzz import JUNK, call_args, fuzz_settings, maybe, memory_limited, outcome

ROUTE_NAMES = ["experts", "top_k", "batch", "microbatches", "layers", "threads", "seed", "routing", "placement",
               "cost", "weights", "alpha", "concentration", "groups", "top_groups", "rho", "expert_ids",
               "memory limit", "expert_map", "gpus"]

_weights = st.lists(st.one_of(st.floats(0, 10), st.sampled_from([0.0, 5e-324, 1e-310, 1e-300, 1e300, 1e308,
                                                                 float("nan"), float("inf"), -1.0])),
                    min_size=0, max_size=12)
def _lazy(func, *args):
    """A recipe: routing objects validate on construction, which must happen
    inside the test (a refusal there is an allowed outcome too)."""
    return st.builds(functools.partial, st.just(func), *args)


def realize(x):
    if isinstance(x, functools.partial):
        return x.func(*[realize(a) for a in x.args])
    return x


_base = st.one_of(
    st.just(q.Uniform()),
    _lazy(q.PowerLaw, maybe(st.floats(-1, 5)), maybe(st.sampled_from(["fixed", "per_layer"]))),
    _lazy(q.Dirichlet, maybe(st.one_of(st.floats(0, 5), st.lists(st.floats(0, 5), max_size=12)))),
    _lazy(q.Popularity, maybe(_weights)),
)
_routing = st.one_of(
    _base,
    _lazy(q.GroupLimited, maybe(st.integers(0, 12)), maybe(st.integers(0, 12)), _base),
    _lazy(q.Sticky, maybe(st.floats(-0.5, 1.5)), _base),
    _lazy(q.Trace, st.integers(1, 3).flatmap(
        lambda s: st.lists(st.lists(st.lists(st.integers(-2, 14), min_size=1, max_size=4), min_size=1, max_size=3)
                           .filter(lambda t: len({len(r) for r in t}) == 1), min_size=s, max_size=s)
        .filter(lambda x: len({len(t) for t in x}) == 1 and len({len(t[0]) for t in x}) == 1))),
    st.sampled_from(["uniform", "powerlaw:1.0", "powerlaw:1.2:per_layer", "dirichlet:0.5", "group:4:2",
                     "group:4:2:powerlaw:1.01", "sticky:0.5", "sticky:0.5:powerlaw:1", "powerlaw:nan",
                     "powerlaw:inf", "powerlaw", "group:0:0", "sticky:2", "zipf", "trace:/nonexistent.npy", "",
                     "powerlaw:1:2:3", "group:3:1:uniform:x"]),
)
_placement = st.one_of(st.none(), st.integers(-1, 9), st.builds(q.Placement.contiguous, st.integers(1, 6)),
                       st.builds(q.Placement.round_robin, st.integers(1, 6)))
_cost = st.one_of(st.none(), _lazy(q.LayerCost, st.floats(1e-6, 1e-3), st.floats(0, 1e-5)),
                  st.tuples(maybe(st.floats(-1, 1)), maybe(st.floats(-1, 1))))


ROUTE_VALID = dict(
    experts=st.integers(1, 24), top_k=st.integers(1, 8), batch=st.integers(1, 24), microbatches=st.integers(0, 40),
    layers=st.integers(1, 3), routing=_routing, placement=_placement, cost=_cost,
    seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)), threads=st.one_of(st.none(), st.integers(1, 4)),
)
ROUTE_BAD = dict(
    experts=st.sampled_from([0, -1, 2**31, 2**40, 2**63, 2**64, 1.5, True]),
    top_k=st.sampled_from([0, -1, 2**31, 2**63]),
    batch=st.sampled_from([0, -1, 2**40, 2**62, 2**63, 2**64]),
    microbatches=st.sampled_from([-1, None, 2**64, 1.0]),
    layers=st.sampled_from([0, -1, 2**63, 2**64]),
    threads=st.sampled_from([0, -1, 2**31, 2**63]),
    seed=st.sampled_from([-1, 2**128, 1.5, "1"]),
)


@fuzz_settings(300)
@given(args=call_args(ROUTE_VALID, ROUTE_BAD))
def test_fuzz_route(args):
    kw, changed = args
    with memory_limited():
        s = outcome("route", lambda: q.route(kw["experts"], kw["top_k"], kw["batch"], kw["microbatches"],
                                             routing=realize(kw["routing"]), placement=kw["placement"],
                                             seed=kw["seed"], threads=kw["threads"], layers=kw["layers"],
                                             cost=realize(kw["cost"])), ROUTE_NAMES,
                    [kw["routing"] if isinstance(kw["routing"], str) else None])
    if s is None:
        return
    E, k, B, L = s.config.experts, s.config.top_k, s.config.batch, s.config.layers
    mb = s.microbatches
    vals, cnt = s.unique.histogram
    assert int(cnt.sum()) == mb * L
    if mb:
        assert vals[cnt > 0].min() >= k and vals[cnt > 0].max() <= min(E, B * k)
    assert int(s.histogram("gpu_assign_sum").sum()) == mb * L * B * k
    assert int(s.tokens_per_expert.counts.sum()) == mb * L * E
    for d in (s.unique, s.gpu_assign_max, s.gpu_unique_max):
        assert d.n == 0 or np.isfinite(d.mean)


@fuzz_settings(150)
@given(make=st.sampled_from([q.PowerLaw, q.Dirichlet, q.Popularity, q.Sticky, q.GroupLimited, q.Trace,
                             q.LayerCost, q.Placement, q.Placement.contiguous, q.Placement.round_robin,
                             q.Placement.explicit]),
       args=st.lists(st.one_of(JUNK, st.floats(-2, 2), st.integers(-2, 8), _weights), max_size=3))
def test_fuzz_routing_specs(make, args):
    """Constructors of the routing models, placements and costs: validated object or a named error."""
    names = ROUTE_NAMES + ["routing.", "cost.", "placement", "ranks", "base", "expert_ids", "a", "b"]
    try:
        outcome("routing specs", lambda: make(*args), names)
    except TypeError as exc:  # wrong arity is Python's own message: fine
        if "positional argument" not in str(exc) and "required" not in str(exc):
            raise


@fuzz_settings(60)
@given(B=st.sampled_from([10**6, 10**9, 2**40, 2**62]), E=st.sampled_from([8, 256, 2**31, 2**40]),
       mb=st.integers(1, 10))
def test_fuzz_route_huge_requests_refused_before_allocating(B, E, mb):
    """Huge batch/expert counts are refused by the memory estimate (never an allocation failure)."""
    with memory_limited(64 << 20):
        s = outcome("route", lambda: q.route(E, 2, B, mb, seed=1, threads=1), ROUTE_NAMES)
    assert s is None or s.config.batch * 2 * 8 < 64 << 20


_CORE_CRASH = """
import numpy as np
from qsengine import _core
# Weights the core accepts as 4 positive values, but 5e-324 / sum underflows to
# 0 in its normalisation: with top_k = experts the exact fallback finds no
# eligible expert and writes expert -1.
req = _core.RouteRequest()
req.experts, req.top_k, req.batch, req.microbatches, req.layers = 4, 4, 1, 200, 1
req.model.base.kind = _core.WeightKind.Popularity
req.model.base.weights = np.array([1.0, 1.0, 1.0, 5e-324])
req.placement.gpus, req.placement.expert_gpus = 1, [[0], [0], [0], [0]]
req.key, req.memory_limit, req.record = (1, 2), 1 << 30, True
r = _core.route(req, 1)
sel = np.asarray(r.selections)
assert ((sel >= 0) & (sel < 4)).all(), f"expert ids out of range: min {sel.min()}"
print("ok")
"""


def test_core_route_survives_weights_that_underflow_when_normalised():
    p = subprocess.run([sys.executable, "-c", _CORE_CRASH], capture_output=True, text=True, timeout=120)
    assert (p.returncode == 0 and "ok" in p.stdout) or "ValueError" in p.stderr, (p.returncode, p.stderr[-2000:])


def test_popularity_refuses_weights_the_core_cannot_normalise():
    # a weight that underflows on normalising stays drawable (the core floors it)
    s = q.route(4, 4, 1, 10, routing=q.Popularity((1.0, 1.0, 1.0, 5e-324)), seed=1)
    assert set(s.unique.values[s.unique.counts > 0]) == {4}
    with pytest.raises(ValueError, match="overflows"):
        q.Popularity((1e308, 1e308, 1.0))
    # tiny but representable relative to the sum is fine
    s = q.route(4, 4, 1, 10, routing=q.Popularity((1.0, 1.0, 1.0, 1e-200)), seed=1)
    assert set(s.unique.values[s.unique.counts > 0]) == {4}


_CORE_UB = """
from qsengine import _core
try:
    req = _core.RouteRequest()
    req.experts, req.top_k, req.batch, req.microbatches, req.layers = 4, 2, 2**62, 1, 1
    req.placement.gpus, req.placement.expert_gpus = 1, [[0], [0], [0], [0]]
    req.key, req.memory_limit = (1, 2), 1 << 30
    _core.route(req, 1)
except ValueError as exc:
    print(exc)
"""


def test_core_batch_times_top_k_message_does_not_overflow():
    p = subprocess.run([sys.executable, "-c", _CORE_UB], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "batch*top_k=9223372036854775808 " in p.stdout, (p.stdout, p.stderr[-1500:])


def test_route_checks_core_bounds_before_building_anything():
    with pytest.raises(ValueError, match=r"batch\*top_k=9223372036854775808 must be < 2\^31"):
        q.route(4, 2, 2**62, 1)
    with pytest.raises(ValueError, match="experts=16777217: must be between 1 and 16777216"):
        q.route(2**24 + 1, 2, 1, 1)
