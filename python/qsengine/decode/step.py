"""The decode step model: roofline time of one decode step, piece by piece.

One decode step generates one token for each of the ``batch`` sequences that a
data-parallel replica serves. Every formula is written out in ``docs/model.md``;
the code follows it piece by piece:

* **attention** per layer and GPU: its weight shard, the KV cache of the
  sequences it serves (B·T entries, split over tensor-parallel KV heads for
  MHA/GQA, not split for MLA's latent), projection and score FLOPs;
* **dense FFN** per dense layer: its weight shard read once per step;
* **MoE** per MoE layer: the router and shared experts (like a dense FFN), and
  the routed experts, where GPU g reads the u_g experts its tokens touched and
  computes 2·n_g·P_expert FLOPs; the layer waits for the slowest GPU (the
  straggler), whose time comes from the routing Monte Carlo or from the
  closed form in :func:`moe_straggler_closed_form`;
* **LM head**: its weight shard and 2·B·V·d FLOPs;
* **communication**: tensor-parallel all-reduce (2 per layer), expert-parallel
  all-to-all (dispatch + combine per MoE layer), expert-TP all-reduce, pipeline
  sends, each over NVLink-class scale-up links when the group fits in one
  scale-up domain and over the inter-node network otherwise.

Each compute piece is a roofline ``max(bytes / (BW·η_bw), flops / (F·η_f))``
and records which side bound it. Pieces run one after another (no overlap of
communication and compute: a conservative, documented choice).

Pipeline parallelism: with ``pp`` stages, the replica's ``B`` sequences flow
as ``pp`` microbatches of ``B/pp``; each token of a sequence takes one pass
through all layers at microbatch ``B/pp``, so the per-token latency (TPOT) is
the full-depth time at batch ``B/pp`` and throughput is ``B / TPOT``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from qsengine.specs import Accelerator, Model, Plan, Precision

Bound = Literal["bandwidth", "compute", "link", "-"]

__all__ = [
    "StepOptions",
    "Piece",
    "StepBreakdown",
    "MoeLayerShape",
    "moe_layer_shape",
    "moe_cost_coefficients",
    "moe_straggler_closed_form",
    "straggler_closed_form",
    "max_iid_normal",
    "StepParams",
    "step_params",
    "step_time",
    "StepTimes",
    "PieceArrays",
    "decode_step",
]


@dataclass(frozen=True)
class StepOptions:
    """Inputs of the step model that are not part of the hardware or model.

    Attributes:
        collective_latency: fixed latency of one collective call (all-reduce,
            all-to-all, pipeline send), seconds.
        overlap_comm: if True, communication is assumed hidden behind compute
            (time = max instead of sum); default False (conservative).
    """

    collective_latency: float = 10e-6
    overlap_comm: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.collective_latency) and self.collective_latency >= 0):
            raise ValueError(f"StepOptions.collective_latency={self.collective_latency!r}: must be finite and >= 0")


@dataclass(frozen=True)
class Piece:
    """One term of the step time, summed over the layers it appears in.

    ``bytes`` and ``flops`` are per GPU (the busiest one for the MoE piece);
    ``time`` in seconds; ``bound`` says what limited it.
    """

    name: str
    time: float
    bytes: float = 0.0
    flops: float = 0.0
    bound: Bound = "-"
    count: int = 1


@dataclass(frozen=True)
class StepBreakdown:
    """Step time of one replica at one batch, piece by piece.

    ``time`` is the mean per-token latency (TPOT); ``time_p50``/``time_p99``
    come from the routed-expert straggler distribution (deterministic pieces
    add a constant).
    """

    batch: int
    context: float
    pieces: tuple[Piece, ...]
    time: float
    time_p50: float
    time_p99: float
    moe_tokens: float = 0.0
    notes: tuple[str, ...] = field(default=())

    @property
    def tokens_per_second(self) -> float:
        """Decode tokens per second of the replica: B / TPOT."""
        return self.batch / self.time if self.time > 0 else 0.0

    def piece(self, name: str) -> Piece:
        for p in self.pieces:
            if p.name == name:
                return p
        raise KeyError(f"no step piece named {name!r}; have {[p.name for p in self.pieces]}")

    def as_rows(self) -> list[dict[str, object]]:
        return [
            {"piece": p.name, "time_s": p.time, "share": p.time / self.time if self.time else 0.0,
             "bytes_per_gpu": p.bytes, "flops_per_gpu": p.flops, "bound": p.bound, "layers": p.count}
            for p in self.pieces
        ]


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


def moe_cost_coefficients(model: Model, precision: Precision, acc: Accelerator, plan: Plan) -> tuple[float, float]:
    """(a, b): seconds per touched expert and per token-expert assignment on one GPU.

    GPU g's routed-expert time in a layer is ``max(a·u_g, b·n_g)``:
    ``a = P_e·b_e / (etp·BW·η_bw)`` and ``b = 2·P_e / (etp·F·η_f)``.
    """
    etp = plan.expert_tp
    a = model.expert_params * precision.expert_bytes / etp / (acc.hbm_bandwidth * acc.bandwidth_efficiency)
    b = 2.0 * model.expert_params / etp / (acc.peak_flops(precision.compute) * acc.flops_efficiency)
    return a, b


# ---------------------------------------------------------------------------
# The vectorised core. Every step time, scalar or swept, is computed here:
# :func:`decode_step` calls it with one-element arrays, the closed-form fast
# pipeline (qsengine.decode.pipeline) with arrays over points x plans x batches.
# ---------------------------------------------------------------------------

#: z of the normal 0.99 quantile (p99 = mean + Z99·sd of the summed straggler).
Z99 = 2.3263478740408408

#: The numeric fields of :class:`StepParams` (each a float64 array over lanes).
STEP_FIELDS = (
    # precision
    "d", "wb", "eb", "kvb", "ab",
    # accelerator (bandwidths already times their efficiency; link_eff applies to links)
    "bw", "flops", "scaleup", "internode", "link_eff", "domain",
    # plan
    "tp", "pp", "dp", "ep", "etp", "attn_dp", "copies",
    # model
    "layers", "local", "window", "attn_params", "attn_proj_flops", "attn_ctx_flops", "kv_layer", "kv_split",
    "dense_layers", "ffn_params", "moe_layers", "router_params", "shared_params", "expert_params", "experts",
    "top_k", "vd",
    # options
    "latency", "overlap",
    # plan: redundant expert slots per EP group (EPLB; decode/slots.py)
    "redundant",
)


@dataclass(frozen=True)
class StepParams:
    """Everything the step model needs from model × precision × accelerator ×
    plan × options, flattened to numbers: one float64 array per field, all of
    the same length (one entry per *lane*). Build one lane with
    :func:`step_params`; the fast path stacks many (:meth:`stack`, :meth:`take`).
    """

    d: np.ndarray
    wb: np.ndarray
    eb: np.ndarray
    kvb: np.ndarray
    ab: np.ndarray
    bw: np.ndarray
    flops: np.ndarray
    scaleup: np.ndarray
    internode: np.ndarray
    link_eff: np.ndarray
    domain: np.ndarray
    tp: np.ndarray
    pp: np.ndarray
    dp: np.ndarray
    ep: np.ndarray
    etp: np.ndarray
    attn_dp: np.ndarray
    copies: np.ndarray
    layers: np.ndarray
    local: np.ndarray
    window: np.ndarray
    attn_params: np.ndarray
    attn_proj_flops: np.ndarray
    attn_ctx_flops: np.ndarray
    kv_layer: np.ndarray
    kv_split: np.ndarray
    dense_layers: np.ndarray
    ffn_params: np.ndarray
    moe_layers: np.ndarray
    router_params: np.ndarray
    shared_params: np.ndarray
    expert_params: np.ndarray
    experts: np.ndarray
    top_k: np.ndarray
    vd: np.ndarray
    latency: np.ndarray
    overlap: np.ndarray
    redundant: np.ndarray
    #: the fields as rows of one (fields, lanes) array, when they are views of it
    matrix: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.d.shape[0])

    @staticmethod
    def from_matrix(m: np.ndarray) -> "StepParams":
        """Fields as the rows of ``m`` (shape (len(STEP_FIELDS), lanes)), viewed, not copied."""
        return StepParams(*m, matrix=m)  # type: ignore[arg-type]

    def _matrix(self) -> np.ndarray:
        return self.matrix if self.matrix is not None else np.stack([getattr(self, f) for f in STEP_FIELDS])

    def take(self, idx: np.ndarray) -> "StepParams":
        """The lanes ``idx`` (one fancy-indexing of the field matrix)."""
        return StepParams.from_matrix(np.take(self._matrix(), idx, axis=1))  # C order: each field contiguous

    def replace(self, **fields: np.ndarray) -> "StepParams":
        return dataclasses.replace(self, matrix=None,
                                   **{k: np.ascontiguousarray(v, dtype=np.float64) for k, v in fields.items()})

    @staticmethod
    def stack(parts: "list[StepParams]") -> "StepParams":
        return StepParams.from_matrix(np.concatenate([p._matrix() for p in parts], axis=1))


def step_params(model: Model, precision: Precision, acc: Accelerator, plan: Plan,
                options: StepOptions | None = None) -> StepParams:
    """One lane of :class:`StepParams` for a model, precision, accelerator and plan."""
    opt = options or StepOptions()
    att = model.attention
    moe = model.is_moe
    n_moe = model.decode_moe_layers if moe else 0
    n_dense = model.decode_dense_layers
    if att.kind == "mla":
        ctx_flops = 2.0 * att.num_heads * (2 * att.kv_lora_rank + att.qk_rope_head_dim)
    else:
        ctx_flops = 2.0 * att.num_heads * (att.head_dim + att.value_dim)
    kv_split = 1 if (plan.attn_dp or att.kind == "mla") else min(plan.tp, att.num_kv_heads)
    vals = dict(
        d=model.hidden_size, wb=precision.weight_bytes, eb=precision.expert_bytes, kvb=precision.kv_bytes,
        ab=precision.activation_bytes,
        bw=acc.hbm_bandwidth * acc.bandwidth_efficiency,
        flops=acc.peak_flops(precision.compute) * acc.flops_efficiency,
        scaleup=acc.scaleup_bandwidth, internode=acc.internode_bandwidth, link_eff=acc.link_efficiency,
        domain=acc.scaleup_domain,
        tp=plan.tp, pp=plan.pp, dp=plan.dp, ep=plan.ep, etp=plan.expert_tp, attn_dp=bool(plan.attn_dp),
        copies=plan.expert_copies if moe else 1,
        layers=model.decode_layers, local=att.local_layers, window=(att.local_window or 0) if att.local_layers else 0,
        attn_params=model.attention_params, attn_proj_flops=2.0 * att.params(model.hidden_size),
        attn_ctx_flops=ctx_flops, kv_layer=model.kv_bytes_per_token_per_layer(precision.kv_bytes),
        kv_split=kv_split,
        dense_layers=n_dense, ffn_params=model.dense_ffn_params if (n_dense > 0) else 0,
        moe_layers=n_moe, router_params=model.router_params if moe else 0,
        shared_params=model.shared_experts * model.shared_expert_params if moe else 0,
        expert_params=model.expert_params if moe else 0, experts=model.routed_experts if moe else 1,
        top_k=model.top_k if moe else 1, vd=model.vocab_size * model.hidden_size,
        latency=opt.collective_latency, overlap=bool(opt.overlap_comm),
        redundant=plan.redundant if moe else 0,
    )
    return StepParams(**{k: np.array([float(v)], dtype=np.float64) for k, v in vals.items()})


def _roof(nbytes: np.ndarray, flops: np.ndarray, p: StepParams) -> tuple[np.ndarray, np.ndarray]:
    """Roofline time and whether bandwidth bound it (t_bw >= t_flops)."""
    t_bw = nbytes / p.bw
    t_f = flops / p.flops
    bw_bound = t_bw >= t_f
    return np.where(bw_bound, t_bw, t_f), bw_bound


def _link_bw(p: StepParams, group: np.ndarray) -> np.ndarray:
    """Per-GPU bandwidth (bytes/s) of a collective over ``group`` GPUs."""
    return np.where(group <= p.domain, p.scaleup, p.internode) * p.link_eff


def _allreduce(nbytes: np.ndarray, group: np.ndarray, p: StepParams) -> np.ndarray:
    """Ring all-reduce of ``nbytes`` per GPU over ``group`` GPUs (0 for one GPU)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = p.latency + 2.0 * (group - 1) / group * nbytes / _link_bw(p, group)
    return np.where(group > 1, t, 0.0)


# --------------------------------------------------------------- straggler
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
        mean = np.where(live, mu + sig * cg, 0.0)
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


def moe_straggler_closed_form(
    experts: int,
    top_k: int,
    tokens: float,
    gpus: int,
    a: float,
    b: float,
    popularity: np.ndarray | None = None,
) -> tuple[float, float]:
    """Mean and std of the straggler time ``max_g max(a·u_g, b·n_g)`` of one
    MoE layer under independent routing (one lane of
    :func:`straggler_closed_form`; ``popularity`` = expert weights, None =
    uniform)."""
    pi = None if popularity is None else _inclusion_probabilities(popularity, top_k)
    m, s = straggler_closed_form(experts, top_k, np.array([float(tokens)]), np.array([int(gpus)]),
                                 np.array([float(a)]), np.array([float(b)]), pi)
    return float(m[0]), float(s[0])


# ---------------------------------------------------------------- the step
@dataclass(frozen=True)
class PieceArrays:
    """One term of the step time over lanes (arrays of the lanes' length).

    ``time`` (s), ``bytes`` and ``flops`` per GPU summed over the ``count``
    layers it appears in (the busiest GPU for the routed experts);
    ``bandwidth``: whether bandwidth (not compute) bound it, for compute
    pieces; ``link``: a communication piece; ``present``: the piece exists
    for the lane (e.g. no TP all-reduce at tp = 1)."""

    name: str
    time: np.ndarray
    bytes: np.ndarray
    flops: np.ndarray
    count: np.ndarray
    present: np.ndarray
    bandwidth: np.ndarray | None = None
    link: bool = False

    def bound(self, i: int) -> Bound:
        if self.link:
            return "link"
        assert self.bandwidth is not None
        return "bandwidth" if bool(self.bandwidth[i]) else "compute"


@dataclass(frozen=True)
class StepTimes:
    """:func:`step_time`'s result over lanes: mean (``time``), p50 and p99
    TPOT in seconds, tokens routed per EP group and step (``tokens``), and
    with ``detail=True`` every piece (:class:`PieceArrays`, in step order)."""

    time: np.ndarray
    p50: np.ndarray
    p99: np.ndarray
    tokens: np.ndarray
    pieces: tuple[PieceArrays, ...] = ()


def step_time(p: StepParams, batch: np.ndarray, context: np.ndarray, *, pi: np.ndarray | None = None,
              uniform: bool = True, moe_step_time: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
              detail: bool = False) -> StepTimes:
    """Step time of one replica for every lane of ``p`` (see docs/model.md).

    ``batch`` and ``context`` are arrays over the lanes. The routed-expert
    straggler comes from ``moe_step_time`` (mean, p50, p99 arrays from the
    Monte Carlo) or, if None, from the closed form (``pi`` = inclusion
    probabilities, ``uniform`` when None), which takes one routing law per
    call: MoE lanes must agree on experts and top-k (ValueError otherwise).
    """
    batch = np.asarray(batch, dtype=np.float64)
    ctx = np.asarray(context, dtype=np.float64)
    n_lanes = batch.shape[0]
    detailed: list[PieceArrays] = []
    no = np.zeros(n_lanes, dtype=bool)

    def keep(name: str, time: np.ndarray, nbytes: Any, flops: Any, count: Any, present: Any,
             bandwidth: np.ndarray | None = None, link: bool = False) -> None:
        """Record a piece (callers only call it with ``detail``: its arguments cost)."""
        def arr(x: Any) -> np.ndarray:
            return np.broadcast_to(np.asarray(x, dtype=np.float64), (n_lanes,))
        detailed.append(PieceArrays(name, arr(time), arr(nbytes), arr(flops), arr(count),
                                    np.broadcast_to(np.asarray(present, dtype=bool), (n_lanes,)),
                                    None if bandwidth is None else np.broadcast_to(bandwidth, (n_lanes,)), link))

    micro = batch / p.pp
    adp = p.attn_dp > 0
    shard = np.where(adp, 1.0, p.tp)
    seqs = np.where(adp, micro / p.tp, micro)
    ctx_local = np.where(p.window > 0, np.minimum(ctx, p.window), ctx)

    # attention: full-context layers, then local-window layers
    norm_bytes = 2 * p.d * p.wb
    pieces = []
    for name, nl, c in (("attention", p.layers - p.local, ctx), ("attention (local)", p.local, ctx_local)):
        w = p.attn_params * p.wb / shard + norm_bytes
        kv = seqs * c * p.kv_layer / p.kv_split
        fl = seqs * (p.attn_proj_flops + p.attn_ctx_flops * c) / shard
        t, bwb = _roof(w + kv, fl, p)
        pieces.append(np.where(nl > 0, t * nl, 0.0))
        if detail:
            keep(name, pieces[-1], (w + kv) * nl, fl * nl, nl, nl > 0, bwb)
    # dense FFN
    has = (p.dense_layers > 0) & (p.ffn_params > 0)
    w = p.ffn_params * p.wb / shard
    fl = 2.0 * seqs * p.ffn_params / shard
    t, bwb = _roof(w, fl, p)
    pieces.append(np.where(has, t * p.dense_layers, 0.0))
    if detail:
        keep("dense ffn", pieces[-1], w * p.dense_layers, fl * p.dense_layers, p.dense_layers, has, bwb)
    # MoE: router + shared experts, routed experts (straggler). Dense-only lanes
    # skip it: its pieces would be exact zeros, and x + 0.0 == x for the
    # non-negative times summed below, so the results are bit-identical.
    n_moe = p.moe_layers
    is_moe = n_moe > 0
    any_moe = detail or bool(is_moe.any())
    tokens = batch / p.pp * p.dp / p.copies
    moe_mean = moe_p50 = moe_p99 = None
    if any_moe:
        per_layer = p.router_params * p.wb / shard + p.shared_params * p.eb / shard
        fl = 2.0 * seqs * (p.router_params + p.shared_params) / shard
        t, bwb = _roof(per_layer, fl, p)
        pieces.append(np.where(is_moe, t * n_moe, 0.0))
        if detail:
            keep("router + shared experts", pieces[-1], per_layer * n_moe, fl * n_moe, n_moe, is_moe, bwb)
        a = p.expert_params * p.eb / p.etp / p.bw
        bcoef = 2.0 * p.expert_params / p.etp / p.flops
        if moe_step_time is None:
            rows = np.flatnonzero(is_moe)
            m = np.zeros(n_lanes)
            s = np.zeros(n_lanes)
            if rows.size:
                experts = int(p.experts[rows[0]])
                top_k = int(p.top_k[rows[0]])
                if np.any(p.experts[rows] != experts) or np.any(p.top_k[rows] != top_k):
                    raise ValueError("step_time: MoE lanes disagree on experts/top_k; the closed-form straggler "
                                     "takes one routing law per call (split the lanes)")
                red = p.redundant[rows]
                m[rows], s[rows] = straggler_closed_form(experts, top_k, tokens[rows], p.ep[rows], a[rows],
                                                         bcoef[rows], None if uniform else pi,
                                                         red.astype(np.int64) if red.any() else None)
            moe_mean = np.where(is_moe, n_moe * m, 0.0)
            sd = np.sqrt(n_moe) * s
            moe_p50 = moe_mean
            moe_p99 = np.where(is_moe, moe_mean + Z99 * sd, 0.0)
        else:
            moe_mean, moe_p50, moe_p99 = (np.where(is_moe, np.asarray(v, dtype=np.float64), 0.0) for v in moe_step_time)
        pieces.append(moe_mean)
        if detail:
            p1 = p.top_k / p.experts
            with np.errstate(divide="ignore", invalid="ignore"):
                # slots per GPU, (E + redundant)/ep; a slot's touch probability taken as uniform routing's
                mean_u = ((p.experts + p.redundant) // p.ep) * -np.expm1(tokens * np.log1p(-np.minimum(p1, 1 - 1e-15)))
                mean_n = tokens * p.top_k / p.ep
            eb_layer = mean_u * p.expert_params * p.eb / p.etp
            fl_layer = 2.0 * mean_n * p.expert_params / p.etp
            _, bwb = _roof(eb_layer, fl_layer, p)
            keep("routed experts (straggler)", moe_mean, eb_layer * n_moe, fl_layer * n_moe, n_moe, is_moe, bwb)
    # LM head
    w = p.vd * p.wb / shard
    fl = 2.0 * seqs * p.vd / shard
    t, bwb = _roof(w, fl, p)
    pieces.append(t)
    if detail:
        keep("lm head", t, w, fl, 1.0, ~no, bwb)

    # communication
    comm = []
    act = seqs * p.d * p.ab
    n = 2 * p.layers
    comm.append(np.where(shard > 1, _allreduce(act, p.tp, p) * n, 0.0))
    if detail:
        keep("tp all-reduce", comm[-1], act * n, 0.0, n, shard > 1, link=True)
    if any_moe:
        has_ep = is_moe & (p.ep > 1)
        stage_gpus = p.dp * p.tp
        tokens_src = micro * p.dp / stage_gpus
        group = p.ep * p.etp
        remote = (p.ep - 1) / p.ep
        nbytes = tokens_src * p.top_k * p.d * p.ab * remote
        inter_frac = np.where(group <= p.domain, 0.0, 1.0 - p.domain / group)
        t_one = np.maximum(nbytes * (1 - inter_frac) / (p.scaleup * p.link_eff),
                           nbytes * inter_frac / (p.internode * p.link_eff))
        t = 2 * (p.latency + t_one)
        comm.append(np.where(has_ep, t * n_moe, 0.0))
        if detail:
            keep("ep all-to-all", comm[-1], 2 * nbytes * n_moe, 0.0, n_moe, has_ep, link=True)
        has_etp = is_moe & (p.etp > 1) & ~((shard > 1) & (p.etp == p.tp) & (p.ep == 1))
        nbytes = tokens / np.maximum(p.ep, 1) * p.top_k * p.d * p.ab
        comm.append(np.where(has_etp, _allreduce(nbytes, p.etp, p) * n_moe, 0.0))
        if detail:
            keep("expert-tp all-reduce", comm[-1], nbytes * n_moe, 0.0, n_moe, has_etp, link=True)
    nbytes = micro * p.d * p.ab
    t = (p.pp - 1) * (p.latency + nbytes / _link_bw(p, p.tp * p.pp))
    comm.append(np.where(p.pp > 1, t, 0.0))
    if detail:
        keep("pp send", comm[-1], nbytes * (p.pp - 1), 0.0, p.pp - 1, p.pp > 1, link=True)

    compute_time = pieces[0]
    for x in pieces[1:]:
        compute_time = compute_time + x
    comm_time = comm[0]
    for x in comm[1:]:
        comm_time = comm_time + x
    ov = p.overlap > 0
    time = np.where(ov, np.maximum(compute_time, comm_time), compute_time + comm_time)
    if moe_mean is None:  # dense only: no straggler, every quantile is the time
        p50, p99 = time.copy(), time.copy()
    else:
        det = compute_time - moe_mean
        p50 = np.where(ov, np.maximum(det + moe_p50, comm_time), det + moe_p50 + comm_time)
        p99 = np.where(ov, np.maximum(det + moe_p99, comm_time), det + moe_p99 + comm_time)
    return StepTimes(time=time, p50=p50, p99=p99, tokens=np.where(is_moe, tokens, 0.0), pieces=tuple(detailed))


def decode_step(
    model: Model,
    precision: Precision,
    acc: Accelerator,
    plan: Plan,
    batch: int,
    context: float,
    *,
    moe_step_time: tuple[float, float, float] | None = None,
    popularity: np.ndarray | None = None,
    options: StepOptions | None = None,
) -> StepBreakdown:
    """Time of one decode step of one data-parallel replica serving ``batch``
    sequences at ``context`` cached tokens each: one lane of :func:`step_time`.

    Args:
        moe_step_time: (mean, p50, p99) of the routed-expert straggler time
            summed over all decode MoE layers, from the routing Monte Carlo at
            this batch (see :func:`moe_layer_shape` and
            :func:`moe_cost_coefficients` for its inputs). If None, the closed
            form for independent routing with ``popularity`` (uniform if None)
            is used.
    """
    if batch < 1:
        raise ValueError(f"batch={batch!r}: must be >= 1")
    if not (context > 0 and math.isfinite(context)):
        raise ValueError(f"context={context!r}: must be a positive finite number of tokens")
    p = step_params(model, precision, acc, plan, options)
    pi = None
    if popularity is not None and model.is_moe:
        pi = _inclusion_probabilities(popularity, model.top_k)
    mst = None if moe_step_time is None else tuple(np.array([float(v)]) for v in moe_step_time)
    r = step_time(p, np.array([float(batch)]), np.array([float(context)]), pi=pi, uniform=pi is None,
                  moe_step_time=mst, detail=True)  # type: ignore[arg-type]
    return breakdown(r, 0, int(batch), float(context))


def breakdown(r: StepTimes, i: int, batch: int, context: float) -> StepBreakdown:
    """Lane ``i`` of a detailed :func:`step_time` result as a StepBreakdown
    (the pieces present for that lane, in step order)."""
    pieces = tuple(Piece(pa.name, float(pa.time[i]), float(pa.bytes[i]), float(pa.flops[i]), pa.bound(i),
                         int(pa.count[i])) for pa in r.pieces if bool(pa.present[i]))
    return StepBreakdown(batch=int(batch), context=float(context), pieces=pieces, time=float(r.time[i]),
                         time_p50=float(r.p50[i]), time_p99=float(r.p99[i]), moe_tokens=float(r.tokens[i]))
