"""Numeric formats: bytes per weight (experts and the rest separately), per
KV-cache element and per activation element (the TP all-reduce's, and the EP
all-to-all's dispatch and combine separately), and the compute dtypes whose
peak FLOP/s apply (the experts' may be narrower than the rest's).

Block-scaled formats carry their scale overhead in the bytes per element:
fp8 weights with one fp32 scale per 128x128 block add 4/16384 bytes per weight;
fp8 activations with one fp32 scale per 128 channels (DeepEP's dispatch) 4/128;
MXFP4 (4-bit values, one 8-bit scale per 32 values) is 0.5 + 1/32 bytes;
NVFP4 (4-bit values, one fp8 scale per 16 values) 0.5 + 1/16 bytes.

The KV cache's layout (``kv_layout``) says how an engine stores each cached
token: "plain" (every element at ``kv_bytes``, one per-tensor scale) or
"flashmla-fp8" (FlashMLA's "FP8 with scale" MLA cache: the latent in fp8 with
one fp32 scale per 128 elements, the RoPE key in bf16; 656 B for DeepSeek-V3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from qsengine.specs._validate import check_choice, check_float, check_str, current_source, did_you_mean, fail
from qsengine.errors import SpecError

ComputeDtype = Literal["bf16", "fp8", "fp4", "int8"]

FP8_BLOCK_SCALE = 4.0 / (128 * 128)
#: fp8 activations quantised per token in groups of 128 channels, one fp32 scale each: DeepEP's FP8 dispatch
#: (https://github.com/deepseek-ai/DeepEP, "FP8 dispatching and BF16 combining"; vLLM's DeepEP adapter:
#: "DeepEP kernels quantize dispatch inputs in 128 element chunks")
FP8_TOKEN_GROUP_BYTES = 1.0 + 4.0 / 128

#: Element size of each compute dtype, bytes.
COMPUTE_BYTES: dict[str, float] = {"bf16": 2.0, "fp8": 1.0, "int8": 1.0, "fp4": 0.5}
MXFP4_BYTES = 0.5 + 1.0 / 32
#: NVFP4: e2m1 values with one fp8 (e4m3) scale per 16 (NVIDIA, "Introducing NVFP4",
#: https://developer.nvidia.com/blog/introducing-nvfp4-for-efficient-and-accurate-low-precision-inference/)
NVFP4_BYTES = 0.5 + 1.0 / 16
#: the widest block-scale overhead a stored element may carry over its compute dtype's width: NVFP4's 1/8
#: (one 1-byte scale per 16 half-byte values)
MAX_SCALE_OVERHEAD = 1.0 / 8

#: How an engine lays out one cached token (``Precision.kv_layout``). "plain": every cached element at
#: ``kv_bytes`` (per-tensor-scaled fp8, e.g. SGLang/vLLM ``--kv-cache-dtype fp8_e4m3`` on the standard MLA
#: backends, or bf16). "flashmla-fp8": FlashMLA's "FP8 with scale" MLA cache, per token the latent in fp8
#: e4m3, one fp32 scale per 128 latent elements and the RoPE key kept in bf16 ("each token's KV cache is
#: 656 Bytes": 512 + 4·4 + 64·2 for DeepSeek's 512 + 64; https://github.com/deepseek-ai/FlashMLA README,
#: "FP8 KV Cache"; vLLM's ``fp8_ds_mla`` cache dtype, vllm/v1/attention/backends/mla/flashmla_sparse.py
#: ``get_kv_cache_shape``: "custom storage format is 656 bytes"). It describes MLA caches only: MHA/GQA
#: attention (a GQA dense twin, say) stores its K and V plain.
KvLayout = Literal["plain", "flashmla-fp8"]
KV_LAYOUTS: tuple[str, ...] = ("plain", "flashmla-fp8")
#: FlashMLA fp8 cache: latent elements per fp32 scale, bytes per scale, bytes per RoPE element (bf16)
FLASHMLA_FP8_GROUP = 128
FLASHMLA_FP8_SCALE_BYTES = 4.0
FLASHMLA_FP8_ROPE_BYTES = 2.0


def mla_kv_bytes(latent: int, rope: int, kv_bytes: float, kv_layout: str = "plain") -> float:
    """Bytes one token adds to one MLA layer's cache: ``latent`` (kv_lora_rank) + ``rope``
    (qk_rope_head_dim) elements stored as ``kv_layout`` says (:data:`KV_LAYOUTS`)::

        plain:        (latent + rope) · kv_bytes
        flashmla-fp8: latent · kv_bytes + ceil(latent / 128) · 4 + rope · 2

    (DeepSeek-V3 at fp8: 576 plain, 512 + 16 + 128 = 656 FlashMLA; a latent not a multiple of 128
    still needs a scale for its last, partial group)."""
    if kv_layout == "plain":
        return (latent + rope) * kv_bytes
    if kv_layout == "flashmla-fp8":
        groups = -(-latent // FLASHMLA_FP8_GROUP)
        return latent * kv_bytes + groups * FLASHMLA_FP8_SCALE_BYTES + rope * FLASHMLA_FP8_ROPE_BYTES
    raise fail("mla_kv_bytes", "kv_layout", kv_layout, f"must be one of {list(KV_LAYOUTS)}"
               f"{did_you_mean(str(kv_layout), KV_LAYOUTS)}")


@dataclass(frozen=True)
class Precision:
    """Bytes per element for each kind of tensor.

    Attributes:
        weight_bytes: non-expert weights (attention, dense FFN, embeddings...).
        expert_bytes: routed and shared expert weights.
        kv_bytes: one KV-cache element.
        activation_bytes: one activation element of the TP all-reduce, the
            attention-DP gather and the pipeline sends.
        compute: dtype whose dense peak FLOP/s the step model uses.
        name: label.
        dispatch_bytes: one element of the EP all-to-all's dispatch (tokens
            to their experts); None: ``activation_bytes``.
        combine_bytes: one element of the EP all-to-all's combine (expert
            outputs back); None: ``activation_bytes``.
        expert_compute: dtype of the routed experts' grouped GEMMs; None:
            ``compute``.
        kv_layout: how a cached token is stored (:data:`KV_LAYOUTS`):
            ``"plain"`` (every element at ``kv_bytes``) or ``"flashmla-fp8"``
            (MLA only: fp8 latent + fp32 scale per 128 + bf16 RoPE key;
            needs ``kv_bytes`` = 1; :func:`mla_kv_bytes`).
    """

    weight_bytes: float = 2.0
    expert_bytes: float = 2.0
    kv_bytes: float = 2.0
    activation_bytes: float = 2.0
    compute: ComputeDtype = "bf16"
    name: str = "bf16"
    dispatch_bytes: float | None = None
    combine_bytes: float | None = None
    expert_compute: ComputeDtype | None = None
    kv_layout: KvLayout = "plain"

    def __post_init__(self) -> None:
        src = current_source(f"Precision {self.name!r}" if isinstance(self.name, str) else "Precision")
        for f in ("weight_bytes", "expert_bytes", "kv_bytes", "activation_bytes"):
            check_float(src, f, getattr(self, f), maximum=8.0)
        check_choice(src, "compute", self.compute, COMPUTE_BYTES)
        check_str(src, "name", self.name)
        # the EP all-to-all's formats default to the activations' (frozen: set through object.__setattr__)
        for f in ("dispatch_bytes", "combine_bytes"):
            if getattr(self, f) is None:
                object.__setattr__(self, f, self.activation_bytes)
            check_float(src, f, getattr(self, f), maximum=8.0)
        if self.expert_compute is None:
            object.__setattr__(self, "expert_compute", self.compute)
        check_choice(src, "expert_compute", self.expert_compute, COMPUTE_BYTES)
        check_choice(src, "kv_layout", self.kv_layout, KV_LAYOUTS)
        if self.kv_layout == "flashmla-fp8" and self.kv_bytes != 1.0:
            raise fail(src, "kv_layout", self.kv_layout, f"stores an fp8 (1 B) latent: needs kv_bytes = 1, "
                       f"got kv_bytes = {self.kv_bytes:g}")
        # A matmul in a compute dtype reads weights stored at most that wide (plus
        # block-scale overhead, up to MAX_SCALE_OVERHEAD of the element: NVFP4's): bf16
        # weights with fp8 compute would be an inconsistent pair of dtypes. Narrower
        # storage than compute (weight-only quantisation, e.g. MXFP4 experts with bf16
        # compute) is fine. The routed experts run in ``expert_compute``.
        for f, dt in (("weight_bytes", self.compute), ("expert_bytes", self.expert_compute)):
            cap = COMPUTE_BYTES[dt] * (1.0 + MAX_SCALE_OVERHEAD)
            v = getattr(self, f)
            if v > cap:
                field = "compute" if f == "weight_bytes" else "expert_compute"
                raise fail(src, f, v, f"is wider than {field} dtype {dt!r} "
                           f"({COMPUTE_BYTES[dt]} B + block scales <= {cap:g} B); inconsistent dtypes")


#: Deployed formats. The EP all-to-all as engines run it: block-scaled fp8 models dispatch fp8 tokens (one
#: fp32 scale per 128 channels) and combine in bf16 (DeepEP, https://github.com/deepseek-ai/DeepEP: "FP8
#: dispatching and BF16 combining", its low-latency and normal kernels; SGLang and vLLM run DeepSeek's EP
#: through it; AMD's MORI-EP, https://github.com/ROCm/mori, benchmarks the same convention). NVFP4 models
#: dispatch NVFP4 (TensorRT-LLM's fused MoE quantises before its all-to-all, ``TRTLLM_MOE_POST_QUANT_ALLTOALLV``
#: on by default, tensorrt_llm/_torch/modules/fused_moe/) and combine in bf16 (its low-precision combine is
#: off by default, ``use_low_precision_moe_combine``). Weight-only formats (mxfp4-experts) and int8 move bf16.
PRESETS: dict[str, Precision] = {
    "bf16": Precision(),
    "fp8": Precision(1.0 + FP8_BLOCK_SCALE, 1.0 + FP8_BLOCK_SCALE, 1.0, 2.0, "fp8", "fp8",
                     dispatch_bytes=FP8_TOKEN_GROUP_BYTES, combine_bytes=2.0),
    "fp8-kvbf16": Precision(1.0 + FP8_BLOCK_SCALE, 1.0 + FP8_BLOCK_SCALE, 2.0, 2.0, "fp8", "fp8-kvbf16",
                            dispatch_bytes=FP8_TOKEN_GROUP_BYTES, combine_bytes=2.0),
    "fp4": Precision(MXFP4_BYTES, MXFP4_BYTES, 1.0, 2.0, "fp4", "fp4", dispatch_bytes=NVFP4_BYTES,
                     combine_bytes=2.0),
    # NVFP4 routed experts (grouped GEMMs at fp4 peak), fp8 block-scaled everything else: NVIDIA ModelOpt's
    # "routed-expert NVFP4 quantization" of DeepSeek V4 (https://github.com/NVIDIA/TensorRT-Model-Optimizer,
    # examples/deepseek/README.md), whose own release pairs fp8 attention with 4-bit experts
    "nvfp4-experts": Precision(1.0 + FP8_BLOCK_SCALE, NVFP4_BYTES, 1.0, 2.0, "fp8", "nvfp4-experts",
                               dispatch_bytes=NVFP4_BYTES, combine_bytes=2.0, expert_compute="fp4"),
    # the fp8 preset with FlashMLA's fp8 MLA cache (656 B/token/layer for DeepSeek-V3 instead of 576): vLLM's
    # ``fp8_ds_mla`` (FlashMLA sparse backend, DeepSeek-V3.2) and FlashMLA's ``is_fp8_kvcache``
    "fp8-flashmla": Precision(1.0 + FP8_BLOCK_SCALE, 1.0 + FP8_BLOCK_SCALE, 1.0, 2.0, "fp8", "fp8-flashmla",
                              dispatch_bytes=FP8_TOKEN_GROUP_BYTES, combine_bytes=2.0, kv_layout="flashmla-fp8"),
    "mxfp4-experts": Precision(2.0, MXFP4_BYTES, 2.0, 2.0, "bf16", "mxfp4-experts"),
    "int8": Precision(1.0, 1.0, 1.0, 2.0, "int8", "int8"),
}


def as_precision(x: "Precision | str | None") -> Precision:
    """A :class:`Precision` from itself or a preset name (case-insensitive:
    ``"bf16"``, ``"fp8"``, ``"fp8-kvbf16"``, ``"fp8-flashmla"``, ``"fp4"``, ``"nvfp4-experts"``,
    ``"mxfp4-experts"``, ``"int8"``).
    ``None`` means the default, bf16 everywhere."""
    if x is None:
        return PRESETS["bf16"]
    if isinstance(x, Precision):
        return x
    if not isinstance(x, str):
        raise TypeError(f"precision: must be a Precision or a preset name, got {type(x).__name__}")
    key = x.strip().lower().replace("_", "-")
    if key not in PRESETS:
        raise SpecError(f"precision: {x!r}: unknown preset; known: {sorted(PRESETS)}{did_you_mean(key, PRESETS)}")
    return PRESETS[key]
