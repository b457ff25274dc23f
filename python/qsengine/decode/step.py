"""The decode step model: roofline time of one decode step, piece by piece.

One decode step generates one token for each of the ``batch`` sequences that a
data-parallel replica serves. Every formula is written out in ``docs/model.md``;
the core's pass (``cpp/core/step.cc``, run by ``_core.step_time``) follows it piece by
piece:

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

The step over lanes is the core's (``cpp/core/step_time.cc``: the routed
tokens, the straggler, the pass, two-batch overlap, the speculative draft
passes); this module is its typed driver (:func:`step_time`,
:func:`decode_step`); its parts live a concept per module: the lane parameters
and options in :mod:`qsengine.decode.params`, the calibrated kernels' per-lane
fits and the core's kernels over lanes in :mod:`qsengine.decode.kernels`, the
routed-expert straggler (also the core's) in :mod:`qsengine.decode.straggler`, the typed results in
:mod:`qsengine.decode.breakdown`. The public names of all four are re-exported
here (``__all__``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from qsengine.decode.breakdown import Piece, PieceArrays, StepBreakdown, StepTimes, breakdown
from qsengine import _core
from qsengine.decode.kernels import grouped_cost, kernel_dtypes
from qsengine.decode.params import (KERNELS, MAX_DRAFT_TOKENS, OVERLAP, StepOptions, StepParams,
                                    check_speculation, step_params)
from qsengine.decode.straggler import (MoeLayerShape, _inclusion_probabilities, max_iid_normal,
                                       _slot_layouts, moe_cost_coefficients, moe_layer_shape,
                                       moe_straggler_closed_form, straggler_ceiling, straggler_closed_form)
from qsengine.specs import Accelerator, Model, Plan, Precision

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
    "routing_law",
    "accepted_tokens",
    "check_speculation",
    "MAX_DRAFT_TOKENS",
    "StepTimes",
    "PieceArrays",
    "decode_step",
]


def accepted_tokens(draft: Any, acceptance: Any) -> Any:
    """Expected tokens a sequence gains per speculative step: 1 + a + a^2 + ... + a^d
    (chain acceptance: draft i counts only if drafts 1..i-1 did; the verify pass
    always yields one token). Leviathan et al., arXiv:2211.17192, eq. (1):
    (1 - a^(d+1)) / (1 - a); d + 1 at a = 1."""
    return _core.accepted_tokens(np.asarray(draft, dtype=np.float64), np.asarray(acceptance, dtype=np.float64))


# ---------------------------------------------------------------------------
# The vectorised core. Every step time, scalar or swept, is computed by the
# core's step_time: :func:`decode_step` calls it with one-element arrays, the
# pipeline (qsengine.decode.pipeline, sides) with arrays over points x plans x
# batches (the side search calls the core's step directly, GIL released).
# ---------------------------------------------------------------------------

def routing_law(p: StepParams, pi: np.ndarray | None = None, uniform: bool = True
                ) -> tuple[int, int, np.ndarray | None, list]:
    """The closed-form straggler's routing law of the MoE lanes of ``p``, as the
    core takes it: (experts, top_k, pi, slot layouts). Experts and top-k are
    the first MoE lane's (the core refuses lanes that disagree); ``pi`` the
    inclusion probabilities (None where ``uniform`` or no lane is MoE); one slot
    layout per distinct (ep, R > 0) pair of the MoE lanes
    (:func:`~qsengine.decode.straggler._slot_layouts`)."""
    names = ("moe_layers", "experts", "top_k", "redundant", "ep")
    cols = dict(zip(names, np.broadcast_arrays(*(np.asarray(getattr(p, k)).reshape(-1) for k in names))))
    rows = np.flatnonzero(cols["moe_layers"] > 0)
    if rows.size == 0:
        return 0, 0, None, []

    def lanes(name: str) -> np.ndarray:
        return cols[name][rows]

    experts, top_k = int(lanes("experts")[0]), int(lanes("top_k")[0])
    pi = None if uniform else np.ascontiguousarray(pi, dtype=np.float64)
    red = lanes("redundant").astype(np.int64)
    layouts: list = []
    if red.any():
        layouts = _slot_layouts(experts, top_k, pi, lanes("ep").astype(np.int64), red, np.ones(rows.size, bool))
    return experts, top_k, pi, layouts


def step_time(p: StepParams, batch: np.ndarray, context: np.ndarray, *, pi: np.ndarray | None = None,
              uniform: bool = True, moe_step_time: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
              detail: bool = False, law: tuple | None = None) -> StepTimes:
    """Step time of one replica for every lane of ``p`` (see docs/model.md),
    computed by the core (``_core.step_time``, cpp/core/step_time.cc: the
    routed tokens, the straggler, the pass of cpp/core/step.cc, two-batch
    overlap and the speculative draft passes).

    ``batch`` and ``context`` are arrays over the lanes. The routed-expert
    straggler comes from ``moe_step_time`` (mean, p50, p99 arrays from the
    Monte Carlo, without the grouped GEMM's fixed term, which the core adds;
    for two-batch-overlap lanes the straggler of one half-batch microbatch)
    or, if None, from the closed form (``pi`` = inclusion probabilities,
    ``uniform`` when None), which takes one routing law per call: MoE lanes
    must agree on experts and top-k (ValueError otherwise). ``law``: the
    routing law as :func:`routing_law` gives it, when the caller has it.

    Two-batch-overlap lanes (``overlap`` = "tbo"): two half-batch microbatches
    alternate compute C and communication M, T = 2·max(C, M) + min(C, M)/L
    (docs/model.md, "Overlap"). Speculative lanes (``p.draft`` = d > 0;
    docs/model.md, "Speculative decoding"): the step is one verify pass of
    d + 1 token rows per sequence (``moe_step_time`` is its straggler) plus d
    passes of the one-block draft module (closed-form straggler with ``pi``)
    with its MTP projection, and every time, quantile and piece is per
    accepted token: divided by 1 + a + ... + a^d (:func:`accepted_tokens`).
    With ``detail`` the pieces follow the core's ``STEP_PIECES``; the draft
    passes' (``"draft: <piece>"``, d passes summed) only when a lane speculates.
    """
    batch = np.ascontiguousarray(batch, dtype=np.float64)
    ctx = np.ascontiguousarray(context, dtype=np.float64)
    experts, top_k, law_pi, layouts = routing_law(p, pi, uniform) if law is None else law
    mst: tuple = (None, None, None)
    if moe_step_time is not None:
        mst = tuple(np.ascontiguousarray(np.broadcast_to(np.asarray(v, dtype=np.float64), batch.shape))
                    for v in moe_step_time)
    r = _core.step_time(p.columns(), batch, ctx, experts, top_k, law_pi, layouts, *mst, detail)
    pieces: tuple[PieceArrays, ...] = ()
    if detail:
        spec = bool((np.asarray(p.draft) > 0).any())
        pieces = tuple(PieceArrays(name, r["piece_time"][j], r["piece_bytes"][j], r["piece_flops"][j],
                                   r["piece_count"][j], r["piece_present"][j],
                                   None if link else r["piece_bandwidth_bound"][j], link)
                       for j, (name, link) in enumerate(zip(_core.STEP_PIECES, _core.STEP_LINK_PIECES))
                       if spec or not name.startswith("draft: "))
    return StepTimes(time=r["time"], p50=r["p50"], p99=r["p99"], tokens=r["tokens"], pieces=pieces)


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
