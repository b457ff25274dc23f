"""The closed-form straggler in numpy: the slow test oracle of the core's
``qs::straggler`` (cpp/core/straggler.cc, bound as ``_core.straggler_*``).

This is the implementation qsengine.decode.straggler carried before the
arithmetic moved into the C++ core (issues #11/#12/#14), kept verbatim so
that tests/test_straggler_core.py proves the core does the same arithmetic:
uniform routing by ``max_iid_normal``, popularity by ``_expected_max_normals``,
redundant slots by ``_slot_straggler`` + ``_clark_max``, the ceiling and the
layer-summed quantiles. Formulas: docs/model.md, "Routed experts" and
"Redundant expert slots".
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from qsengine.decode.params import StepParams

#: z of the normal 0.99 quantile (p99 = mean + Z99·sd of the summed straggler).
Z99 = 2.3263478740408408


_MAX_IID: dict[int, tuple[float, float]] = {}


def max_iid_normal(g: int) -> tuple[float, float]:
    """(c_G, s_G): mean and standard deviation of the maximum of G independent
    standard normals, by one numerical integral per G (cached):
    c_G = ∫ x·G·φ(x)·Φ(x)^(G−1) dx on [−12, 12] (trapezoid, 24 001 points,
    |error| < 1e-10); c_1 = 0, s_1 = 1."""
    g = int(g)
    got = _MAX_IID.get(g)
    if got is None:
        if g <= 1:
            got = (0.0, 1.0)
        else:
            x = np.linspace(-12.0, 12.0, 24001)
            cdf = 0.5 * np.array([math.erfc(-v / math.sqrt(2.0)) for v in x])
            pdf = g * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi) * cdf ** (g - 1)
            m1 = float(np.trapezoid(x * pdf, x))
            m2 = float(np.trapezoid(x * x * pdf, x))
            got = (m1, math.sqrt(max(m2 - m1 * m1, 0.0)))
        _MAX_IID[g] = got
    return got


def _erf(z: np.ndarray) -> np.ndarray:
    """Vectorised erf (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7)."""
    sign = np.sign(z)
    x = np.abs(z)
    with np.errstate(over="ignore"):  # x*x overflows to inf for σ -> 0: exp(-inf) = 0, as intended
        t = 1.0 / (1.0 + 0.3275911 * x)
        poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
        return sign * (1.0 - poly * np.exp(-x * x))


_GRID = 2049


def _expected_max_normals(mu: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of the maximum of independent normals N(mu_ig, sigma_ig²),
    one maximum per row i (shape (N, G) -> two (N,) arrays), by numerical
    integration of the CDF of the maximum, F(x) = Π_g Φ((x-μ_g)/σ_g), on 2049
    points over [min(μ−8σ), max(μ+8σ)]. Rows are independent: a row's result
    does not depend on the other rows (products over g are taken in g order,
    sums run along contiguous rows)."""
    mu = np.ascontiguousarray(mu, dtype=np.float64)
    sigma = np.maximum(np.ascontiguousarray(sigma, dtype=np.float64), 1e-300)
    n, g = mu.shape
    if g == 1:
        return mu[:, 0].copy(), sigma[:, 0].copy()
    lo = np.min(mu - 8 * sigma, axis=1)
    hi = np.max(mu + 8 * sigma, axis=1)
    m1 = np.max(mu, axis=1)
    sd = np.zeros(n)
    ok = hi > lo
    for s in range(0, n, 64):  # blocks keep the (rows, grid) temporaries small
        rows = np.flatnonzero(ok[s:s + 64]) + s
        if rows.size == 0:
            continue
        frac = np.linspace(0.0, 1.0, _GRID)
        x = lo[rows, None] + (hi[rows] - lo[rows])[:, None] * frac[None, :]
        cdf = np.ones_like(x)
        for j in range(g):
            z = (x - mu[rows, j, None]) / (sigma[rows, j, None] * math.sqrt(2.0))
            cdf *= 0.5 * (1.0 + _erf(z))
        pdf = np.gradient(cdf, axis=1) / np.gradient(x, axis=1)
        dx = np.diff(x, axis=1)
        a1 = x * pdf
        a2 = x * a1
        e1 = np.sum(dx * (a1[:, 1:] + a1[:, :-1]) / 2.0, axis=1)
        e2 = np.sum(dx * (a2[:, 1:] + a2[:, :-1]) / 2.0, axis=1)
        m1[rows] = e1
        sd[rows] = np.sqrt(np.maximum(e2 - e1 * e1, 0.0))
    return m1, sd


def straggler_ceiling(experts_per_gpu: Any, top_k: Any, tokens: Any, a: Any, b: Any) -> np.ndarray:
    """The physical ceiling of one MoE layer's straggler ``max_g max(a·u_g, b·n_g)``:
    no GPU touches more than its ``experts_per_gpu`` experts, and no GPU
    computes more than ``tokens·min(top_k, experts_per_gpu)`` assignments (a
    token picks distinct experts), so the straggler is at most
    ``max(a·E_g, b·B·min(k, E_g))``. The normal approximation of the closed
    form can exceed it (issue #14 item 5: Qwen3-235B at B = 64, 0.0809 ms per
    layer against the 0.0787 ms of reading every local expert), so the mean
    and the p99 are capped by it."""
    e = np.asarray(experts_per_gpu, dtype=np.float64)
    return np.maximum(np.asarray(a, dtype=np.float64) * e,
                      np.asarray(b, dtype=np.float64) * np.asarray(tokens, dtype=np.float64) * np.minimum(top_k, e))


def straggler_closed_form(experts: int, top_k: int, tokens: np.ndarray, gpus: np.ndarray, a: np.ndarray,
                          b: np.ndarray, pi: np.ndarray | None = None, redundant: np.ndarray | None = None
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of one MoE layer's straggler ``max_g max(a·u_g, b·n_g)``
    for many lanes at once (arrays over lanes; ``experts``/``top_k``/``pi``
    shared). ``pi`` = per-expert inclusion probabilities (None: uniform k/E).

    Uniform routing makes the G GPUs identical: each GPU's cost is normal
    N(μ, σ²) and the maximum has mean μ + σ·c_G and std σ·s_G
    (:func:`max_iid_normal`). With popularity the GPUs differ and the maximum
    is integrated numerically (:func:`_expected_max_normals`).

    ``redundant`` (per lane; None: 0): lanes with redundant expert slots take
    GPU g's slots from the EPLB placement (:func:`_slot_straggler`)."""
    B = np.ascontiguousarray(tokens, dtype=np.float64)
    G = np.asarray(gpus, dtype=np.int64)
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    n = B.shape[0]
    mean = np.zeros(n)
    sd = np.zeros(n)
    live = B > 0
    if pi is None:
        p1 = top_k / experts
        touched = -np.expm1(B * np.log1p(np.full(n, -min(p1, 1 - 1e-15))))
        per = (experts // G).astype(np.float64)
        mu_u = per * touched
        var_u = per * (touched * (1 - touched))
        mu_n = B * (per * p1)
        frac = per / experts
        var_tok = top_k * frac * (1 - frac) * (experts - top_k) / max(experts - 1, 1)
        var_n = B * var_tok
        use_u = a * mu_u >= b * mu_n
        mu = np.where(use_u, a * mu_u, b * mu_n)
        sig = np.where(use_u, a * np.sqrt(var_u), b * np.sqrt(var_n))
        cg = np.empty(n)
        sg = np.empty(n)
        for g in np.unique(G):
            c, s = max_iid_normal(int(g))
            cg[G == g] = c
            sg[G == g] = s
        mean = np.where(live, np.minimum(mu + sig * cg, np.maximum(straggler_ceiling(per, top_k, B, a, b), mu)), 0.0)
        sd = np.where(live, sig * sg, 0.0)
        if redundant is not None:
            _slot_straggler(experts, top_k, B, G, a, b, pi, redundant, live, mean, sd)
        return mean, sd
    pi = np.ascontiguousarray(pi, dtype=np.float64)
    lp = np.log1p(-np.minimum(pi, 1 - 1e-15))
    no_slots = live if redundant is None else live & (np.asarray(redundant) == 0)
    for g in np.unique(G):
        rows = np.flatnonzero((G == g) & no_slots)
        if rows.size == 0:
            continue
        g = int(g)
        per = experts // g
        Bs = B[rows]
        touched = -np.expm1(Bs[:, None] * lp[None, :])  # (rows, E)
        tg = touched.reshape(rows.size, g, per)
        mu_u = tg.sum(axis=2)
        var_u = (tg * (1 - tg)).sum(axis=2)
        pg = pi.reshape(g, per)
        mu_n = Bs[:, None] * pg.sum(axis=1)[None, :]
        var_n = Bs[:, None] * (pg * (1 - pg)).sum(axis=1)[None, :]
        ar, br = a[rows, None], b[rows, None]
        use_u = ar * mu_u >= br * mu_n
        mu = np.where(use_u, ar * mu_u, br * mu_n)
        sig = np.where(use_u, ar * np.sqrt(var_u), br * np.sqrt(var_n))
        m, s = _expected_max_normals(mu, sig)
        m = np.minimum(m, np.maximum(straggler_ceiling(per, top_k, Bs, a[rows], b[rows]), mu.max(axis=1)))
        mean[rows] = m
        sd[rows] = s
    if redundant is not None:
        _slot_straggler(experts, top_k, B, G, a, b, pi, redundant, live, mean, sd)
    return mean, sd


def _slot_straggler(experts: int, top_k: int, B: np.ndarray, G: np.ndarray, a: np.ndarray, b: np.ndarray,
                    pi: np.ndarray | None, redundant: np.ndarray, live: np.ndarray, mean: np.ndarray,
                    sd: np.ndarray) -> None:
    """The straggler of lanes with redundant expert slots (R > 0), written
    into ``mean``/``sd``: GPU g holds the slots the EPLB placement gives it
    (:func:`qsengine.decode.slots.slot_layout` from the loads π_e, uniform k/E
    when ``pi`` is None); a slot of expert e with c_e copies serves B/c_e of
    the B tokens (the engine's round-robin split), so it is touched with
    probability 1 − (1 − π_e)^(B/c_e) and takes (B/c_e)·π_e assignments
    (variance (B/c_e)·π_e·(1 − π_e)). GPUs whose slots carry the same loads
    form a class of n identical normals (maximum μ + σ·c_n, sd σ·s_n, as in
    the uniform case); the classes' maxima are combined by Clark's moment
    matching (:func:`_clark_max`)."""
    from qsengine.decode.slots import slot_layout

    R = np.asarray(redundant, dtype=np.int64)
    sel = live & (R > 0)
    if not sel.any():
        return
    load = np.full(experts, top_k / experts) if pi is None else np.asarray(pi, dtype=np.float64)
    lp = np.log1p(-np.minimum(load, 1 - 1e-15))
    from qsengine._groups import group, split

    idx = np.flatnonzero(sel)
    codes, _ = group(idx.size, G[idx], R[idx])
    for _, pos in split(codes):  # one (ep, redundant) pair at a time
        rows = idx[pos]
        lay = slot_layout(load, int(G[rows[0]]), int(R[rows[0]]))
        c, per = lay.class_expert.shape
        e = lay.class_expert.ravel()  # the slots of one GPU of each class
        Bs = B[rows][:, None] * lay.class_share.ravel()[None, :]  # tokens each slot serves
        touched = -np.expm1(Bs * lp[e][None, :])
        tg = touched.reshape(rows.size, c, per)
        mu_u = tg.sum(axis=2)
        var_u = (tg * (1 - tg)).sum(axis=2)
        ps = load[e][None, :]
        mu_n = (Bs * ps).reshape(rows.size, c, per).sum(axis=2)
        var_n = (Bs * ps * (1 - ps)).reshape(rows.size, c, per).sum(axis=2)
        ar, br = a[rows, None], b[rows, None]
        use_u = ar * mu_u >= br * mu_n
        mu = np.where(use_u, ar * mu_u, br * mu_n)
        sig = np.where(use_u, ar * np.sqrt(var_u), br * np.sqrt(var_n))
        cs = np.array([max_iid_normal(int(k)) for k in lay.class_count])  # (classes, 2)
        m, s = _clark_max(mu + sig * cs[None, :, 0], sig * cs[None, :, 1])
        mean[rows] = m
        sd[rows] = s


def _clark_max(mu: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sd of the maximum of independent normals N(μ_j, σ_j²) per row
    (shape (N, C) -> two (N,)), by Clark's moment matching (C. E. Clark, "The
    greatest of a finite set of random variables", Operations Research 9(2),
    1961, 145-162): max(X, Y) of two normals has exact mean
    μ1·Φ(α) + μ2·Φ(−α) + θ·φ(α) and second moment (μ1² + σ1²)·Φ(α) +
    (μ2² + σ2²)·Φ(−α) + (μ1 + μ2)·θ·φ(α), θ² = σ1² + σ2², α = (μ1 − μ2)/θ; the
    result is taken normal and folded with the next column, columns in
    descending order of mean. Exact for C = 1."""
    n, c = mu.shape
    order = np.argsort(-mu, axis=1, kind="stable")
    mu = np.take_along_axis(mu, order, axis=1)
    var = np.take_along_axis(sigma, order, axis=1) ** 2
    m, v = mu[:, 0].copy(), var[:, 0].copy()
    for j in range(1, c):
        m2, v2 = mu[:, j], var[:, j]
        theta = np.sqrt(v + v2)
        pos = theta > 0
        th = np.where(pos, theta, 1.0)
        al = (m - m2) / th
        cdf = 0.5 * (1.0 + _erf(al / math.sqrt(2.0)))
        pdf = np.exp(-0.5 * al * al) / math.sqrt(2.0 * math.pi)
        e1 = m * cdf + m2 * (1 - cdf) + th * pdf
        e2 = (m * m + v) * cdf + (m2 * m2 + v2) * (1 - cdf) + (m + m2) * th * pdf
        m_new = np.where(pos, e1, np.maximum(m, m2))
        v_new = np.where(pos, np.maximum(e2 - e1 * e1, 0.0), 0.0)
        m, v = m_new, v_new
    return m, np.sqrt(v)


def straggler_quantiles(p: StepParams, tokens: np.ndarray, pi: np.ndarray | None = None, uniform: bool = True
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, p50, p99) of the routed experts' straggler summed over each lane's
    decode MoE layers, by the closed form (:func:`straggler_closed_form`; ``pi``
    the routing law's inclusion probabilities, ``uniform`` when None), 0 on dense
    lanes and without the grouped GEMM's fixed term. The L layers are
    independent: mean L·m, sd √L·s; the p99 is mean + Z99·sd, capped like the
    mean at the physical ceiling (:func:`straggler_ceiling`: no GPU reads more
    than its (E + R)/ep expert slots). One routing law per call: MoE lanes must
    agree on experts and top-k (ValueError otherwise)."""
    n_lanes = tokens.shape[0]

    def lanes(v: np.ndarray) -> np.ndarray:  # one plan's one-element parameters, over the lanes
        return np.broadcast_to(v, (n_lanes,))

    n_moe = p.moe_layers
    is_moe = n_moe > 0
    rows = np.flatnonzero(lanes(is_moe))
    m = np.zeros(n_lanes)
    s = np.zeros(n_lanes)
    if rows.size:
        experts = int(lanes(p.experts)[rows[0]])
        top_k = int(lanes(p.top_k)[rows[0]])
        if np.any(lanes(p.experts)[rows] != experts) or np.any(lanes(p.top_k)[rows] != top_k):
            raise ValueError("step_time: MoE lanes disagree on experts/top_k; the closed-form straggler "
                             "takes one routing law per call (split the lanes)")
        red = lanes(p.redundant)[rows]
        m[rows], s[rows] = straggler_closed_form(experts, top_k, tokens[rows], lanes(p.ep)[rows],
                                                 lanes(p.moe_a)[rows], lanes(p.moe_b)[rows], None if uniform else pi,
                                                 red.astype(np.int64) if red.any() else None)
    mean = np.where(is_moe, n_moe * m, 0.0)
    sd = np.sqrt(n_moe) * s
    ceiling = n_moe * straggler_ceiling((p.experts + p.redundant) // np.maximum(p.ep, 1), p.top_k, tokens,
                                        p.moe_a, p.moe_b)
    p99 = np.where(is_moe, np.minimum(mean + Z99 * sd, np.maximum(ceiling, mean)), 0.0)
    return (np.ascontiguousarray(np.broadcast_to(mean, (n_lanes,))), np.ascontiguousarray(np.broadcast_to(mean, (n_lanes,))),
            np.ascontiguousarray(np.broadcast_to(p99, (n_lanes,))))
