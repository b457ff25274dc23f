"""The step model's typed results.

Over lanes: :class:`StepTimes` (what :func:`qsengine.decode.step.step_time`
returns) and its :class:`PieceArrays` (one term of the step time); for one
lane: :class:`StepBreakdown` of :class:`Piece` (what
:func:`qsengine.decode.step.decode_step` returns), taken from a detailed
result by :func:`breakdown`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Bound = Literal["bandwidth", "compute", "link", "-"]

__all__ = ["Bound", "Piece", "StepBreakdown", "PieceArrays", "StepTimes", "breakdown"]


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


def breakdown(r: StepTimes, i: int, batch: int, context: float) -> StepBreakdown:
    """Lane ``i`` of a detailed :func:`step_time` result as a StepBreakdown
    (the pieces present for that lane, in step order)."""
    pieces = tuple(Piece(pa.name, float(pa.time[i]), float(pa.bytes[i]), float(pa.flops[i]), pa.bound(i),
                         int(pa.count[i])) for pa in r.pieces if bool(pa.present[i]))
    return StepBreakdown(batch=int(batch), context=float(context), pieces=pieces, time=float(r.time[i]),
                         time_p50=float(r.p50[i]), time_p99=float(r.p99[i]), moe_tokens=float(r.tokens[i]))
