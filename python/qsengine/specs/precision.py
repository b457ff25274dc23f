"""Numeric formats: bytes per weight (experts and the rest separately), per
KV-cache element and per activation element (the TP all-reduce's, and the EP
all-to-all's dispatch and combine separately), and the compute dtypes whose
peak FLOP/s apply (the experts' may be narrower than the rest's).

Block-scaled formats carry their scale overhead in the bytes per element:
fp8 weights with one fp32 scale per 128x128 block add 4/16384 bytes per weight;
fp8 activations with one fp32 scale per 128 channels (DeepEP's dispatch) 4/128;
MXFP4 (4-bit values, one 8-bit scale per 32 values) is 0.5 + 1/32 bytes;
NVFP4 (4-bit values, one fp8 scale per 16 values) 0.5 + 1/16 bytes.
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
    "mxfp4-experts": Precision(2.0, MXFP4_BYTES, 2.0, 2.0, "bf16", "mxfp4-experts"),
    "int8": Precision(1.0, 1.0, 1.0, 2.0, "int8", "int8"),
}


def as_precision(x: "Precision | str | None") -> Precision:
    """A :class:`Precision` from itself or a preset name (case-insensitive:
    ``"bf16"``, ``"fp8"``, ``"fp8-kvbf16"``, ``"fp4"``, ``"nvfp4-experts"``, ``"mxfp4-experts"``, ``"int8"``).
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
