"""The routed experts' straggler: the slowest GPU of one MoE layer.

How a layer's routed experts meet its tokens under a plan
(:func:`moe_layer_shape`) and their per-GPU cost (:func:`moe_cost_coefficients`;
the routing Monte Carlo takes the same cost), and the closed form of the
straggler ``max_g max(a·u_g, b·n_g)`` under independent routing over lanes
(:func:`straggler_closed_form`: uniform, with expert popularity, with
redundant EPLB slots), capped at its physical ceiling
(:func:`straggler_ceiling`) and summed over a lane's MoE layers
(:func:`straggler_quantiles`). The closed form's arithmetic lives in the C++
core (``cpp/core/straggler.cc``, bound as ``_core.straggler_*``); the
functions here are thin wrappers with numpy-array semantics (the numpy
implementation they replaced is the test oracle ``tests/reference_straggler.py``).
Formulas: ``docs/model.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from qsengine import _core
from qsengine.decode.params import StepOptions, StepParams, step_params
from qsengine.specs import Accelerator, Model, Plan, Precision

__all__ = [
    "MoeLayerShape",
    "moe_layer_shape",
    "moe_cost_coefficients",
    "moe_straggler_closed_form",
    "straggler_closed_form",
    "straggler_ceiling",
    "max_iid_normal",
    "straggler_quantiles",
    "Z99",
]

#: z of the normal 0.99 quantile (p99 = mean + Z99·sd of the summed straggler; the core's ``kZ99``).
Z99 = float(_core.STRAGGLER_Z99)


@dataclass(frozen=True)
class MoeLayerShape:
    """How one MoE layer's routed experts meet its tokens under a plan.

    ``tokens``: tokens one expert copy's EP group routes per step;
    ``gpus``: GPUs of the EP group (``ep``); ``experts_per_gpu``: expert
    slots per GPU, ``(E + redundant)/ep``;
    ``etp``: each expert split this many ways.
    """

    tokens: float
    gpus: int
    experts_per_gpu: int
    etp: int


def moe_layer_shape(model: Model, plan: Plan, batch: float) -> MoeLayerShape:
    """Tokens an EP group routes per step when each DP replica serves ``batch``.

    All ``dp·tp`` GPUs of a pipeline stage feed the stage's MoE layers, so the
    tokens of all ``dp`` replicas (``batch/pp`` each per microbatch) are spread
    over the ``expert_copies`` copies of every expert.
    """
    tokens = batch / plan.pp * plan.dp / plan.expert_copies
    return MoeLayerShape(tokens=tokens, gpus=plan.ep, experts_per_gpu=plan.slots_per_gpu(model.routed_experts),
                         etp=plan.expert_tp)


def moe_cost_coefficients(model: Model, precision: Precision, acc: Accelerator, plan: Plan,
                          options: StepOptions | None = None) -> tuple[float, float]:
    """(a, b): seconds per touched expert and per token-expert assignment on one GPU.

    GPU g's routed-expert time in a layer is ``fixed + max(a·u_g, b·n_g)``.
    Roofline kernels: ``a = P_e·b_e / (etp·BW·η_bw)``, ``b = 2·P_e / (etp·F·η_f)``,
    fixed = 0; calibrated kernels (the default): the grouped-GEMM fit mapped
    onto the same form (:func:`grouped_cost`; the fixed per-layer term is
    ``StepParams.moe_fix``). The routing Monte Carlo takes (a, b) as its
    ``LayerCost``, so it and the closed form share one cost.
    """
    p = step_params(model, precision, acc, plan, options)
    return float(p.moe_a[0]), float(p.moe_b[0])


def max_iid_normal(g: int) -> tuple[float, float]:
    """(c_G, s_G): mean and standard deviation of the maximum of G independent
    standard normals, by one numerical integral per G (the core's
    ``qs::straggler::max_iid_normal``, cached): c_G = ∫ x·G·φ(x)·Φ(x)^(G−1) dx
    on [−12, 12] (trapezoid, 24 001 points, |error| < 1e-10); c_1 = 0, s_1 = 1."""
    c, s = _core.max_iid_normal(int(g))
    return float(c), float(s)


def _inclusion_probabilities(weights: np.ndarray, k: int) -> np.ndarray:
    """Approximate per-token inclusion probability of each expert under
    Plackett-Luce selection of k of E: π_e = 1 − exp(−λ·w_e) with λ such that
    Σ π_e = k (exact for uniform weights in the mean; a documented
    approximation otherwise, checked against the Monte Carlo in the tests)."""
    w = np.asarray(weights, dtype=float)
    w = w / w.sum()
    E = w.size
    if k >= E:
        return np.ones(E)
    if np.allclose(w, w[0]):
        return np.full(E, k / E)
    lo, hi = 0.0, 1.0
    while np.sum(1 - np.exp(-hi * w)) < k:
        hi *= 2
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if np.sum(1 - np.exp(-mid * w)) < k:
            lo = mid
        else:
            hi = mid
    return 1 - np.exp(-0.5 * (lo + hi) * w)


def straggler_ceiling(experts_per_gpu: Any, top_k: Any, tokens: Any, a: Any, b: Any) -> np.ndarray:
    """The physical ceiling of one MoE layer's straggler ``max_g max(a·u_g, b·n_g)``:
    no GPU touches more than its ``experts_per_gpu`` experts, and no GPU
    computes more than ``tokens·min(top_k, experts_per_gpu)`` assignments (a
    token picks distinct experts), so the straggler is at most
    ``max(a·E_g, b·B·min(k, E_g))``. The normal approximation of the closed
    form can exceed it (issue #14 item 5: Qwen3-235B at B = 64, 0.0809 ms per
    layer against the 0.0787 ms of reading every local expert), so the mean
    and the p99 are capped by it. Arguments broadcast (numpy rules); computed
    by the core (``_core.straggler_ceiling``)."""
    args = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (experts_per_gpu, top_k, tokens, a, b)))
    shape = args[0].shape
    return _core.straggler_ceiling(*(np.ascontiguousarray(v).reshape(-1) for v in args)).reshape(shape)


def _slot_layouts(experts: int, top_k: int, pi: np.ndarray | None, gpus: np.ndarray, redundant: np.ndarray,
                  live: np.ndarray) -> list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]]:
    """The slot layouts the core needs: one ``(gpus, redundant, class_expert,
    class_share, class_count)`` per distinct (ep, R > 0) pair of the live lanes,
    placed by :func:`qsengine.decode.slots.slot_layout` from the loads π_e
    (uniform k/E when ``pi`` is None). One layout per distinct pair, not per lane."""
    # lanes with gpus < 1 or an absurd R get no layout: the core names their error
    sel = live & (redundant > 0) & (redundant < 2 ** 31) & (gpus >= 1) & (gpus < 2 ** 31)
    if not sel.any():
        return []
    from qsengine.decode.slots import slot_layout

    load = np.full(experts, top_k / experts) if pi is None else np.asarray(pi, dtype=np.float64)
    keys = np.unique((gpus[sel].astype(np.int64) << 32) | redundant[sel].astype(np.int64))  # one sort of int64 keys
    out = []
    for key in keys.tolist():
        g, r = key >> 32, key & 0xFFFFFFFF
        lay = slot_layout(load, int(g), int(r))
        out.append((int(g), int(r), lay.class_expert, lay.class_share, lay.class_count))
    return out


def straggler_closed_form(experts: int, top_k: int, tokens: np.ndarray, gpus: np.ndarray, a: np.ndarray,
                          b: np.ndarray, pi: np.ndarray | None = None, redundant: np.ndarray | None = None
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of one MoE layer's straggler ``max_g max(a·u_g, b·n_g)``
    for many lanes at once (arrays over lanes; ``experts``/``top_k``/``pi``
    shared; 0 where ``tokens`` <= 0). ``pi`` = per-expert inclusion
    probabilities (None: uniform k/E). Computed by the core
    (``_core.straggler_closed_form``, cpp/core/straggler.cc; docs/model.md).

    Uniform routing makes the G GPUs identical: each GPU's cost is normal
    N(μ, σ²) and the maximum has mean μ + σ·c_G and std σ·s_G
    (:func:`max_iid_normal`). With popularity the GPUs differ and the maximum
    is integrated numerically (2049 points over [min(μ−8σ), max(μ+8σ)]). Both
    are capped at :func:`straggler_ceiling` (not below the largest μ).

    ``redundant`` (per lane; None: 0): lanes with redundant expert slots take
    GPU g's slots from the EPLB placement (:func:`qsengine.decode.slots.slot_layout`
    from the loads π_e): a slot of expert e with c_e copies serves B/c_e of the
    B tokens, GPUs whose slots carry the same loads form a class of identical
    normals (μ + σ·c_n, σ·s_n), and the classes' maxima are combined by Clark's
    moment matching (C. E. Clark, Operations Research 9(2), 1961, 145-162).

    ValueError naming the argument on bad input (``gpus`` < 1, non-finite
    ``tokens``, negative or non-finite ``a``/``b``, ``pi`` outside [0, 1] or not
    one per expert, ``gpus`` not dividing ``experts`` under popularity)."""
    B = np.atleast_1d(np.ascontiguousarray(tokens, dtype=np.float64))
    G = np.atleast_1d(np.asarray(gpus, dtype=np.int64))
    R = None if redundant is None else np.atleast_1d(np.asarray(redundant, dtype=np.int64))
    pi = None if pi is None else np.ascontiguousarray(pi, dtype=np.float64)
    layouts = [] if R is None else _slot_layouts(experts, top_k, pi, np.broadcast_to(G, B.shape),
                                                 np.broadcast_to(R, B.shape), B > 0)
    mean, sd = _core.straggler_closed_form(int(experts), int(top_k), B, G, np.atleast_1d(np.asarray(a, np.float64)),
                                           np.atleast_1d(np.asarray(b, np.float64)), pi, R, layouts)
    return mean, sd


def straggler_quantiles(p: StepParams, tokens: np.ndarray, pi: np.ndarray | None = None, uniform: bool = True
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, p50, p99) of the routed experts' straggler summed over each lane's
    decode MoE layers, by the closed form (:func:`straggler_closed_form`; ``pi``
    the routing law's inclusion probabilities, ``uniform`` when None), 0 on dense
    lanes and without the grouped GEMM's fixed term. The L layers are
    independent: mean L·m, sd √L·s; the p99 is mean + Z99·sd, capped like the
    mean at the physical ceiling (:func:`straggler_ceiling`: no GPU reads more
    than its (E + R)/ep expert slots). One routing law per call: MoE lanes must
    agree on experts and top-k (ValueError otherwise). Computed by the core
    (``_core.straggler_quantiles``)."""
    tokens = np.ascontiguousarray(tokens, dtype=np.float64)
    n_lanes = tokens.shape[0]
    fields = {k: np.asarray(getattr(p, k), dtype=np.float64).reshape(-1) for k in _QUANTILE_FIELDS}
    is_moe = np.broadcast_to(fields["moe_layers"], (n_lanes,)) > 0
    rows = np.flatnonzero(is_moe)
    experts = top_k = 0
    pi = None if (uniform or rows.size == 0) else pi  # no MoE lane: no routing law to check π against
    layouts: list = []
    if rows.size:
        experts = int(np.broadcast_to(fields["experts"], (n_lanes,))[rows[0]])
        top_k = int(np.broadcast_to(fields["top_k"], (n_lanes,))[rows[0]])
        red = np.broadcast_to(fields["redundant"], (n_lanes,))[rows].astype(np.int64)
        if red.any():
            ep = np.broadcast_to(fields["ep"], (n_lanes,))[rows].astype(np.int64)
            layouts = _slot_layouts(experts, top_k, pi, ep, red, tokens[rows] > 0)
    return _core.straggler_quantiles(experts, top_k, tokens, fields,
                                     None if pi is None else np.ascontiguousarray(pi, dtype=np.float64), layouts)


#: The step fields the core's straggler_quantiles reads.
_QUANTILE_FIELDS = ("moe_layers", "experts", "top_k", "ep", "redundant", "moe_a", "moe_b")


def moe_straggler_closed_form(
    experts: int,
    top_k: int,
    tokens: float,
    gpus: int,
    a: float,
    b: float,
    popularity: np.ndarray | None = None,
    redundant: int = 0,
) -> tuple[float, float]:
    """Mean and std of the straggler time ``max_g max(a·u_g, b·n_g)`` of one
    MoE layer under independent routing (one lane of
    :func:`straggler_closed_form`; ``popularity`` = expert weights, None =
    uniform; ``redundant`` slots per EP group, EPLB-placed)."""
    pi = None if popularity is None else _inclusion_probabilities(popularity, top_k)
    m, s = straggler_closed_form(experts, top_k, np.array([float(tokens)]), np.array([int(gpus)]),
                                 np.array([float(a)]), np.array([float(b)]), pi,
                                 None if redundant == 0 else np.array([float(redundant)]))
    return float(m[0]), float(s[0])
