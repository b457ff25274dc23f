"""The step model's inputs over lanes.

:class:`StepOptions`: the inputs of the step model that are not hardware or
model (kernel model, overlap, collective latency, speculative decoding),
validated; :class:`StepParams`: model x precision x accelerator x plan x
options flattened to one float64 array per field (:data:`STEP_FIELDS`), one
entry per *lane*; :func:`step_params` builds one lane, its calibrated-kernel
fields resolved by :mod:`qsengine.decode.kernels`. The step time over lanes is
:func:`qsengine.decode.step.step_time`; formulas in ``docs/model.md``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from qsengine.decode.kernels import _kernel_lane, torus_alltoall_factor
from qsengine.specs import Accelerator, Model, Plan, Precision

#: Values of :attr:`StepOptions.kernels`.
KERNELS = ("calibrated", "roofline")
#: Values of :attr:`StepOptions.overlap` (their code in ``StepParams.overlap``: 0, 2, 1).
OVERLAP = ("none", "tbo", "full")

__all__ = [
    "KERNELS",
    "OVERLAP",
    "MAX_DRAFT_TOKENS",
    "STEP_FIELDS",
    "StepOptions",
    "StepParams",
    "check_speculation",
    "step_params",
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
    # precision: bytes per element of the EP all-to-all's dispatch and combine (Precision.dispatch_bytes, .combine_bytes)
    "db", "cb",
    # EP all-to-all on a torus scale-up (TPU ICI): bisection time / crossbar time of the EP group's slice
    # (kernels.torus_alltoall_factor); 0 on a switch (the crossbar time, unchanged)
    "a2a_torus",
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
    db: np.ndarray
    cb: np.ndarray
    a2a_torus: np.ndarray
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

    def columns(self) -> dict[str, np.ndarray]:
        """The fields by name (the core's ``step_time`` and ``side_search`` read them)."""
        return {f: getattr(self, f) for f in STEP_FIELDS}

    def take(self, idx: np.ndarray) -> "StepParams":
        """The lanes ``idx`` (one fancy-indexing of the field matrix)."""
        return StepParams.from_matrix(np.take(self._matrix(), idx, axis=1))  # C order: each field contiguous

    def replace(self, **fields: np.ndarray) -> "StepParams":
        return dataclasses.replace(self, matrix=None,
                                   **{k: np.ascontiguousarray(v, dtype=np.float64) for k, v in fields.items()})

    @staticmethod
    def stack(parts: "list[StepParams]") -> "StepParams":
        return StepParams.from_matrix(np.concatenate([p._matrix() for p in parts], axis=1))


def _torus_factor(acc: Accelerator, group: int) -> float:
    """The lane's ``a2a_torus``: 0 on a switch; on a torus the bisection factor of
    the EP group's slice (at most one scale-up domain), with wraparound links if
    the slice is at least ``acc.torus_wraparound`` chips."""
    if acc.scaleup_topology != "torus":
        return 0.0
    g = min(group, acc.scaleup_domain)
    assert acc.torus_dims is not None
    wrap = acc.torus_wraparound is None or g >= acc.torus_wraparound
    return torus_alltoall_factor(g, acc.torus_dims, wrap)


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
        attn_ctx_flops=ctx_flops, kv_layer=model.kv_bytes_per_token_per_layer(precision.kv_bytes, precision.kv_layout),
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
        db=precision.dispatch_bytes, cb=precision.combine_bytes,
        a2a_torus=_torus_factor(acc, plan.ep * plan.expert_tp),
    )
    vals.update(_kernel_lane(model, precision, acc, plan, opt, kv_split))
    return StepParams(**{k: np.array([float(v)], dtype=np.float64) for k, v in vals.items()})
