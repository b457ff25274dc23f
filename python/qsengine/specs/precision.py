"""Numeric formats: bytes per weight (experts and the rest separately), per
KV-cache element and per activation element, and the compute dtype whose peak
FLOP/s applies.

Block-scaled formats carry their scale overhead in the bytes per weight:
fp8 with one fp32 scale per 128x128 block adds 4/16384 bytes per weight;
MXFP4 (4-bit values, one 8-bit scale per 32 values) is 0.5 + 1/32 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ComputeDtype = Literal["bf16", "fp8", "fp4", "int8"]

FP8_BLOCK_SCALE = 4.0 / (128 * 128)
MXFP4_BYTES = 0.5 + 1.0 / 32


@dataclass(frozen=True)
class Precision:
    """Bytes per element for each kind of tensor.

    Attributes:
        weight_bytes: non-expert weights (attention, dense FFN, embeddings...).
        expert_bytes: routed and shared expert weights.
        kv_bytes: one KV-cache element.
        activation_bytes: one activation element (all-to-all / all-reduce payload).
        compute: dtype whose dense peak FLOP/s the step model uses.
        name: label.
    """

    weight_bytes: float = 2.0
    expert_bytes: float = 2.0
    kv_bytes: float = 2.0
    activation_bytes: float = 2.0
    compute: ComputeDtype = "bf16"
    name: str = "bf16"


PRESETS: dict[str, Precision] = {
    "bf16": Precision(),
    "fp8": Precision(1.0 + FP8_BLOCK_SCALE, 1.0 + FP8_BLOCK_SCALE, 1.0, 2.0, "fp8", "fp8"),
    "fp8-kvbf16": Precision(1.0 + FP8_BLOCK_SCALE, 1.0 + FP8_BLOCK_SCALE, 2.0, 2.0, "fp8", "fp8-kvbf16"),
    "fp4": Precision(MXFP4_BYTES, MXFP4_BYTES, 1.0, 2.0, "fp4", "fp4"),
    "mxfp4-experts": Precision(2.0, MXFP4_BYTES, 2.0, 2.0, "bf16", "mxfp4-experts"),
    "int8": Precision(1.0, 1.0, 1.0, 2.0, "int8", "int8"),
}
