"""Precision-targeted routing runs: route(..., rtol=...)."""

import math

import numpy as np
import pytest

import qsengine as q
from qsengine.routing import RoutingPrecision, RoutingStats

E, K, B, G, L = 64, 4, 32, 8, 8
# Per-GPU coefficients with incommensurate ratios: the step time (sum of L
# straggler layer times) takes many distinct values, so its p99 is continuous
# enough for a spread across seeds to be measured.
COST = q.LayerCost(tuple(1.0e-6 * (1 + 0.13 * g) for g in range(G)), tuple(0.31e-6 * (1 + 0.071 * g) for g in range(G)))
MODEL = q.PowerLaw(1.0)
# block_size = 262144 // (B*K*L) = 256 microbatches; 32 sections of one block.
FIRST_CHECKPOINT = 32 * 256


def run(rtol, microbatches=10**6, seed=1, threads=None, routing=MODEL, cost=COST, layers=L):
    return q.route(E, K, B, microbatches, routing=routing, placement=G, seed=seed, threads=threads, layers=layers,
                   cost=cost, rtol=rtol)


def test_same_result_for_any_thread_count():
    runs = [run(2e-4, threads=t, seed=5) for t in (1, 2, 3)]
    assert runs[0].precision is not None and runs[0].precision.checkpoints > 1  # several rounds, not one
    assert runs[0] == runs[1] == runs[2]  # histograms, moments, microbatches and precision, bit for bit
    sticky = [q.route(E, K, B, 10**6, routing=q.Sticky(0.9, MODEL), placement=G, seed=2, layers=2, threads=t,
                      rtol=1e-3) for t in (1, 2, 3)]
    assert sticky[0] == sticky[1] == sticky[2]


def test_reached_precision_is_reported_and_within_rtol():
    for rtol in (1e-3, 3e-4):
        s = run(rtol)
        p = s.precision
        assert isinstance(p, RoutingPrecision)
        assert p.target_reached and s.target_reached
        assert 0 <= p.rse_mean <= rtol and 0 <= p.rse_p99 <= rtol
        assert (s.rse_mean, s.rse_p99) == (p.rse_mean, p.rse_p99)
        assert p.statistic == "step_time" and p.rtol == rtol and p.max_microbatches == 10**6
        assert 32 <= p.sections <= 64
        assert s.step_time.n == s.microbatches < 10**6


def test_looser_rtol_stops_earlier():
    n = [run(rtol).microbatches for rtol in (1e-3, 3e-4, 1.5e-4)]
    assert n[0] < n[1] < n[2]
    # the loosest target is met at the first checkpoint, the minimum of the schedule
    assert n[0] == FIRST_CHECKPOINT


def test_stops_on_the_checkpoint_schedule():
    # checkpoints: 32 sections, then 8 more at a time; past 64, pairs merge
    # (sections of 2 blocks), so totals in blocks are 32, 40, ..., 64, 80, 96, ..., 128, 160, ...
    allowed = {32 * 2**j + 8 * 2**j * i for j in range(12) for i in range(5)}
    for rtol in (1e-3, 5e-4, 3e-4, 2e-4):
        s = run(rtol)
        assert s.microbatches % 256 == 0 and s.microbatches // 256 in allowed, s.microbatches


def test_cap_is_respected_and_reported():
    for cap in (100, 5000, 20001):
        s = run(1e-9, microbatches=cap)
        p = s.precision
        assert s.microbatches == cap and s.step_time.n == cap
        assert not p.target_reached and s.target_reached is False
        assert p.rse_mean > 1e-9 and p.rse_p99 > 1e-9 and p.max_microbatches == cap


def test_without_rtol_nothing_changes():
    a = run(None, microbatches=3000)
    assert a.precision is None and a.target_reached is None and a.rse_mean is None and a.rse_p99 is None
    # A run stopped by rtol has the same statistics as a plain run of that many microbatches.
    s = run(1e-3)
    plain = run(None, microbatches=s.microbatches)
    assert plain.to_dict() | {"precision": None} == s.to_dict() | {"precision": None}


def test_straggler_statistic_without_cost():
    s = q.route(E, K, B, 10**6, routing=MODEL, placement=G, seed=4, layers=L, rtol=1e-3)
    assert s.precision.statistic == "gpu_assign_max" and s.target_reached
    assert s.precision.rse_mean <= 1e-3 and s.precision.rse_p99 <= 1e-3
    assert s.microbatches < 10**6


def _spread(runs, key):
    vals = np.array([key(s) for s in runs])
    return vals.std(ddof=1) / abs(vals.mean())


def test_rse_matches_the_spread_over_independent_seeds():
    # Run to a fixed size (rtol never reached: the cap is the first checkpoint,
    # 32 equal sections) and compare the reported relative standard errors with
    # the relative spread of the estimates over 60 independent seeds. The
    # spread's own relative error is about 1/sqrt(2*59) = 9%, the root mean
    # square of 60 sectioning estimates (31 degrees of freedom each) about 2%:
    # a factor 1.35 is > 3 standard errors. Layer times here are dominated by
    # the b term with B=64 (several p99 values across seeds, not one log bin).
    cost = q.LayerCost(COST.a, tuple(0.031e-6 * (1 + 0.071 * g) for g in range(G)))
    cap = 32 * (262144 // (64 * K * L))  # 32 blocks
    runs = [q.route(E, K, 64, cap, routing=MODEL, placement=G, seed=100 + i, layers=L, cost=cost, rtol=1e-12)
            for i in range(60)]
    assert all(s.microbatches == cap and not s.target_reached and s.precision.sections == 32 for s in runs)
    assert len({s.step_time.p99 for s in runs}) >= 5
    emp_mean = _spread(runs, lambda s: s.step_time.mean)
    emp_p99 = _spread(runs, lambda s: s.step_time.p99)
    rep_mean = math.sqrt(np.mean([s.rse_mean ** 2 for s in runs]))
    rep_p99 = math.sqrt(np.mean([s.rse_p99 ** 2 for s in runs]))
    assert 1 / 1.35 < rep_mean / emp_mean < 1.35, (rep_mean, emp_mean)
    assert 1 / 1.35 < rep_p99 / emp_p99 < 1.35, (rep_p99, emp_p99)


def test_rse_is_honest_under_correlated_routing():
    # Sticky routing: microbatches of a block are strongly correlated, so the
    # naive i.i.d. standard error std/sqrt(n) is far too small; the
    # block-sectioning estimate must match the spread over seeds.
    model = q.Sticky(0.95, MODEL)
    runs = [q.route(E, K, B, 256 * 32, routing=model, placement=G, seed=200 + i, layers=2, rtol=1e-12)
            for i in range(60)]
    emp = _spread(runs, lambda s: s.gpu_assign_max.mean)
    rep = math.sqrt(np.mean([s.rse_mean ** 2 for s in runs]))
    naive = np.mean([s.gpu_assign_max.sem / s.gpu_assign_max.mean for s in runs])
    assert 1 / 1.35 < rep / emp < 1.35, (rep, emp)
    assert naive < emp / 2, (naive, emp)  # the correlation matters here


@pytest.mark.parametrize("bad", [0, 0.0, -1e-3, 1, 1.0, 2.5, math.nan, math.inf, -math.inf])
def test_bad_rtol_values_are_rejected(bad):
    with pytest.raises(ValueError, match=r"rtol=.*: must be in \(0, 1\)"):
        run(bad, microbatches=10)


@pytest.mark.parametrize("bad", ["0.01", True, np.bool_(False), [0.01], 1j])
def test_rtol_of_the_wrong_type_is_rejected(bad):
    with pytest.raises(TypeError, match=r"rtol=.*must be a real number"):
        run(bad, microbatches=10)


def test_rtol_with_a_trace_is_rejected():
    ids = np.tile(np.arange(K, dtype=np.int64), (10, B, 1))
    with pytest.raises(ValueError, match=r"rtol=0.01: not available with a Trace"):
        q.route(E, K, B, 10, routing=q.Trace(ids), rtol=0.01)


def test_precision_survives_to_dict_and_is_dropped_by_merging():
    s = run(1e-3)
    back = RoutingStats.from_dict(s.to_dict())
    assert back == s and back.precision == s.precision
    assert (s + s).precision is None
    old = s.to_dict()
    del old["precision"]  # records written before precision-targeted runs
    assert RoutingStats.from_dict(old).precision is None
