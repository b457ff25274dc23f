"""The parametric kernel-time models, written once and used by both the fit
(:mod:`qsengine.calibration.fit`) and the runtime (:mod:`qsengine.calibration.runtime`).

Every model is a roofline with measured corrections::

    t = c0 + c1·x + smax(bytes / (BW·η_bw), flops / (F·η_f); p)

with the work (bytes, FLOPs) of each kernel computed below, including a
fitted "idle parallel width" (``n_pad``/``width_pad``/``stream_pad``) that
pads the dimension a kernel parallelises over: narrow work leaves SMs idle.

* ``BW``, ``F``: the accelerator spec's peak HBM bandwidth and dense peak
  FLOP/s for the kernel's dtype (``qsengine.specs.Accelerator``); the fitted
  ``η_bw`` and ``η_f`` are the achievable fractions of those peaks, clamped to
  (0, 1] so a prediction is never faster than the roofline at 100 % of peak.
* ``smax(a, b; p) = (a^p + b^p)^(1/p)``, a smooth maximum (p >= 1: p = 1 is
  the sum, p -> inf the plain max), always >= max(a, b). Real kernels do not
  switch sharply from bandwidth-bound to compute-bound; ``p`` measures how
  soft the ridge is.
* ``c0 >= 0``: fixed per-call time (launch, prologue/epilogue, tail effects);
  ``c1 >= 0`` times a per-kernel work count ``x`` (batch rows of attention,
  token-expert assignments of the grouped MoE GEMM): work the roofline does
  not see (routing, permutation, per-row softmax/reduction).

All terms are non-negative and non-decreasing in the work, so each model is
>= the roofline minimum and non-decreasing in every size argument.

Inputs are numpy arrays (broadcast together); no Python loop per element.
Units: bytes, FLOP, seconds.
"""

from __future__ import annotations

import numpy as np

#: Bytes per element of a GEMM/MoE operand for each measured dtype (weights;
#: block scales included: NVFP4 has one fp8 scale per 16 elements, MXFP4 one
#: e8m0 scale per 32; fp8_block one fp32 scale per 128x128 block, negligible).
WEIGHT_BYTES: dict[str, float] = {
    "bf16": 2.0, "fp8": 1.0, "fp8_block": 1.0 + 4.0 / (128 * 128),
    "nvfp4": 0.5 + 1.0 / 16, "w4a16_mxfp4": 0.5 + 1.0 / 32,
}
#: Bytes per activation element read by the GEMM for each dtype.
ACT_BYTES: dict[str, float] = {
    "bf16": 2.0, "fp8": 1.0, "fp8_block": 1.0, "nvfp4": 0.5 + 1.0 / 16, "w4a16_mxfp4": 2.0,
}
#: Which peak FLOP/s of the accelerator spec each kernel dtype runs at.
PEAK_DTYPE: dict[str, str] = {
    "bf16": "bf16", "fp8": "fp8", "fp8_block": "fp8", "nvfp4": "fp4", "w4a16_mxfp4": "bf16",
}
#: KV-cache bytes per element.
KV_BYTES: dict[str, float] = {"bf16": 2.0, "fp8": 1.0}

#: MLA latent per token: kv_lora_rank + qk_rope_head_dim (DeepSeek-V3:
#: 512 + 64, https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json).
MLA_LORA = 512
MLA_ROPE = 64


def smax(a: np.ndarray, b: np.ndarray, p: float | np.ndarray) -> np.ndarray:
    """``(a^p + b^p)^(1/p)`` for a, b >= 0, computed without overflow: ``m·(1 + (n/m)^p)^(1/p)``
    with ``m = max(a, b)``, ``n = min(a, b)``. Always >= max(a, b)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    hi = np.maximum(a, b)
    lo = np.minimum(a, b)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(hi > 0, lo / hi, 0.0)
    return hi * (1.0 + r ** p) ** (1.0 / p)


def roofline_time(nbytes: np.ndarray, flops: np.ndarray, bw: float, peak: float,
                  eta_bw: float, eta_f: float, p: float, c0: float, c1: float = 0.0,
                  x: np.ndarray | float = 0.0) -> np.ndarray:
    """``c0 + c1·x + smax(nbytes/(bw·eta_bw), flops/(peak·eta_f); p)`` (see module docstring)."""
    return c0 + c1 * np.asarray(x, dtype=np.float64) + smax(nbytes / (bw * eta_bw), flops / (peak * eta_f), p)


# ----------------------------------------------------------------- work of each kernel
def gemm_work(m: np.ndarray, n: np.ndarray, k: np.ndarray, dtype: str,
              n_pad: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(bytes, flops) of ``C[m,n] = A[m,k]·W[k,n]``: reads A (activation dtype)
    and W (weight dtype), writes C in bf16; 2·m·n·k FLOP.

    ``n_pad`` (fitted, >= 0) is idle parallel width: a decode GEMM is split
    into thread blocks along n, and a narrow matrix leaves SMs idle, as if the
    matrix were ``n + n_pad`` wide (weight, output and FLOP terms; the
    activation read is unchanged). Keeps the work >= the true work and
    non-decreasing in m, n, k."""
    m, n, k = (np.asarray(v, dtype=np.float64) for v in (m, n, k))
    ne = n + n_pad
    nbytes = m * k * ACT_BYTES[dtype] + k * ne * WEIGHT_BYTES[dtype] + 2.0 * m * ne
    return nbytes, 2.0 * m * ne * k


def grouped_gemm_work(assignments: np.ndarray, experts_local: np.ndarray, hidden: np.ndarray,
                      inter: np.ndarray, dtype: str, width_pad: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bytes, flops, touched) of one GPU's routed experts (gated FFN: up+gate
    ``hidden x 2·inter`` and down ``inter x hidden``, i.e. 3·hidden·inter weights each).

    ``assignments``: token-expert pairs this GPU computes (tokens·top_k routed
    to its experts); ``touched = min(experts_local, assignments)`` experts have
    their weights read (each assignment touches at most one new expert, and
    there are only ``experts_local``); activations in and out are
    ``assignments·hidden`` elements each way.

    ``width_pad`` (fitted, >= 0) is idle parallel width as in :func:`gemm_work`:
    the touched experts' total width ``touched·inter`` is padded to
    ``touched·inter + width_pad`` (each expert's to ``inter + width_pad/touched``),
    for weight bytes and FLOPs. Non-decreasing in every argument.
    """
    a, e, h, i = (np.asarray(v, dtype=np.float64) for v in (assignments, experts_local, hidden, inter))
    touched = np.minimum(e, a)
    with np.errstate(divide="ignore", invalid="ignore"):
        ie = np.where(touched > 0, i + width_pad / touched, i)
    nbytes = touched * 3.0 * h * ie * WEIGHT_BYTES[dtype] + a * h * (ACT_BYTES[dtype] + 2.0)
    flops = 2.0 * 3.0 * h * ie * a
    return nbytes, flops, touched


def gqa_work(batch: np.ndarray, context: np.ndarray, heads: np.ndarray, kv_heads: np.ndarray,
             head_dim: np.ndarray, kv_dtype: str, stream_pad: float = 0.0,
             split: float = np.inf) -> tuple[np.ndarray, np.ndarray]:
    """(bytes, flops) of one decode step of MHA/GQA attention on one GPU:
    reads K and V for ``context`` tokens of ``batch`` sequences
    (2·kv_heads·head_dim elements per token), Q and O in bf16; QK^T and PV are
    2·2·heads·head_dim FLOP per cached token.

    ``stream_pad`` (fitted, >= 0): the KV cache is streamed by one block per
    (sequence, KV head); with few of them SMs idle, as if there were
    ``stream_pad`` more streams (KV bytes only). Long contexts are split into
    chunks of ``split`` tokens processed in parallel (multi-block decode), so
    the idle streams cost at most ``split`` tokens each:
    ``bytes = (b·kvh·T + stream_pad·min(T, split))·2·d·b_kv + Q/O``."""
    b, t, h, kvh, d = (np.asarray(v, dtype=np.float64) for v in (batch, context, heads, kv_heads, head_dim))
    nbytes = (b * kvh * t + stream_pad * np.minimum(t, split)) * 2.0 * d * KV_BYTES[kv_dtype] + b * h * d * 2.0 * 2.0
    return nbytes, 4.0 * b * t * h * d


def mla_work(batch: np.ndarray, context: np.ndarray, heads: np.ndarray, kv_dtype: str,
             stream_pad: float = 0.0, split: float = np.inf) -> tuple[np.ndarray, np.ndarray]:
    """(bytes, flops) of one decode step of absorbed MLA on one GPU: reads the
    latent (512 + 64 elements per token, shared by all heads), QK over 576 and
    PV over 512 dimensions per head per cached token. ``stream_pad`` as in
    :func:`gqa_work`, with one latent stream per sequence."""
    b, t, h = (np.asarray(v, dtype=np.float64) for v in (batch, context, heads))
    nbytes = ((b * t + stream_pad * np.minimum(t, split)) * (MLA_LORA + MLA_ROPE) * KV_BYTES[kv_dtype]
              + b * h * (MLA_LORA + MLA_ROPE + MLA_LORA) * 2.0)
    flops = 2.0 * b * t * h * (MLA_LORA + MLA_ROPE + MLA_LORA)
    return nbytes, flops


def collective_time(nbytes: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """``min_j (alpha_j + nbytes/beta_j)`` over the last axis of ``alpha``/``beta``
    (one (latency, bandwidth) line per protocol: NCCL and the custom
    all-reduce pick a low-latency protocol for small and a bandwidth protocol
    for large messages). Bandwidths are effective bytes/s per GPU (algorithm
    factor included). Non-decreasing in ``nbytes``."""
    s = np.asarray(nbytes, dtype=np.float64)[..., None]
    return np.min(np.asarray(alpha)[..., :] + s / np.asarray(beta), axis=-1)
