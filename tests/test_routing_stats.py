"""Statistical and invariant tests of qsengine.route."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qsengine as q
from qsengine.routing import sample_routing


@pytest.mark.parametrize("E,k,B", [(64, 4, 16), (256, 8, 64), (16, 2, 3), (8, 8, 5), (256, 8, 1)])
def test_uniform_mean_and_variance_match_closed_form(E, k, B):
    n = 40000
    u = q.route(E, k, B, n, seed=11).unique
    mu, var = q.expected_unique(E, k, B), q.unique_variance(E, k, B)
    if var == 0:
        assert u.mean == mu and u.var == 0
        return
    # mean within 5 standard errors; variance within 5 standard errors of s^2
    assert abs(u.mean - mu) < 5 * math.sqrt(var / n)
    # Var(s^2) ~ (mu4 - var^2)/n; bound it generously with the empirical 4th moment.
    vals, cnts = u.histogram
    m4 = float(np.dot((vals - u.mean) ** 4, cnts.astype(float)) / n)
    assert abs(u.var - var) < 5 * math.sqrt(max(m4 - var**2, 1e-12) / n) + 1e-9


def test_closed_form_variance_brute_force():
    # tiny case enumerated exactly: E=4, k=2, B=2
    import itertools

    subsets = list(itertools.combinations(range(4), 2))
    us = [len(set(a) | set(b)) for a in subsets for b in subsets]
    assert math.isclose(np.mean(us), q.expected_unique(4, 2, 2))
    assert math.isclose(np.var(us), q.unique_variance(4, 2, 2))


def _models(E):
    return st.one_of(
        st.just(q.Uniform()),
        st.builds(q.PowerLaw, st.floats(0, 3), st.sampled_from(["fixed", "per_layer"])),
        st.builds(q.Dirichlet, st.floats(0.05, 5)),
        # all-zero weights are invalid input (Popularity raises): not a routing case
        st.lists(st.floats(0, 10), min_size=E, max_size=E).filter(lambda w: any(x > 0 for x in w))
        .map(lambda w: q.Popularity(tuple(w))),
    )


@st.composite
def configs(draw):
    E = draw(st.integers(1, 40))
    k = draw(st.integers(1, E))
    B = draw(st.integers(1, 30))
    G = draw(st.integers(1, 6))
    model = draw(_models(E))
    if isinstance(model, q.Popularity) and sum(w > 0 for w in model.weights) < k:
        model = q.Uniform()
    kind = draw(st.sampled_from(["plain", "group", "sticky"]))
    if kind == "group":
        divisors = [d for d in range(1, E + 1) if E % d == 0]
        groups = draw(st.sampled_from(divisors))
        gs = E // groups
        top = draw(st.integers(min(groups, -(-k // gs)), groups))
        if not isinstance(model, q.Popularity):
            model = q.GroupLimited(groups, top, model)
    elif kind == "sticky":
        model = q.Sticky(draw(st.floats(0, 1)), model)
    layers = draw(st.integers(1, 3))
    return E, k, B, G, model, layers


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs(), st.integers(0, 2**32))
def test_invariants(cfg, seed):
    E, k, B, G, model, layers = cfg
    mb = 50
    s = q.route(E, k, B, mb, routing=model, placement=q.Placement.round_robin(G), seed=seed, layers=layers,
                cost=q.LayerCost(1e-4, 1e-6))
    u_vals, u_cnt = s.unique.histogram
    assert int(u_cnt.sum()) == mb * layers
    assert u_vals.min() >= k and u_vals.max() <= min(E, B * k)
    if B == 1:
        assert set(u_vals) == {k}
    if k == E:
        assert set(u_vals) == {E}
    assert int(s.histogram("gpu_assign_sum").sum()) == mb * layers * B * k
    assert int(s.tokens_per_expert.counts.sum()) == mb * layers * E
    assert s.gpu_assign_max.n == mb * layers and s.step_time.n == mb
    # the straggler carries at least the mean load
    assert s.gpu_assign_max.values[s.gpu_assign_max.counts > 0].min() >= B * k / G - 1e-9
    sel = sample_routing(E, k, B, 5, routing=model, seed=seed, layers=layers)
    assert sel.shape == (5, layers, B, k)
    assert ((sel >= 0) & (sel < E)).all()
    srt = np.sort(sel, axis=-1)
    assert (np.diff(srt, axis=-1) > 0).all(), "a token's experts must be distinct"


def gumbel_topk_reference(weights, k, B, n, rng):
    """Slow, obvious exact Plackett-Luce: top-k of log w + Gumbel noise."""
    with np.errstate(divide="ignore"):
        logw = np.log(np.asarray(weights, dtype=float))  # zero weight -> -inf: never picked
    g = rng.gumbel(size=(n, B, len(weights)))
    return np.argsort(-(logw + g), axis=-1)[..., :k]


@pytest.mark.parametrize("model", [q.PowerLaw(1.0), q.PowerLaw(2.5), q.Popularity((5, 1, 1, 0.5, 0.2, 3, 0, 8, 1, 1, 2, 0.1)),
                                   q.Dirichlet(0.3)])
def test_skewed_matches_gumbel_reference(model):
    E, k, B, n = 12, 4, 6, 20000
    s = q.route(E, k, B, n, routing=model, seed=5)
    w = s.layer_weights[0]
    sel = sample_routing(E, k, B, n, routing=model, seed=5)
    ref = gumbel_topk_reference(w, k, B, n // 4, np.random.default_rng(0))
    f_eng = np.bincount(sel.ravel(), minlength=E) / sel.size
    f_ref = np.bincount(ref.ravel(), minlength=E) / ref.size
    # per-expert selection frequency: binomial-ish errors, generous 6-sigma band
    sigma = np.sqrt(f_ref * (1 - f_ref) / ref.size) + np.sqrt(f_eng * (1 - f_eng) / sel.size)
    assert np.all(np.abs(f_eng - f_ref) <= 6 * sigma + 1e-4), (f_eng, f_ref)
    # E[u]
    u_ref = np.array([len(np.unique(x)) for x in ref.reshape(ref.shape[0], -1)])
    assert abs(s.unique.mean - u_ref.mean()) < 6 * (u_ref.std() / math.sqrt(u_ref.size) + s.unique.sem) + 1e-9
    # the first pick's law is exactly proportional to the weights
    first = np.bincount(sel[..., 0].ravel(), minlength=E) / sel[..., 0].size
    assert np.all(np.abs(first - w) < 6 * np.sqrt(w * (1 - w) / sel[..., 0].size) + 1e-4)


def test_powerlaw_per_layer_ranks_differ_and_fixed_ranks_are_ordered():
    s = q.route(32, 2, 4, 10, routing=q.PowerLaw(1.0, "per_layer"), layers=3, seed=1)
    w = s.layer_weights
    assert w.shape == (3, 32) and not np.allclose(w[0], w[1])
    np.testing.assert_allclose(np.sort(w[0]), np.sort(w[1]))
    f = q.route(32, 2, 4, 10, routing=q.PowerLaw(1.0), seed=1).layer_weights[0]
    assert np.all(np.diff(f) < 0)


def test_group_limited_respects_groups():
    E, groups, top = 64, 8, 3
    model = q.GroupLimited(groups, top, q.PowerLaw(1.01))
    sel = sample_routing(E, 8, 16, 300, routing=model, seed=3, layers=2)
    g = sel // (E // groups)
    per_token = np.array([len(np.unique(row)) for row in g.reshape(-1, 8)])
    assert per_token.max() <= top
    # and the limit binds: with top=3 of 8 groups, tokens often span exactly 3
    assert (per_token == top).mean() > 0.3


def test_group_limited_single_group_equals_plain_plackett_luce_in_law():
    E, k = 16, 3
    a = q.route(E, k, 8, 20000, routing=q.GroupLimited(1, 1, q.PowerLaw(1.5)), seed=1).unique
    b = q.route(E, k, 8, 20000, routing=q.PowerLaw(1.5), seed=2).unique
    assert abs(a.mean - b.mean) < 5 * math.hypot(a.sem, b.sem)


def test_sticky_extremes():
    E, k, B = 32, 4, 8
    # rho=1: each token repeats its first draw within a block
    sel = sample_routing(E, k, B, 50, routing=q.Sticky(1.0), seed=4)
    assert (np.sort(sel, -1) == np.sort(sel[:1], -1)).all()
    # rho=0 is plain uniform routing in law
    a = q.route(E, k, B, 20000, routing=q.Sticky(0.0), seed=1).unique
    assert abs(a.mean - q.expected_unique(E, k, B)) < 5 * a.sem
    # correlation: with rho=0.9 consecutive steps share most experts
    sel = sample_routing(E, k, B, 100, routing=q.Sticky(0.9), seed=4)
    same = np.mean([len(set(sel[m, 0, t]) & set(sel[m + 1, 0, t])) for m in range(99) for t in range(B)])
    assert same > 0.85 * k


def test_trace_replay_hand_counted(tmp_path):
    ids = np.array([
        [[0, 1], [0, 1], [2, 3]],   # step 0: u=4, counts {0:2,1:2,2:1,3:1}
        [[0, 5], [1, 5], [5, 4]],   # step 1: u=4, counts {0:1,1:1,4:1,5:3}
    ])
    path = tmp_path / "trace.npz"
    np.savez(path, expert_ids=ids)
    tr = q.Trace.load(path)
    # GPUs: contiguous over 2 -> experts 0..2 on GPU 0, 3..5 on GPU 1
    s = q.route(6, 2, 3, None, routing=tr, placement=q.Placement.contiguous(2))
    assert s.microbatches == 2
    assert s.histogram("unique_hist").tolist() == [0, 0, 0, 0, 2, 0, 0]
    # step 0: n = (5, 1), u_g = (3, 1); step 1: n = (2, 4), u_g = (2, 2)
    assert s.histogram("gpu_assign_sum").tolist() == [7, 5]
    assert s.histogram("gpu_unique_sum").tolist() == [5, 3]
    assert s.gpu_assign_max.histogram[0].tolist() == [4, 5]
    assert s.gpu_unique_max.histogram[0].tolist() == [2, 3]
    # tokens per expert over 6 experts x 2 steps: zeros 2+2, ones 2+3, twos 2, threes 1
    assert s.histogram("tokens_per_expert_hist").tolist() == [4, 5, 2, 1]
    np.save(tmp_path / "t.npy", ids)
    s2 = q.route(6, 2, 3, 1, routing=q.Trace.load(tmp_path / "t.npy"), layers=2)
    assert s2.histogram("unique_hist").tolist() == s.histogram("unique_hist").tolist()


def test_replicas_split_tokens_round_robin():
    # expert 0 replicated on GPUs 0 and 1; a trace sends every token to expert 0 (+1 distinct other)
    ids = np.array([[[0, 2], [0, 3], [0, 2], [0, 3]]])
    pl = q.Placement.explicit([0, 0, 1, 1], gpus=2).with_replicas({0: [1]})
    s = q.route(4, 2, 4, None, routing=q.Trace(ids), placement=pl)
    # tokens 0,2 -> replica on GPU 0; tokens 1,3 -> replica on GPU 1
    assert s.histogram("gpu_assign_sum").tolist() == [2, 6]
    assert s.histogram("gpu_unique_sum").tolist() == [1, 3]
    assert s.unique.mean == 3


def test_layer_cost_exact_for_trace():
    ids = np.array([[[0, 1], [0, 2]]])
    s = q.route(4, 2, 2, None, routing=q.Trace(ids), placement=q.Placement.contiguous(2),
                cost=q.LayerCost(a=(1.0, 2.0), b=(0.1, 0.1)))
    # GPU0: experts 0,1 -> u=2, n=3 ; GPU1: expert 2 -> u=1, n=1 -> max(max(2, .3), max(2, .1)) = 2
    assert s.layer_time.mean == 2.0
    assert abs(s.layer_time.p50 - 2.0) / 2.0 < 1e-3
