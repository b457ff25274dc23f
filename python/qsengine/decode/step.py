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

Each compute piece is, with ``StepOptions(kernels="calibrated")`` (the
default), a sum of kernels at their true per-GPU shapes timed by the fitted
kernel models of :mod:`qsengine.calibration`; with ``kernels="roofline"`` a
roofline ``max(bytes / (BW·η_bw), flops / (F·η_f))``. Each records which side
bound it. Pieces run one after another; communication follows compute
(``overlap="none"``, the default), runs as two overlapped half-batches
(``"tbo"``) or is hidden entirely (``"full"``).

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

#: Values of :attr:`StepOptions.kernels`.
KERNELS = ("calibrated", "roofline")
#: Values of :attr:`StepOptions.overlap` (their code in ``StepParams.overlap``: 0, 2, 1).
OVERLAP = ("none", "tbo", "full")

__all__ = [
    "KERNELS",
    "OVERLAP",
    "StepOptions",
    "Piece",
    "StepBreakdown",
    "MoeLayerShape",
    "moe_layer_shape",
    "moe_cost_coefficients",
    "moe_straggler_closed_form",
    "straggler_closed_form",
    "straggler_ceiling",
    "grouped_cost",
    "kernel_dtypes",
    "max_iid_normal",
    "StepParams",
    "step_params",
    "step_time",
    "draft_step_time",
    "accepted_tokens",
    "check_speculation",
    "MAX_DRAFT_TOKENS",
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
            (time = max instead of sum); default False (conservative). The
            same as ``overlap="full"``.
        overlap: ``"none"`` (default: communication after compute),
            ``"tbo"`` (two-batch overlap, SGLang/DeepSeek: the batch runs as
            two microbatches of half the sequences, one's communication
            hidden behind the other's compute; docs/model.md "Overlap"),
            ``"full"`` (communication entirely hidden: max(compute, comm)).
        kernels: ``"calibrated"`` (default): every piece is a kernel with its
            true per-GPU shape, timed by the fitted kernel models of
            :mod:`qsengine.calibration` (fixed per-call costs, idle-width
            padding, soft ridge; collectives inside a scale-up domain by the
            fitted all-reduce / all-to-all); ``"roofline"``: the paper's
            formulas, ``max(bytes/(BW·η_bw), flops/(F·η_f))`` with the
            accelerator's constant efficiencies and ``collective_latency``
            (docs/model.md, "Calibrated kernels").
        draft_tokens: speculative decoding (MTP / draft module, docs/model.md
            "Speculative decoding"): draft tokens per step, 0 = off. The
            pipeline sets it from the point field ``draft_tokens``.
        acceptance: probability that each draft token is accepted, given the
            ones before it were (chain acceptance), in [0, 1]; from the point
            field ``acceptance``.
    """

    collective_latency: float = 10e-6
    overlap_comm: bool = False
    kernels: Literal["calibrated", "roofline"] = "calibrated"
    overlap: Literal["none", "tbo", "full"] = "none"
    draft_tokens: int = 0
    acceptance: float = 0.0

    def __post_init__(self) -> None:
        if self.overlap not in OVERLAP:
            raise ValueError(f"StepOptions: field 'overlap' = {self.overlap!r}: must be one of {list(OVERLAP)}")
        if self.overlap_comm and self.overlap == "tbo":
            raise ValueError("StepOptions: field 'overlap' = 'tbo': conflicts with overlap_comm=True (which means "
                             "'full'); set one of them")
        if not (math.isfinite(self.collective_latency) and self.collective_latency >= 0):
            raise ValueError(f"StepOptions.collective_latency={self.collective_latency!r}: must be finite and >= 0")
        if self.kernels not in KERNELS:
            raise ValueError(f"StepOptions: field 'kernels' = {self.kernels!r}: must be one of {list(KERNELS)}")
        check_speculation(self.draft_tokens, self.acceptance, prefix="StepOptions.")


#: Largest number of draft tokens per step accepted (serving engines run 1-3
#: MTP/EAGLE draft steps, e.g. SGLang ``--speculative-num-steps``; beyond 16
#: the chain acceptance alpha^d leaves nothing to gain at any realistic alpha).
MAX_DRAFT_TOKENS = 16


def check_speculation(draft_tokens: Any, acceptance: Any, prefix: str = "") -> None:
    """Refuse a bad speculative-decoding setting, naming the field, the value and the rule."""
    import numbers

    if isinstance(draft_tokens, (bool, np.bool_)) or not isinstance(draft_tokens, numbers.Integral):
        raise TypeError(f"field '{prefix}draft_tokens' = {draft_tokens!r}: must be an int, "
                        f"got {type(draft_tokens).__name__}")
    if not 0 <= draft_tokens <= MAX_DRAFT_TOKENS:
        raise ValueError(f"field '{prefix}draft_tokens' = {draft_tokens!r}: must be in [0, {MAX_DRAFT_TOKENS}] "
                         "(0 = no speculative decoding)")
    if isinstance(acceptance, (bool, np.bool_)) or not isinstance(acceptance, numbers.Real):
        raise TypeError(f"field '{prefix}acceptance' = {acceptance!r}: must be a number in [0, 1], "
                        f"got {type(acceptance).__name__}")
    if not (0.0 <= acceptance <= 1.0):
        raise ValueError(f"field '{prefix}acceptance' = {acceptance!r}: must be in [0, 1] (the probability that "
                         "a draft token is accepted given the ones before it were)")


def accepted_tokens(draft: Any, acceptance: Any) -> Any:
    """Expected tokens a sequence gains per speculative step: 1 + a + a^2 + ... + a^d
    (chain acceptance: draft i counts only if drafts 1..i-1 did; the verify pass
    always yields one token). Leviathan et al., arXiv:2211.17192, eq. (1):
    (1 - a^(d+1)) / (1 - a); d + 1 at a = 1."""
    d = np.asarray(draft, dtype=np.float64)
    a = np.asarray(acceptance, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(a >= 1.0, d + 1.0, (1.0 - a ** (d + 1.0)) / (1.0 - a))


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
    # kernels: 1 = calibrated, 0 = roofline (StepOptions.kernels)
    "kern",
    # calibrated GEMM fit (non-expert weights): BW·η_bw, F·η_f, p, c0, n_pad, weight/activation bytes
    "g_bw", "g_f", "g_p", "g_c0", "g_pad", "g_wb", "g_ab",
    # per-GPU GEMM shapes (n, k; m = sequences at run time; n = 0: absent): attention projections,
    # FFN matrices (3 gated, 2 not), shared experts' up (n) and down (k), LM head's n
    "ap_n1", "ap_k1", "ap_n2", "ap_k2", "ap_n3", "ap_k3", "ap_n4", "ap_k4",
    "ffn_mats", "ffn_bias", "sh_n", "sh_k", "lm_n",
    # calibrated decode attention core: fit (BW·η_bw, F·η_f, p, c0, c1, stream_pad, split), KV bytes,
    # heads and KV streams per GPU, cached elements per stream-token, Q/O bytes and FLOPs per head-token
    "at_bw", "at_f", "at_p", "at_c0", "at_c1", "at_pad", "at_split", "at_kvb", "at_h", "at_kvh", "at_el",
    "at_qo", "at_fl",
    # prefill attention core's FLOP rate: bf16 peak x the measured bf16 matmul efficiency (no prefill kernel fit)
    "pf_core_f",
    # routed experts: per-GPU layer cost moe_fix + max(moe_a·u_g, moe_b·n_g)
    "moe_a", "moe_b", "moe_fix",
    # fitted collectives (two protocols: latency s, bandwidth B/s) at the TP, EP x ETP and ETP group
    # sizes; nan: not fitted or beyond the scale-up domain (the link model applies)
    "ar_a1", "ar_b1", "ar_a2", "ar_b2", "aa_a1", "aa_b1", "aa_a2", "aa_b2", "er_a1", "er_b1", "er_a2", "er_b2",
    # plan: redundant expert slots per EP group (EPLB; decode/slots.py)
    "redundant",
    # speculative decoding (StepOptions.draft_tokens, .acceptance): draft tokens per step, acceptance rate
    "draft", "accept",
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
    kern: np.ndarray
    g_bw: np.ndarray
    g_f: np.ndarray
    g_p: np.ndarray
    g_c0: np.ndarray
    g_pad: np.ndarray
    g_wb: np.ndarray
    g_ab: np.ndarray
    ap_n1: np.ndarray
    ap_k1: np.ndarray
    ap_n2: np.ndarray
    ap_k2: np.ndarray
    ap_n3: np.ndarray
    ap_k3: np.ndarray
    ap_n4: np.ndarray
    ap_k4: np.ndarray
    ffn_mats: np.ndarray
    ffn_bias: np.ndarray
    sh_n: np.ndarray
    sh_k: np.ndarray
    lm_n: np.ndarray
    at_bw: np.ndarray
    at_f: np.ndarray
    at_p: np.ndarray
    at_c0: np.ndarray
    at_c1: np.ndarray
    at_pad: np.ndarray
    at_split: np.ndarray
    at_kvb: np.ndarray
    at_h: np.ndarray
    at_kvh: np.ndarray
    at_el: np.ndarray
    at_qo: np.ndarray
    at_fl: np.ndarray
    pf_core_f: np.ndarray
    moe_a: np.ndarray
    moe_b: np.ndarray
    moe_fix: np.ndarray
    ar_a1: np.ndarray
    ar_b1: np.ndarray
    ar_a2: np.ndarray
    ar_b2: np.ndarray
    aa_a1: np.ndarray
    aa_b1: np.ndarray
    aa_a2: np.ndarray
    aa_b2: np.ndarray
    er_a1: np.ndarray
    er_b1: np.ndarray
    er_a2: np.ndarray
    er_b2: np.ndarray
    redundant: np.ndarray
    draft: np.ndarray
    accept: np.ndarray
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
        latency=opt.collective_latency,
        overlap=1 if (opt.overlap_comm or opt.overlap == "full") else (2 if opt.overlap == "tbo" else 0),
        redundant=plan.redundant if moe else 0,
        draft=opt.draft_tokens, accept=opt.acceptance,
    )
    vals.update(_kernel_lane(model, precision, acc, plan, opt, kv_split))
    return StepParams(**{k: np.array([float(v)], dtype=np.float64) for k, v in vals.items()})


# --------------------------------------------------------- calibrated kernels
def kernel_dtypes(precision: Precision) -> dict[str, str | None]:
    """The calibration dtype of each kernel family for ``precision`` (None: no
    measured kernel runs it; that family falls back to the roofline at the
    accelerator's spec efficiencies). fp8 weights are block-scaled (DeepSeek's
    128x128 fp32 scales, ``Precision.weight_bytes`` = 1 + 4/16384), so their
    GEMMs are ``fp8_block``; fp4 is ``nvfp4``; bf16 compute over 4-bit experts
    is ``w4a16_mxfp4``; the KV cache is ``bf16`` (2 B) or ``fp8`` (1 B)."""
    c = precision.compute
    gemm = {"bf16": "bf16", "fp8": "fp8_block", "fp4": "nvfp4"}.get(c)
    if c == "bf16" and precision.weight_bytes != 2.0:
        gemm = None
    if c == "bf16":
        grouped = "bf16" if precision.expert_bytes == 2.0 else ("w4a16_mxfp4" if precision.expert_bytes < 1 else None)
    else:
        grouped = {"fp8": "fp8_block", "fp4": "nvfp4"}.get(c)
    kv = {2.0: "bf16", 1.0: "fp8"}.get(float(precision.kv_bytes))
    return {"gemm": gemm, "grouped_gemm": grouped, "attention": kv}


def _fit(acc: Accelerator, family: str, dtype: str | None) -> dict[str, float] | None:
    from qsengine.calibration.runtime import kernel_params

    return None if dtype is None else kernel_params(acc, family, dtype)  # type: ignore[arg-type]


def grouped_cost(model: Model, precision: Precision, acc: Accelerator, plan: Plan) -> tuple[float, float, float]:
    """(a, b, fixed): the calibrated grouped-GEMM time of one GPU's routed
    experts in one layer, ``fixed + max(a·u_g, b·n_g)`` (u_g touched experts,
    n_g token-expert assignments), mapped from the fit of
    :func:`qsengine.calibration.grouped_gemm_time`::

        t = c0 + c1·n + c_e·u + smax(W_b(u·i + pad)/(BW·η_bw) + n·h·(b_a + 2)/(BW·η_bw),
                                      2·W(n·i + pad·n/u)/(F·η_f); p)

    (W = weights per unit of expert width, i = width per GPU, h = hidden, b_a
    activation bytes) by three approximations: smax -> max; one assignment
    per touched expert in the bandwidth branch (u = n, the decode regime:
    ``a`` = weight bytes + c_e + c1 + activation bytes of one assignment,
    ``b`` = FLOPs + c1 + activation bytes per assignment); the idle-width
    padding as a fixed term ``c0 + max(pad bytes, pad FLOPs)`` (n/u = 1).
    Their error against the runtime on the held-out rows is in
    docs/model.md ("Calibrated kernels"). Without a fit (e.g. A100, int8):
    the roofline's (a, b) with the spec efficiencies and fixed = 0."""
    etp = plan.expert_tp
    dt = kernel_dtypes(precision)["grouped_gemm"]
    f = _fit(acc, "grouped_gemm", dt)
    if f is None or not model.is_moe:
        a = model.expert_params * precision.expert_bytes / etp / (acc.hbm_bandwidth * acc.bandwidth_efficiency)
        b = 2.0 * model.expert_params / etp / (acc.peak_flops(precision.compute) * acc.flops_efficiency)
        return a, b, 0.0
    assert dt is not None
    # weights per unit of expert width (3·d gated) and of one expert on one GPU
    return grouped_coefficients(acc, dt, f, model.hidden_size, model.expert_params / model.moe_intermediate,
                                model.expert_params / etp)


def grouped_coefficients(acc: Accelerator, dtype: str, fit: dict[str, float], hidden: float, per_width: float,
                         expert_weights: float) -> tuple[float, float, float]:
    """(a, b, fixed) of :func:`grouped_cost` from a grouped-GEMM fit record
    (``fit``, :func:`qsengine.calibration.runtime.kernel_params`) for experts
    of ``expert_weights`` weights on one GPU, ``per_width`` weights per unit
    of expert width, model width ``hidden``."""
    from qsengine.calibration.models import ACT_BYTES, PEAK_DTYPE, WEIGHT_BYTES

    bw = acc.hbm_bandwidth * fit["eta_bw"]
    fl = acc.peak_flops(PEAK_DTYPE[dtype]) * fit["eta_f"]
    act = hidden * (ACT_BYTES[dtype] + 2.0) / bw  # one assignment's activations in and out
    a = expert_weights * WEIGHT_BYTES[dtype] / bw + fit["c_expert"] + fit["c1"] + act
    b = 2.0 * expert_weights / fl + fit["c1"] + act
    fixed = fit["c0"] + max(per_width * fit["width_pad"] * WEIGHT_BYTES[dtype] / bw,
                            2.0 * per_width * fit["width_pad"] / fl)
    return a, b, fixed


def _kernel_lane(model: Model, precision: Precision, acc: Accelerator, plan: Plan, opt: StepOptions,
                 kv_split: int) -> dict[str, float]:
    """The calibrated-kernel fields of one lane (see STEP_FIELDS): fits
    resolved once per (accelerator, dtype, plan group sizes), shapes per GPU."""
    from qsengine.calibration.models import ACT_BYTES, PEAK_DTYPE, WEIGHT_BYTES
    from qsengine.calibration.runtime import collective_lines

    att = model.attention
    d = model.hidden_size
    shard = 1 if plan.attn_dp else plan.tp
    dts = kernel_dtypes(precision)
    inf = math.inf
    out: dict[str, float] = {"kern": 1.0 if opt.kernels == "calibrated" else 0.0}
    # GEMMs (non-expert weights); no fit: roofline at the spec efficiencies, no fixed cost
    g = _fit(acc, "gemm", dts["gemm"])
    if g is not None:
        dt = dts["gemm"]
        assert dt is not None
        out.update(g_bw=acc.hbm_bandwidth * g["eta_bw"], g_f=acc.peak_flops(PEAK_DTYPE[dt]) * g["eta_f"],
                   g_p=g["p"], g_c0=g["c0"], g_pad=g["n_pad"], g_wb=WEIGHT_BYTES[dt], g_ab=ACT_BYTES[dt])
    else:
        out.update(g_bw=acc.hbm_bandwidth * acc.bandwidth_efficiency,
                   g_f=acc.peak_flops(precision.compute) * acc.flops_efficiency, g_p=inf, g_c0=0.0, g_pad=0.0,
                   g_wb=precision.weight_bytes, g_ab=precision.activation_bytes)
    # attention projections per GPU (m = sequences): (n, k) of each GEMM
    h = att.num_heads
    if att.kind == "mla":
        r_q, r_kv, rope = att.q_lora_rank or 0, att.kv_lora_rank or 0, att.qk_rope_head_dim or 0
        nope = att.head_dim - rope if att.qk_nope_head_dim is None else att.qk_nope_head_dim
        qk = nope + rope
        # fused q_a + kv_a (replicated), q_b (or q without LoRA), kv_b (absorbed: same weights), o
        mats = [(r_q + r_kv + rope, d), (h * qk / shard, r_q if r_q else d), (h * (nope + att.value_dim) / shard, r_kv),
                (d, h * att.value_dim / shard)]
    else:
        kvh_gpu = att.num_kv_heads / kv_split if not plan.attn_dp else att.num_kv_heads
        mats = [(h * att.head_dim / shard + kvh_gpu * (att.head_dim + att.value_dim), d),
                (d, h * att.value_dim / shard), (0.0, 0.0), (0.0, 0.0)]
    for i, (n, k) in enumerate(mats, start=1):
        out[f"ap_n{i}"], out[f"ap_k{i}"] = float(n), float(k)
    out["ffn_mats"] = 3.0 if model.gated_ffn else 2.0
    out["ffn_bias"] = 1.0 if model.ffn_bias else 0.0
    sh_w = model.shared_experts * model.shared_intermediate if model.is_moe else 0
    out["sh_n"] = (out["ffn_mats"] - 1) * sh_w / shard
    out["sh_k"] = sh_w / shard
    out["lm_n"] = model.vocab_size / shard
    # decode attention core (bf16 compute whatever the weights' dtype: production MLA/GQA kernels)
    heads = h / shard
    if att.kind == "mla":
        r_kv, rope = att.kv_lora_rank or 0, att.qk_rope_head_dim or 0
        fam, kvh, el, qo, flo = "attention_mla", 1.0, r_kv + rope, 2.0 * (2 * r_kv + rope), 2.0 * (2 * r_kv + rope)
    else:
        kvh = att.num_kv_heads / (1 if plan.attn_dp else kv_split)
        fam = "attention_mha" if heads == kvh else "attention_gqa"
        el, qo, flo = 2.0 * att.head_dim, 4.0 * att.head_dim, 4.0 * att.head_dim
    a = _fit(acc, fam, dts["attention"])
    if fam == "attention_mha" and a is None:
        a = _fit(acc, "attention_gqa", dts["attention"])
    if a is not None:
        out.update(at_bw=acc.hbm_bandwidth * a["eta_bw"], at_f=acc.peak_flops("bf16") * a["eta_f"], at_p=a["p"],
                   at_c0=a["c0"], at_c1=a["c1"], at_pad=a["stream_pad"], at_split=a["split"])
    else:
        out.update(at_bw=acc.hbm_bandwidth * acc.bandwidth_efficiency,
                   at_f=acc.peak_flops("bf16") * acc.flops_efficiency, at_p=inf, at_c0=0.0, at_c1=0.0,
                   at_pad=0.0, at_split=inf)
    out.update(at_kvb=precision.kv_bytes, at_h=heads, at_kvh=kvh, at_el=el, at_qo=qo, at_fl=flo,
               pf_core_f=acc.peak_flops("bf16") * acc.flops_efficiency)
    # routed experts
    if model.is_moe:
        if opt.kernels == "calibrated":
            ma, mb, mf = grouped_cost(model, precision, acc, plan)
        else:
            ma = model.expert_params * precision.expert_bytes / plan.expert_tp / (
                acc.hbm_bandwidth * acc.bandwidth_efficiency)
            mb = 2.0 * model.expert_params / plan.expert_tp / (
                acc.peak_flops(precision.compute) * acc.flops_efficiency)
            mf = 0.0
    else:
        ma = mb = mf = 0.0
    out.update(moe_a=ma, moe_b=mb, moe_fix=mf)
    # fitted collectives inside one scale-up domain
    nan = math.nan
    for pre, fam_c, grp in (("ar", "allreduce", plan.tp), ("aa", "alltoall", plan.ep * plan.expert_tp),
                            ("er", "allreduce", plan.expert_tp)):
        lines = None
        if 1 < grp <= acc.scaleup_domain:
            try:
                lines = collective_lines(acc, fam_c, grp)  # type: ignore[arg-type]
            except (ValueError, KeyError, FileNotFoundError):
                lines = None
        if lines is None or len(lines[0]) != 2:
            out.update({f"{pre}_a1": nan, f"{pre}_b1": nan, f"{pre}_a2": nan, f"{pre}_b2": nan})
        else:
            al, be = lines
            out.update({f"{pre}_a1": float(al[0]), f"{pre}_b1": float(be[0]), f"{pre}_a2": float(al[1]),
                        f"{pre}_b2": float(be[1])})
    return out


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


def _smax(x: np.ndarray, y: np.ndarray, pw: np.ndarray) -> np.ndarray:
    """``(x^p + y^p)^(1/p)`` (qsengine.calibration.models.smax, over lanes with per-lane p)."""
    hi = np.maximum(x, y)
    lo = np.minimum(x, y)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(hi > 0, lo / hi, 0.0)
    return hi * (1.0 + r ** pw) ** (1.0 / pw)


def _gemm(p: StepParams, m: np.ndarray, n: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Calibrated GEMM ``[m,k] x [k,n]`` on one GPU (qsengine.calibration.gemm_time):
    (time, bandwidth term, compute term); 0 where ``n == 0`` (no such GEMM)."""
    ne = n + p.g_pad
    nb = m * k * p.g_ab + k * ne * p.g_wb + 2.0 * m * ne
    fl = 2.0 * m * ne * k
    tb = nb / p.g_bw
    tf = fl / p.g_f
    return np.where(n > 0, p.g_c0 + _smax(tb, tf, p.g_p), 0.0), tb, tf


def _attn_core(p: StepParams, seqs: np.ndarray, ctx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Calibrated decode attention core of one layer on one GPU
    (qsengine.calibration.attention_time, gqa/mha/mla): (time, bandwidth term, compute term)."""
    streams = seqs * p.at_kvh * ctx + p.at_pad * np.minimum(ctx, p.at_split)
    nb = streams * p.at_el * p.at_kvb + seqs * p.at_h * p.at_qo
    fl = seqs * ctx * p.at_h * p.at_fl
    tb = nb / p.at_bw
    tf = fl / p.at_f
    return p.at_c0 + p.at_c1 * (seqs * p.at_h) + _smax(tb, tf, p.at_p), tb, tf


def _fitted_collective(nbytes: np.ndarray, a1: np.ndarray, b1: np.ndarray, a2: np.ndarray,
                       b2: np.ndarray) -> np.ndarray:
    """``min_j (alpha_j + S/beta_j)`` over the two fitted protocols (nan where not fitted)."""
    return np.minimum(a1 + nbytes / b1, a2 + nbytes / b2)


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
    #: mean compute time (pieces summed, straggler included), its p50 and p99, and the communication time
    compute: np.ndarray | None = None
    compute_p50: np.ndarray | None = None
    compute_p99: np.ndarray | None = None
    comm: np.ndarray | None = None


def step_time(p: StepParams, batch: np.ndarray, context: np.ndarray, *, pi: np.ndarray | None = None,
              uniform: bool = True, moe_step_time: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
              detail: bool = False) -> StepTimes:
    """Step time of one replica for every lane of ``p`` (see docs/model.md).

    ``batch`` and ``context`` are arrays over the lanes. The routed-expert
    straggler comes from ``moe_step_time`` (mean, p50, p99 arrays from the
    Monte Carlo, without the grouped GEMM's fixed term, which is added here;
    for two-batch-overlap lanes the straggler of one half-batch microbatch)
    or, if None, from the closed form (``pi`` = inclusion
    probabilities, ``uniform`` when None), which takes one routing law per
    call: MoE lanes must agree on experts and top-k (ValueError otherwise).

    Speculative lanes (``p.draft`` = d > 0; docs/model.md, "Speculative
    decoding"): the step is one verify pass of d + 1 token rows per sequence
    (``moe_step_time`` is its straggler) plus d passes of the one-block draft
    module (:func:`draft_step_time`, closed-form straggler with ``pi``), and
    every time, quantile and piece is per accepted token: divided by
    1 + a + ... + a^d (:func:`accepted_tokens`). With ``detail`` the draft
    passes' pieces follow, named ``"draft: <piece>"`` (d passes summed).
    """
    r = _pass_time(p, batch, context, pi=pi, uniform=uniform, moe_step_time=moe_step_time, detail=detail)
    spec = p.draft > 0
    if not spec.any():
        return r
    batch = np.asarray(batch, dtype=np.float64)
    dr = draft_step_time(p, batch, np.asarray(context, dtype=np.float64), pi=pi, uniform=uniform, detail=detail)
    acc = np.where(spec, accepted_tokens(p.draft, p.accept), 1.0)
    time, p50, p99 = (np.where(spec, (v + p.draft * dv) / acc, v)  # other lanes exactly as without drafts
                      for v, dv in ((r.time, dr.time), (r.p50, dr.p50), (r.p99, dr.p99)))
    pieces = []
    if detail:  # per accepted token, like the time: the pieces of a speculative lane still sum to it
        pieces = [dataclasses.replace(pa, time=pa.time / acc, bytes=pa.bytes / acc, flops=pa.flops / acc)
                  for pa in r.pieces]
        pieces += [dataclasses.replace(pa, name="draft: " + pa.name, time=pa.time * p.draft / acc,
                                       bytes=pa.bytes * p.draft / acc, flops=pa.flops * p.draft / acc,
                                       count=pa.count * p.draft, present=pa.present & spec) for pa in dr.pieces]
    return StepTimes(time=time, p50=p50, p99=p99, tokens=r.tokens, pieces=tuple(pieces))


def _pass_time(p: StepParams, batch: np.ndarray, context: np.ndarray, *, pi: np.ndarray | None = None,
               uniform: bool = True, moe_step_time: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
               detail: bool = False) -> StepTimes:
    """One forward pass of every lane of ``p`` (see :func:`step_time`): a plain
    decode step, or for a speculative lane its verify pass (d + 1 token rows
    per sequence, weights and KV read once), two-batch overlap included; no
    draft passes, no division by the accepted tokens."""
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
    # speculative verify pass (docs/model.md, "Speculative decoding"): each sequence runs its d draft tokens
    # + 1 through the model, so token rows (GEMM rows, FLOPs, activations, routed tokens) are x(d+1), while
    # weights and each sequence's KV cache are read once; x1.0 (d = 0) leaves every value bit for bit
    spec_rows = 1.0 + p.draft
    micro_rows = micro * spec_rows  # token rows of one microbatch
    seqs_kv = np.where(adp, micro / p.tp, micro)  # sequences per attention group (KV caches read)
    seqs = seqs_kv * spec_rows  # token rows per attention group
    ctx_local = np.where(p.window > 0, np.minimum(ctx, p.window), ctx)
    # kernels per lane: calibrated (kern = 1) or roofline; each is computed only if some lane needs it
    cal = p.kern > 0
    any_cal = bool(cal.any())
    all_cal = any_cal and bool(cal.all())
    roof_work = detail or not all_cal

    def pick(t_cal: np.ndarray | None, t_roof: np.ndarray | None) -> np.ndarray:
        if all_cal:
            return t_cal  # type: ignore[return-value]
        if not any_cal:
            return t_roof  # type: ignore[return-value]
        return np.where(cal, t_cal, t_roof)  # type: ignore[arg-type]

    def gemms(shapes: tuple[tuple[np.ndarray, np.ndarray], ...], m: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """Summed calibrated GEMM time of ``shapes`` (n, k) at m tokens (default seqs), and whether bandwidth
        bound them."""
        t = np.zeros(n_lanes)
        tb = np.zeros(n_lanes)
        tf = np.zeros(n_lanes)
        rows_m = seqs if m is None else m
        for n_, k_ in shapes:
            if not n_.any():
                continue
            tg, gb, gf = _gemm(p, rows_m, n_, k_)
            t = t + tg
            if detail:
                tb = tb + np.where(n_ > 0, gb, 0.0)
                tf = tf + np.where(n_ > 0, gf, 0.0)
        return t, tb >= tf

    # attention: full-context layers, then local-window layers
    norm_bytes = 2 * p.d * p.wb
    pieces = []
    proj = ((p.ap_n1, p.ap_k1), (p.ap_n2, p.ap_k2), (p.ap_n3, p.ap_k3), (p.ap_n4, p.ap_k4))
    for name, nl, c in (("attention", p.layers - p.local, ctx), ("attention (local)", p.local, ctx_local)):
        if not detail and not (nl > 0).any():
            pieces.append(np.zeros(n_lanes))
            continue
        t_r = b_r = t_c = b_c = None
        if roof_work:  # the roofline's work: its time, and the bytes/FLOPs every piece reports
            w = p.attn_params * p.wb / shard + norm_bytes
            kv = seqs_kv * c * p.kv_layer / p.kv_split
            fl = seqs * (p.attn_proj_flops + p.attn_ctx_flops * c) / shard
            t_r, b_r = _roof(w + kv, fl, p)
        if any_cal:
            # the fitted kernel streams each sequence's KV once; the d extra query rows of a verify pass add
            # their score FLOPs at the kernel's fitted compute rate (tf: one row's compute term)
            t_c, tb, tf = _attn_core(p, seqs_kv, c)
            t_c = t_c + p.draft * tf
            tf = tf * spec_rows
            t_p, _ = gemms(proj)
            t_c = t_c + t_p
            b_c = tb >= tf
        t = pick(t_c, t_r)
        pieces.append(np.where(nl > 0, t * nl, 0.0))
        if detail:
            keep(name, pieces[-1], (w + kv) * nl, fl * nl, nl, nl > 0, pick(b_c, b_r))
    # dense FFN. A dense model under attention-DP runs its FFN and LM head
    # tensor-parallel over the replica's tp GPUs, on all the replica's tokens
    dense_adp = adp & (p.moe_layers == 0)
    fshard = np.where(dense_adp, p.tp, shard)
    ftok = np.where(dense_adp, micro_rows, seqs)
    has = (p.dense_layers > 0) & (p.ffn_params > 0)
    t_r = b_r = t_c = b_c = None
    if roof_work:
        w = p.ffn_params * p.wb / fshard
        fl = 2.0 * ftok * p.ffn_params / fshard
        t_r, b_r = _roof(w, fl, p)
    if any_cal:
        # FFN width per GPU, from P = mats·d·w (+ (mats-1)·w + d with biases; Model._ffn_params)
        width = (p.ffn_params - p.ffn_bias * p.d) / (p.ffn_mats * p.d + p.ffn_bias * (p.ffn_mats - 1)) / fshard
        t_c, b_c = gemms((((p.ffn_mats - 1) * width, p.d), (np.where(width > 0, p.d, 0.0), width)), m=ftok)
    t = pick(t_c, t_r)
    pieces.append(np.where(has, t * p.dense_layers, 0.0))
    if detail:
        keep("dense ffn", pieces[-1], w * p.dense_layers, fl * p.dense_layers, p.dense_layers, has, pick(b_c, b_r))
    # MoE: router + shared experts, routed experts (straggler). Dense-only lanes
    # skip it: its pieces would be exact zeros, and x + 0.0 == x for the
    # non-negative times summed below, so the results are bit-identical.
    n_moe = p.moe_layers
    is_moe = n_moe > 0
    any_moe = detail or bool(is_moe.any())
    tokens = batch / p.pp * p.dp / p.copies * spec_rows
    moe_mean = moe_p50 = moe_p99 = None
    if any_moe:
        t_r = b_r = t_c = b_c = None
        if roof_work:
            per_layer = p.router_params * p.wb / shard + p.shared_params * p.eb / shard
            fl = 2.0 * seqs * (p.router_params + p.shared_params) / shard
            t_r, b_r = _roof(per_layer, fl, p)
        if any_cal:
            t_c, b_c = gemms(((np.where(is_moe, p.experts, 0.0), p.d), (p.sh_n, p.d),
                              (np.where(p.sh_k > 0, p.d, 0.0), p.sh_k)))
        t = pick(t_c, t_r)
        pieces.append(np.where(is_moe, t * n_moe, 0.0))
        if detail:
            keep("router + shared experts", pieces[-1], per_layer * n_moe, fl * n_moe, n_moe, is_moe,
                 pick(b_c, b_r))
        a = p.moe_a
        bcoef = p.moe_b
        fix = n_moe * p.moe_fix  # the grouped GEMM's fixed per-layer cost (0 for the roofline)
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
            # the p99 is capped like the mean (straggler_ceiling): no GPU reads more than its experts
            # (a GPU holds (E + R)/ep slots with R redundant ones)
            ceiling = n_moe * straggler_ceiling((p.experts + p.redundant) // np.maximum(p.ep, 1), p.top_k, tokens,
                                                a, bcoef)
            moe_p99 = np.where(is_moe, np.minimum(moe_mean + Z99 * sd, np.maximum(ceiling, moe_mean)), 0.0)
        else:
            moe_mean, moe_p50, moe_p99 = (np.where(is_moe, np.asarray(v, dtype=np.float64), 0.0) for v in moe_step_time)
        if any_cal:
            moe_mean, moe_p50, moe_p99 = (np.where(is_moe, v + fix, 0.0) for v in (moe_mean, moe_p50, moe_p99))
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
            bwb = pick(a * mean_u >= bcoef * mean_n, bwb)
            keep("routed experts (straggler)", moe_mean, eb_layer * n_moe, fl_layer * n_moe, n_moe, is_moe, bwb)
    # LM head
    t_r = b_r = t_c = b_c = None
    if roof_work:
        w = p.vd * p.wb / fshard
        fl = 2.0 * ftok * p.vd / fshard
        t_r, b_r = _roof(w, fl, p)
    if any_cal:  # lm_n is vocab / shard: a dense model under attention-DP splits its LM head tp ways
        t_c, b_c = gemms(((np.where(dense_adp, p.lm_n / p.tp, p.lm_n), p.d),), m=ftok)
    t = pick(t_c, t_r)
    pieces.append(t)
    if detail:
        keep("lm head", t, w, fl, 1.0, ~no, pick(b_c, b_r))

    # communication: fitted collectives inside a scale-up domain for calibrated lanes, else the link model
    comm = []
    act = seqs * p.d * p.ab
    n = 2 * p.layers
    t = _allreduce(act, p.tp, p)
    if any_cal:
        t = np.where(cal & ~np.isnan(p.ar_a1), _fitted_collective(act, p.ar_a1, p.ar_b1, p.ar_a2, p.ar_b2), t)
    comm.append(np.where(shard > 1, t * n, 0.0))
    if detail:
        keep("tp all-reduce", comm[-1], act * n, 0.0, n, shard > 1, link=True)
    # attention-DP + TP FFN (dense): before each dense FFN (and the LM head) the
    # replica's tp GPUs all-gather their sequences' activations and reduce-scatter
    # the FFN's output: the bytes of a ring all-reduce of the replica's tokens
    # plus one more collective latency
    gathered = micro_rows * p.d * p.ab
    n_adp = p.dense_layers + 1
    t = _allreduce(gathered, p.tp, p) + p.latency
    if any_cal:  # two fitted calls (reduce-scatter and all-gather), each moving half an all-reduce's bytes
        t = np.where(cal & ~np.isnan(p.ar_a1),
                     2.0 * _fitted_collective(gathered / 2.0, p.ar_a1, p.ar_b1, p.ar_a2, p.ar_b2), t)
    comm.append(np.where(dense_adp & (p.tp > 1), t * n_adp, 0.0))
    if detail:
        keep("attention-dp gather/scatter", comm[-1], gathered * n_adp, 0.0, n_adp, dense_adp & (p.tp > 1),
             link=True)
    if any_moe:
        has_ep = is_moe & (p.ep > 1)
        stage_gpus = p.dp * p.tp
        tokens_src = micro_rows * p.dp / stage_gpus
        group = p.ep * p.etp
        remote = (p.ep - 1) / p.ep
        nbytes = tokens_src * p.top_k * p.d * p.ab * remote
        inter_frac = np.where(group <= p.domain, 0.0, 1.0 - p.domain / group)
        t_one = np.maximum(nbytes * (1 - inter_frac) / (p.scaleup * p.link_eff),
                           nbytes * inter_frac / (p.internode * p.link_eff))
        t = 2 * (p.latency + t_one)
        if any_cal:  # NCCL all-to-all of the whole send buffer (self chunk included), dispatch + combine
            full = tokens_src * p.top_k * p.d * p.ab
            t = np.where(cal & ~np.isnan(p.aa_a1), 2 * _fitted_collective(full, p.aa_a1, p.aa_b1, p.aa_a2, p.aa_b2), t)
        comm.append(np.where(has_ep, t * n_moe, 0.0))
        if detail:
            keep("ep all-to-all", comm[-1], 2 * nbytes * n_moe, 0.0, n_moe, has_ep, link=True)
        has_etp = is_moe & (p.etp > 1) & ~((shard > 1) & (p.etp == p.tp) & (p.ep == 1))
        nbytes = tokens / np.maximum(p.ep, 1) * p.top_k * p.d * p.ab
        t = _allreduce(nbytes, p.etp, p)
        if any_cal:
            t = np.where(cal & ~np.isnan(p.er_a1), _fitted_collective(nbytes, p.er_a1, p.er_b1, p.er_a2, p.er_b2), t)
        comm.append(np.where(has_etp, t * n_moe, 0.0))
        if detail:
            keep("expert-tp all-reduce", comm[-1], nbytes * n_moe, 0.0, n_moe, has_etp, link=True)
    nbytes = micro_rows * p.d * p.ab
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
    ov = p.overlap == 1
    time = np.where(ov, np.maximum(compute_time, comm_time), compute_time + comm_time)
    if moe_mean is None:  # dense only: no straggler, every quantile is the time
        p50, p99 = time.copy(), time.copy()
        c50 = c99 = compute_time
    else:
        det = compute_time - moe_mean
        c50, c99 = det + moe_p50, det + moe_p99
        p50 = np.where(ov, np.maximum(c50, comm_time), c50 + comm_time)
        p99 = np.where(ov, np.maximum(c99, comm_time), c99 + comm_time)
    tbo = p.overlap == 2
    if tbo.any():
        time, p50, p99 = _two_batch_overlap(p, batch, ctx, tbo, time, p50, p99, pi, uniform, moe_step_time)
    return StepTimes(time=time, p50=p50, p99=p99, tokens=np.where(is_moe, tokens, 0.0), pieces=tuple(detailed),
                     compute=compute_time, compute_p50=c50, compute_p99=c99, comm=comm_time)


def _two_batch_overlap(p: StepParams, batch: np.ndarray, ctx: np.ndarray, tbo: np.ndarray, time: np.ndarray,
                       p50: np.ndarray, p99: np.ndarray, pi: np.ndarray | None, uniform: bool,
                       moe_step_time: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step time of the ``tbo`` lanes under two-batch overlap (SGLang TBO,
    https://lmsys.org/blog/2025-05-05-large-scale-ep/; DeepSeek's dual
    micro-batch overlap, https://github.com/deepseek-ai/profile-data): the
    replica's batch runs as two microbatches of ``B/2`` that alternate, layer
    by layer, between compute and communication, so one's communication hides
    behind the other's compute. With ``C`` and ``M`` the compute and
    communication time of one half-batch step (every weight is read by each
    microbatch), ``T = 2·max(C, M) + min(C, M)/L`` (the shorter stream is
    exposed for one layer of L, at the start). Quantiles take ``C`` at that
    quantile. For Monte Carlo lanes ``moe_step_time`` is the straggler of
    one microbatch (the routing Monte Carlo runs at half the tokens)."""
    rows = np.flatnonzero(tbo)
    sub = p.take(rows).replace(overlap=np.zeros(rows.size))
    mst = None if moe_step_time is None else tuple(np.asarray(v, dtype=np.float64)[rows] for v in moe_step_time)
    h = _pass_time(sub, batch[rows] / 2.0, ctx[rows], pi=pi, uniform=uniform, moe_step_time=mst)  # type: ignore[arg-type]
    layers = sub.layers
    out = []
    for full, c in ((time, h.compute), (p50, h.compute_p50), (p99, h.compute_p99)):
        assert c is not None and h.comm is not None
        t = full.copy()
        t[rows] = 2.0 * np.maximum(c, h.comm) + np.minimum(c, h.comm) / layers
        out.append(t)
    return out[0], out[1], out[2]


def draft_step_time(p: StepParams, batch: np.ndarray, context: np.ndarray, *, pi: np.ndarray | None = None,
                    uniform: bool = True, detail: bool = False) -> StepTimes:
    """Time of ONE draft pass of the MTP / draft module for every lane of ``p``
    (docs/model.md, "Speculative decoding"). The module is one decoder block
    of the lane's kind (an MoE layer for an MoE model, a dense FFN layer for a
    dense one; DeepSeek-V3 report arXiv:2412.19437 §2.2), run on the
    microbatch ``batch/pp`` of one token per sequence, with its own one-layer
    KV cache over the context (full attention), the shared LM head, the TP/EP
    collectives of one layer and no pipeline sends; plus the 2d×d projection
    of [norm(h); norm(emb)] (the piece "mtp projection", a GEMM of
    ``seqs`` rows, n = d/shard, k = 2d). Its routed experts take the closed-form
    straggler of ``pi``. Two-batch overlap does not apply (one layer has
    nothing to alternate with: ``overlap="tbo"`` runs it without overlap);
    ``"full"`` does. Built on the one-pass model over a one-block view of ``p``."""
    batch = np.asarray(batch, dtype=np.float64)
    is_moe = p.moe_layers > 0
    one = np.ones_like(p.layers)
    zero = np.zeros_like(p.layers)
    q = p.replace(layers=one, local=zero, window=zero, pp=one, draft=zero,
                  overlap=np.where(p.overlap == 2, 0.0, p.overlap),
                  moe_layers=np.where(is_moe, 1.0, 0.0), dense_layers=np.where(is_moe, 0.0, 1.0))
    micro = batch / p.pp
    r = _pass_time(q, micro, context, pi=pi, uniform=uniform, detail=detail)
    shard = np.where(p.attn_dp > 0, 1.0, p.tp)
    seqs = np.where(p.attn_dp > 0, micro / p.tp, micro)
    proj = 2.0 * p.d * p.d
    w = proj * p.wb / shard
    fl = 2.0 * seqs * proj / shard
    t_r, b_r = _roof(w, fl, p)
    t_c, tb, tf = _gemm(p, seqs, p.d / shard, 2.0 * p.d)
    cal = p.kern > 0
    t = np.where(cal, t_c, t_r)
    pieces = r.pieces
    if detail:
        n = t.shape[0]
        pieces = pieces + (PieceArrays("mtp projection", t, w, fl, np.ones(n), np.ones(n, bool),
                                       np.where(cal, tb >= tf, b_r)),)
    return StepTimes(time=r.time + t, p50=r.p50 + t, p99=r.p99 + t, tokens=r.tokens, pieces=pieces)


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
