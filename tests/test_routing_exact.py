"""Exactness of the routing sampler's pick order against closed-form Plackett-Luce.

The engine draws with a 16-bit alias table padded to 256 columns (E <= 256),
a 32-bit alias table (E > 256), and an exact sequential fallback when a token's
remaining mass is tiny; each path must give the sequential-without-replacement
law pick by pick, not only in aggregate.
"""

import itertools

import numpy as np
import pytest

import qsengine as q
from qsengine.routing import sample_routing


def _check(freq, p, n):
    sigma = np.sqrt(p * (1 - p) / n)
    bad = np.abs(freq - p) > 6 * sigma + 2e-4
    assert not bad.any(), (np.flatnonzero(bad), freq[bad], p[bad])


@pytest.mark.parametrize("E", [200, 256, 300])
def test_first_and_second_pick_laws(E):
    k, B, n = 4, 64, 1500
    model = q.PowerLaw(1.2)
    s = q.route(E, k, B, 2, routing=model, seed=3)
    w = np.asarray(s.layer_weights[0], dtype=float)
    sel = sample_routing(E, k, B, n, routing=model, seed=3).reshape(-1, k)
    assert sel.max() < E  # padded columns (E < 256) are never drawn
    tokens = sel.shape[0]
    # P(first = i) = w_i;  P(second = j) = sum_{i != j} w_i w_j / (1 - w_i)
    p1 = w
    p2 = w * (np.sum(w / (1 - w)) - w / (1 - w))
    _check(np.bincount(sel[:, 0], minlength=E) / tokens, p1, tokens)
    _check(np.bincount(sel[:, 1], minlength=E) / tokens, p2, tokens)


def _exact_position_laws(w, k):
    w = np.asarray(w, dtype=float) / np.sum(w)
    E = len(w)
    law = np.zeros((k, E))
    for perm in itertools.permutations(range(E), k):
        p, rest = 1.0, 1.0
        for e in perm:
            p *= w[e] / rest
            rest -= w[e]
        for j, e in enumerate(perm):
            law[j, e] += p
    return law


@pytest.mark.parametrize("weights,k", [
    ((5, 1, 1, 0.5, 0.2, 3), 4),                     # ordinary rejection sampling
    ((1, 1, 1e-3, 2e-3, 3e-3, 4e-3), 4),             # picks 3-4: remaining mass ~0.5%, exact fallback
    ((1e6, 1, 2, 3, 4), 5),                          # k = E after a dominant expert
])
def test_every_pick_position_matches_enumeration(weights, k):
    E, B, n = len(weights), 40, 500
    model = q.Popularity(weights)
    sel = sample_routing(E, k, B, n, routing=model, seed=11).reshape(-1, k)
    tokens = sel.shape[0]
    law = _exact_position_laws(weights, k)
    for j in range(k):
        _check(np.bincount(sel[:, j], minlength=E) / tokens, law[j], tokens)


@pytest.mark.parametrize("make", [lambda w: w, lambda w: q.Sticky(0.5, w)])
def test_weights_that_underflow_when_normalised_are_still_drawn(make):
    # 5e-324 / sum underflows to 0; with k = E every positive-weight expert
    # must still be picked (this used to index expert -1 in the fallback).
    weights = (7.2, 8.9, 5e-324, 1e-195, 1.9, 5.9e-195, 9.9, 1e-300)
    E = k = len(weights)
    model = make(q.Popularity(weights))
    sel = sample_routing(E, k, 6, 30, routing=model, seed=0)
    assert (np.sort(sel, axis=-1) == np.arange(E)).all()
    s = q.route(E, k, 6, 30, routing=model, seed=0)
    assert s.unique.mean == E
    assert (np.asarray(s.layer_weights[0]) > 0).all()
