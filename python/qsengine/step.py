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

import math
from dataclasses import dataclass, field
from typing import Literal

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


def _roofline(nbytes: float, flops: float, acc: Accelerator, dtype: str) -> tuple[float, Bound]:
    t_bw = nbytes / (acc.hbm_bandwidth * acc.bandwidth_efficiency)
    t_f = flops / (acc.peak_flops(dtype) * acc.flops_efficiency)
    return (t_bw, "bandwidth") if t_bw >= t_f else (t_f, "compute")


def _link(acc: Accelerator, group: int) -> float:
    """Per-GPU bandwidth (bytes/s) for a collective over ``group`` GPUs."""
    bw = acc.scaleup_bandwidth if group <= acc.scaleup_domain else acc.internode_bandwidth
    return bw * acc.link_efficiency


def _allreduce_time(nbytes: float, group: int, acc: Accelerator, opt: StepOptions) -> float:
    """Ring all-reduce of ``nbytes`` per GPU over ``group`` GPUs."""
    if group <= 1:
        return 0.0
    return opt.collective_latency + 2.0 * (group - 1) / group * nbytes / _link(acc, group)


@dataclass(frozen=True)
class MoeLayerShape:
    """How one MoE layer's routed experts meet its tokens under a plan.

    ``tokens``: tokens one expert copy's EP group routes per step;
    ``gpus``: GPUs of the EP group (``ep``); ``experts_per_gpu``;
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
    return MoeLayerShape(tokens=tokens, gpus=plan.ep, experts_per_gpu=model.routed_experts // plan.ep,
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


def _erf(z: np.ndarray) -> np.ndarray:
    """Vectorised erf (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7)."""
    sign = np.sign(z)
    x = np.abs(z)
    t = 1.0 / (1.0 + 0.3275911 * x)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-x * x))


def _expected_max_normals(mu: np.ndarray, sigma: np.ndarray) -> tuple[float, float]:
    """Mean and std of the maximum of independent normals N(mu_i, sigma_i²).

    Numerical integration of the CDF of the maximum, F(x) = Π Φ((x-μ_i)/σ_i).
    """
    mu = np.asarray(mu, dtype=float)
    sigma = np.maximum(np.asarray(sigma, dtype=float), 1e-300)
    if mu.size == 1:
        return float(mu[0]), float(sigma[0])
    lo = float(np.min(mu - 8 * sigma))
    hi = float(np.max(mu + 8 * sigma))
    if hi <= lo:
        return float(np.max(mu)), 0.0
    x = np.linspace(lo, hi, 2049)
    z = (x[:, None] - mu[None, :]) / (sigma[None, :] * math.sqrt(2.0))
    cdf = np.prod(0.5 * (1.0 + _erf(z)), axis=1)
    pdf = np.gradient(cdf, x)
    m1 = float(np.trapezoid(x * pdf, x))
    m2 = float(np.trapezoid(x * x * pdf, x))
    return m1, math.sqrt(max(m2 - m1 * m1, 0.0))


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
    MoE layer under independent routing (tokens route independently).

    Per GPU (contiguous placement), u_g is a sum of per-expert "touched"
    indicators with P = 1 − (1 − π_e)^B and n_g a sum of per-token counts with
    mean B·Σπ_e; both are taken as normal, and the expected maximum over GPUs
    is integrated numerically. For uniform routing the means are exact:
    E[u_g] = (E/G)·(1 − (1 − k/E)^B), E[n_g] = B·k/G.
    """
    B = float(tokens)
    if B <= 0:
        return 0.0, 0.0
    pi = np.full(experts, top_k / experts) if popularity is None else _inclusion_probabilities(popularity, top_k)
    touched = -np.expm1(B * np.log1p(-np.minimum(pi, 1 - 1e-15)))
    per = experts // gpus
    tg = touched.reshape(gpus, per)
    pg = pi.reshape(gpus, per)
    mu_u = tg.sum(axis=1)
    var_u = (tg * (1 - tg)).sum(axis=1)
    # n_g: per token, the number of its k experts on GPU g (hypergeometric for uniform).
    mu_n = B * pg.sum(axis=1)
    if popularity is None:
        frac = per / experts
        var_tok = top_k * frac * (1 - frac) * (experts - top_k) / max(experts - 1, 1)
        var_n = np.full(gpus, B * var_tok)
    else:
        var_n = B * (pg * (1 - pg)).sum(axis=1)
    use_u = a * mu_u >= b * mu_n
    mu = np.where(use_u, a * mu_u, b * mu_n)
    sd = np.where(use_u, a * np.sqrt(var_u), b * np.sqrt(var_n))
    return _expected_max_normals(mu, sd)


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
    sequences at ``context`` cached tokens each.

    Args:
        moe_step_time: (mean, p50, p99) of the routed-expert straggler time
            summed over all decode MoE layers, from the routing Monte Carlo at
            this batch (see :func:`moe_layer_shape` and
            :func:`moe_cost_coefficients` for its inputs). If None, the closed
            form for independent routing with ``popularity`` (uniform if None)
            is used.
    """
    opt = options or StepOptions()
    if batch < 1:
        raise ValueError(f"batch={batch!r}: must be >= 1")
    if not (context > 0 and math.isfinite(context)):
        raise ValueError(f"context={context!r}: must be a positive finite number of tokens")
    d = model.hidden_size
    wb, eb, kvb, ab = precision.weight_bytes, precision.expert_bytes, precision.kv_bytes, precision.activation_bytes
    dtype = precision.compute
    tp, pp = plan.tp, plan.pp
    micro = batch / pp  # sequences per pipeline microbatch
    # Non-expert parts: sharded over tp, or replicated with DP-attention where
    # each of the tp GPUs serves micro/tp sequences on its own.
    shard = 1 if plan.attn_dp else tp
    seqs_gpu = micro / tp if plan.attn_dp else micro
    att = model.attention
    kv_split = 1 if (plan.attn_dp or att.kind == "mla") else min(tp, att.num_kv_heads)

    pieces: list[Piece] = []
    L = model.decode_layers
    local = att.local_layers
    window = att.local_window or context
    ctx_local = min(context, window)

    # Attention (full-context and local-window layers).
    norm_bytes = 2 * d * wb
    for name, nlayers, ctx in (("attention", L - local, context), ("attention (local)", local, ctx_local)):
        if nlayers <= 0:
            continue
        w = model.attention_params * wb / shard + norm_bytes
        kv = seqs_gpu * ctx * model.kv_bytes_per_token_per_layer(kvb) / kv_split
        fl = seqs_gpu * att.flops_per_token(d, ctx) / shard
        t, bound = _roofline(w + kv, fl, acc, dtype)
        pieces.append(Piece(name, t * nlayers, (w + kv) * nlayers, fl * nlayers, bound, nlayers))

    # Dense FFN layers.
    n_dense = model.decode_dense_layers
    if n_dense > 0 and model.dense_ffn_params > 0:
        w = model.dense_ffn_params * wb / shard
        fl = 2.0 * seqs_gpu * model.dense_ffn_params / shard
        t, bound = _roofline(w, fl, acc, dtype)
        pieces.append(Piece("dense ffn", t * n_dense, w * n_dense, fl * n_dense, bound, n_dense))

    # MoE layers: router + shared experts (deterministic), routed experts (random).
    n_moe = model.decode_moe_layers if model.is_moe else 0
    moe_mean = moe_p50 = moe_p99 = 0.0
    shape = None
    if n_moe > 0:
        per_layer = model.router_params * wb / shard + model.shared_experts * model.shared_expert_params * eb / shard
        fl = 2.0 * seqs_gpu * (model.router_params + model.shared_experts * model.shared_expert_params) / shard
        t, bound = _roofline(per_layer, fl, acc, dtype)
        pieces.append(Piece("router + shared experts", t * n_moe, per_layer * n_moe, fl * n_moe, bound, n_moe))

        shape = moe_layer_shape(model, plan, batch)
        a, bcoef = moe_cost_coefficients(model, precision, acc, plan)
        if moe_step_time is None:
            m, s = moe_straggler_closed_form(model.routed_experts, model.top_k, shape.tokens, shape.gpus,
                                             a, bcoef, popularity)
            moe_mean = n_moe * m
            sd = math.sqrt(n_moe) * s
            moe_p50, moe_p99 = moe_mean, moe_mean + 2.3263478740408408 * sd
        else:
            moe_mean, moe_p50, moe_p99 = moe_step_time
        # Bytes/FLOPs of the average GPU (for the breakdown table).
        pi = model.top_k / model.routed_experts
        mean_u = shape.experts_per_gpu * -math.expm1(shape.tokens * math.log1p(-min(pi, 1 - 1e-15)))
        mean_n = shape.tokens * model.top_k / shape.gpus
        eb_layer = mean_u * model.expert_params * eb / shape.etp
        fl_layer = 2.0 * mean_n * model.expert_params / shape.etp
        _, bound = _roofline(eb_layer, fl_layer, acc, dtype)
        pieces.append(Piece("routed experts (straggler)", moe_mean, eb_layer * n_moe, fl_layer * n_moe, bound, n_moe))

    # LM head (last stage only; embedding lookup reads B rows: negligible).
    w = model.vocab_size * d * wb / shard
    fl = 2.0 * seqs_gpu * model.vocab_size * d / shard
    t, bound = _roofline(w, fl, acc, dtype)
    pieces.append(Piece("lm head", t, w, fl, bound, 1))

    # Communication.
    comm: list[Piece] = []
    act = seqs_gpu * d * ab
    if shard > 1:
        t = _allreduce_time(act, tp, acc, opt)
        n = 2 * L
        comm.append(Piece("tp all-reduce", t * n, act * n, 0.0, "link", n))
    if n_moe > 0 and shape is not None:
        stage_gpus = plan.dp * tp
        tokens_src = micro * plan.dp / stage_gpus  # tokens each GPU of the stage sends
        group = shape.gpus * shape.etp
        if shape.gpus > 1:
            remote = (shape.gpus - 1) / shape.gpus
            nbytes = tokens_src * model.top_k * d * ab * remote
            dom = acc.scaleup_domain
            inter_frac = 0.0 if group <= dom else 1.0 - dom / group
            t_one = max(nbytes * (1 - inter_frac) / (acc.scaleup_bandwidth * acc.link_efficiency),
                        nbytes * inter_frac / (acc.internode_bandwidth * acc.link_efficiency))
            t = 2 * (opt.collective_latency + t_one)
            comm.append(Piece("ep all-to-all", t * n_moe, 2 * nbytes * n_moe, 0.0, "link", n_moe))
        if shape.etp > 1 and not (shard > 1 and shape.etp == tp and shape.gpus == 1):
            # Expert-TP partial sums need their own reduction unless the
            # attention TP all-reduce already covers it (classic TP MoE).
            nbytes = shape.tokens / max(shape.gpus, 1) * model.top_k * d * ab
            t = _allreduce_time(nbytes, shape.etp, acc, opt)
            comm.append(Piece("expert-tp all-reduce", t * n_moe, nbytes * n_moe, 0.0, "link", n_moe))
    if pp > 1:
        nbytes = micro * d * ab
        group = tp * pp
        bw = _link(acc, group)
        t = (pp - 1) * (opt.collective_latency + nbytes / bw)
        comm.append(Piece("pp send", t, nbytes * (pp - 1), 0.0, "link", pp - 1))

    compute_time = sum(p.time for p in pieces)
    comm_time = sum(p.time for p in comm)
    det = compute_time - moe_mean
    if opt.overlap_comm:
        total = max(compute_time, comm_time)
        p50 = max(det + moe_p50, comm_time)
        p99 = max(det + moe_p99, comm_time)
    else:
        total = compute_time + comm_time
        p50 = det + moe_p50 + comm_time
        p99 = det + moe_p99 + comm_time
    return StepBreakdown(batch=int(batch), context=float(context), pieces=tuple(pieces + comm), time=total,
                         time_p50=p50, time_p99=p99, moe_tokens=shape.tokens if shape else 0.0)
