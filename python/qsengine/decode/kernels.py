"""Kernel times of the step model: calibrated kernels, rooflines and collectives.

Per lane (once, when :func:`qsengine.decode.params.step_params` builds it):
the calibration dtype of each kernel family (:func:`kernel_dtypes`), the
fitted GEMM / decode-attention / grouped-GEMM / collective parameters and the
per-GPU GEMM shapes (:func:`_kernel_lane`), the routed experts' cost
(:func:`grouped_cost`). Over lanes, for the prefill model and the draft
module, the core's kernels (cpp/core/step.cc, where the decode pass computes
them too): the roofline (:func:`_roof`), the link model of a collective
(:func:`_link_bw`, :func:`_allreduce`, :func:`_ep_alltoall`) and the
calibrated GEMM (:func:`_gemm`). The EP
all-to-all on a torus (TPU ICI): :func:`torus_shape`,
:func:`torus_alltoall_factor`. Formulas: ``docs/model.md`` ("Calibrated
kernels", "Torus all-to-all").
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from qsengine import _core
from qsengine.specs import Accelerator, Model, Plan, Precision

if TYPE_CHECKING:
    from qsengine.decode.params import StepOptions, StepParams

__all__ = ["grouped_coefficients", "grouped_cost", "kernel_dtypes", "torus_alltoall_factor", "torus_shape"]


# --------------------------------------------------------- calibrated kernels
def kernel_dtypes(precision: Precision) -> dict[str, str | None]:
    """The calibration dtype of each kernel family for ``precision`` (None: no
    measured kernel runs it; that family falls back to the roofline at the
    accelerator's spec efficiencies). fp8 weights are block-scaled (DeepSeek's
    128x128 fp32 scales, ``Precision.weight_bytes`` = 1 + 4/16384), so their
    GEMMs are ``fp8_block``; fp4 is ``nvfp4``; bf16 compute over 4-bit experts
    is ``w4a16_mxfp4``; the KV cache is ``bf16`` (2 B) or ``fp8`` (1 B). The
    grouped (routed-expert) GEMMs follow ``Precision.expert_compute``, the
    other GEMMs ``Precision.compute``."""
    c = precision.compute
    gemm = {"bf16": "bf16", "fp8": "fp8_block", "fp4": "nvfp4"}.get(c)
    if c == "bf16" and precision.weight_bytes != 2.0:
        gemm = None
    ec = precision.expert_compute  # the routed experts' own compute dtype (nvfp4 experts under fp8 elsewhere)
    if ec == "bf16":
        grouped = "bf16" if precision.expert_bytes == 2.0 else ("w4a16_mxfp4" if precision.expert_bytes < 1 else None)
    else:
        grouped = {"fp8": "fp8_block", "fp4": "nvfp4"}.get(ec)  # type: ignore[arg-type]
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
        b = 2.0 * model.expert_params / etp / (acc.peak_flops(precision.expert_compute) * acc.flops_efficiency)
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
    # bytes per cached element as the precision's KV layout stores them (FlashMLA fp8: 656/576 of fp8's 1 B, the
    # fp8 fit's efficiencies kept: the kernel streams the cache's bytes, docs/model.md "KV cache per token")
    kvb = precision.kv_bytes if precision.kv_layout == "plain" else (
        model.kv_bytes_per_token_per_layer(precision.kv_bytes, precision.kv_layout) / att.kv_elements_per_token())
    out.update(at_kvb=kvb, at_h=heads, at_kvh=kvh, at_el=el, at_qo=qo, at_fl=flo,
               pf_core_f=acc.peak_flops("bf16") * acc.flops_efficiency)
    # routed experts
    if model.is_moe:
        if opt.kernels == "calibrated":
            ma, mb, mf = grouped_cost(model, precision, acc, plan)
        else:
            ma = model.expert_params * precision.expert_bytes / plan.expert_tp / (
                acc.hbm_bandwidth * acc.bandwidth_efficiency)
            mb = 2.0 * model.expert_params / plan.expert_tp / (
                acc.peak_flops(precision.expert_compute) * acc.flops_efficiency)
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


# ------------------------------------------------------ kernel times over lanes
# The kernels themselves are the core's (cpp/core/step.cc, the one home of the step model's arithmetic): these
# wrappers evaluate one of them over lanes for the Python layer's prefill model and draft module.
def _kernel(kind: str, p: StepParams, x: Any, y: Any = 0.0, z: Any = 0.0
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(value, bandwidth term, compute term) of the core's kernel ``kind`` over lanes (``_core.step_kernel``)."""
    def arr(v: Any) -> np.ndarray:
        return np.ascontiguousarray(np.atleast_1d(np.asarray(v, dtype=np.float64)))

    return _core.step_kernel(kind, p.columns(), arr(x), arr(y), arr(z))


def _roof(nbytes: np.ndarray, flops: np.ndarray, p: StepParams) -> tuple[np.ndarray, np.ndarray]:
    """Roofline time and whether bandwidth bound it (t_bw >= t_flops)."""
    t, tb, tf = _kernel("roof", p, nbytes, flops)
    return t, tb >= tf


def _link_bw(p: StepParams, group: np.ndarray) -> np.ndarray:
    """Per-GPU bandwidth (bytes/s) of a collective over ``group`` GPUs."""
    return _kernel("link_bandwidth", p, group)[0]


def _ep_alltoall(nbytes: np.ndarray, group: np.ndarray, p: StepParams) -> np.ndarray:
    """One EP all-to-all (dispatch or combine) by the link model: each GPU of
    ``group`` sends ``nbytes`` to the others; the share of destinations beyond
    the scale-up domain goes over the network, the rest over the scale-up
    links, on a torus slowed by the lane's bisection factor ``a2a_torus``
    (:func:`torus_alltoall_factor`; 0 on a switch, so the time is the
    crossbar's): ``latency + max(in·max(1, f)/scaleup, out/internode)``."""
    return _kernel("ep_alltoall", p, nbytes, group)[0]


def _allreduce(nbytes: np.ndarray, group: np.ndarray, p: StepParams) -> np.ndarray:
    """Ring all-reduce of ``nbytes`` per GPU over ``group`` GPUs (0 for one GPU)."""
    return _kernel("allreduce", p, nbytes, group)[0]


def _gemm(p: StepParams, m: np.ndarray, n: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Calibrated GEMM ``[m,k] x [k,n]`` on one GPU (qsengine.calibration.gemm_time): (time, bandwidth term,
    compute term); time 0 where ``n == 0`` (no such GEMM)."""
    return _kernel("gemm", p, m, n, k)


def _attn_core(p: StepParams, seqs: np.ndarray, ctx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Calibrated decode attention core of one layer on one GPU
    (qsengine.calibration.attention_time, gqa/mha/mla): (time, bandwidth term, compute term)."""
    return _kernel("attention_core", p, seqs, ctx)


def _fitted_collective(kind: str, nbytes: np.ndarray, p: StepParams) -> np.ndarray:
    """A fitted collective of ``nbytes`` (``kind``: "allreduce_fit", "alltoall_fit" or
    "expert_allreduce_fit"): ``min_j (alpha_j + S/beta_j)`` over the two fitted protocols (nan where not fitted)."""
    return _kernel(kind, p, nbytes)[0]


def _divisors(n: int) -> list[int]:
    small = [k for k in range(1, math.isqrt(n) + 1) if n % k == 0]
    return sorted(set(small + [n // k for k in small]))


@lru_cache(maxsize=None)
def _balanced(n: int, dims: int, cap: int) -> tuple[int, ...] | None:
    """The lexicographically smallest descending factorisation of ``n`` into
    ``dims`` sides, each <= ``cap`` (None if there is none)."""
    if dims == 1:
        return (n,) if n <= cap else None
    for k in _divisors(n):  # ascending: the first feasible largest side is the smallest
        if k > cap:
            break
        if k ** dims < n:  # the largest side is at least the dims-th root
            continue
        rest = _balanced(n // k, dims - 1, k)
        if rest is not None:
            return (k,) + rest
    return None


def torus_shape(chips: int, dims: int) -> tuple[int, ...]:
    """The sides (descending) of a slice of ``chips`` chips on a ``dims``-dimensional
    torus: the factorisation into ``dims`` integers with the smallest longest side,
    as close to a cube as the count allows (64 in 3D: (4, 4, 4); 32: (4, 4, 2);
    256 in 2D: (16, 16); 12 in 2D: (4, 3); a prime p: (p, 1, ...)). These are
    the shapes Google ships (TPU v5p 2x2x2, 2x4x4, 4x4x4, 4x4x8; v6e 4x4, 8x8,
    16x16: https://docs.cloud.google.com/tpu/docs/v5p, /v6e)."""
    if chips < 1 or dims < 1:
        raise ValueError(f"torus_shape: chips = {chips}, dims = {dims}: both must be >= 1")
    shape = _balanced(int(chips), int(dims), int(chips))
    assert shape is not None  # (chips, 1, ..., 1) always fits
    return shape


def torus_alltoall_factor(chips: int, dims: int, wraparound: bool = True) -> float:
    """Bisection-bound time of a uniform all-to-all over the ``chips`` chips of a
    torus slice (:func:`torus_shape`), over the crossbar time of the same bytes
    (docs/model.md "Torus all-to-all"). Each chip sends R bytes, s = R/(g − 1)
    to each other chip; the crossbar moves them in R/W (W the chip's one-way
    scale-up bandwidth); on the torus each chip has 2·D links of W/(2D) one way.
    Cutting the slice across its longest side k into halves of ⌊k/2⌋ and ⌈k/2⌉
    planes of g/k chips, ⌊k²/4⌋·(g/k)²·s bytes cross each way over c·g/k links
    (c = 2 with wraparound, 1 without; Dally & Towles, "Principles and Practices
    of Interconnection Networks", 2004, ch. 3: the bisection bound; ch. 5: tori),
    so::

        factor = bisection time / crossbar time = 2D·g·⌊k²/4⌋ / (c·k·(g − 1))

    Dimension-ordered routing that splits the ties at distance k/2 evenly reaches
    the bound exactly (tests/test_torus.py routes every pair). 1.0 for one chip."""
    g = int(chips)
    if g <= 1:
        return 1.0
    k = torus_shape(g, dims)[0]
    c = 2 if wraparound else 1
    return 2.0 * dims * g * (k * k // 4) / (c * k * (g - 1))
