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

from qsengine.specs._validate import check_choice, check_float, check_str, current_source, did_you_mean, fail
from qsengine.errors import SpecError

ComputeDtype = Literal["bf16", "fp8", "fp4", "int8"]

FP8_BLOCK_SCALE = 4.0 / (128 * 128)

#: Element size of each compute dtype, bytes.
COMPUTE_BYTES: dict[str, float] = {"bf16": 2.0, "fp8": 1.0, "int8": 1.0, "fp4": 0.5}
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

    def __post_init__(self) -> None:
        src = current_source(f"Precision {self.name!r}" if isinstance(self.name, str) else "Precision")
        for f in ("weight_bytes", "expert_bytes", "kv_bytes", "activation_bytes"):
            check_float(src, f, getattr(self, f), maximum=8.0)
        check_choice(src, "compute", self.compute, COMPUTE_BYTES)
        check_str(src, "name", self.name)
        # A matmul in `compute` reads weights stored at most that wide (plus
        # block-scale overhead, up to 1/16 of the element): bf16 weights with
        # fp8 compute would be an inconsistent pair of dtypes. Narrower storage
        # than compute (weight-only quantisation, e.g. MXFP4 experts with bf16
        # compute) is fine.
        cap = COMPUTE_BYTES[self.compute] * (1.0 + 1.0 / 16)
        for f in ("weight_bytes", "expert_bytes"):
            v = getattr(self, f)
            if v > cap:
                raise fail(src, f, v, f"is wider than compute dtype {self.compute!r} "
                           f"({COMPUTE_BYTES[self.compute]} B + block scales <= {cap:g} B); inconsistent dtypes")


PRESETS: dict[str, Precision] = {
    "bf16": Precision(),
    "fp8": Precision(1.0 + FP8_BLOCK_SCALE, 1.0 + FP8_BLOCK_SCALE, 1.0, 2.0, "fp8", "fp8"),
    "fp8-kvbf16": Precision(1.0 + FP8_BLOCK_SCALE, 1.0 + FP8_BLOCK_SCALE, 2.0, 2.0, "fp8", "fp8-kvbf16"),
    "fp4": Precision(MXFP4_BYTES, MXFP4_BYTES, 1.0, 2.0, "fp4", "fp4"),
    "mxfp4-experts": Precision(2.0, MXFP4_BYTES, 2.0, 2.0, "bf16", "mxfp4-experts"),
    "int8": Precision(1.0, 1.0, 1.0, 2.0, "int8", "int8"),
}


def as_precision(x: "Precision | str | None") -> Precision:
    """A :class:`Precision` from itself or a preset name (case-insensitive:
    ``"bf16"``, ``"fp8"``, ``"fp8-kvbf16"``, ``"fp4"``, ``"mxfp4-experts"``, ``"int8"``).
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
