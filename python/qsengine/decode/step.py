"""The decode step model: roofline time of one decode step, piece by piece.

One decode step generates one token for each of the ``batch`` sequences that a
data-parallel replica serves. Every formula is written out in ``docs/model.md``;
the core's pass (``cpp/core/step.cc``, ``_core.step_pass``) follows it piece by
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

This module drives it (:func:`step_time`: the routed straggler added to the
core's one-pass model, two-batch overlap, the speculative draft passes;
:func:`decode_step`); its parts live a concept per module: the lane parameters
and options in :mod:`qsengine.decode.params`, the calibrated kernels' per-lane
fits and the core's kernels over lanes in :mod:`qsengine.decode.kernels`, the
routed-expert straggler (also the core's) in :mod:`qsengine.decode.straggler`, the typed results in
:mod:`qsengine.decode.breakdown`. The public names of all four are re-exported
here (``__all__``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from qsengine.decode.breakdown import Piece, PieceArrays, StepBreakdown, StepTimes, breakdown
from qsengine import _core
from qsengine.decode.kernels import _gemm, _roof, grouped_cost, kernel_dtypes
from qsengine.decode.params import (KERNELS, MAX_DRAFT_TOKENS, OVERLAP, StepLanes, StepOptions, StepParams,
                                    check_speculation, step_params)
from qsengine.decode.straggler import (MoeLayerShape, _inclusion_probabilities, max_iid_normal,
                                       moe_cost_coefficients, moe_layer_shape, moe_straggler_closed_form,
                                       routed_tokens, straggler_ceiling, straggler_closed_form, straggler_quantiles)
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
    "draft_step_time",
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
    d = np.asarray(draft, dtype=np.float64)
    a = np.asarray(acceptance, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(a >= 1.0, d + 1.0, (1.0 - a ** (d + 1.0)) / (1.0 - a))


# ---------------------------------------------------------------------------
# The vectorised core. Every step time, scalar or swept, is computed here:
# :func:`decode_step` calls it with one-element arrays, the closed-form fast
# pipeline (qsengine.decode.pipeline) with arrays over points x plans x batches.
# ---------------------------------------------------------------------------

def step_time(p: StepLanes, batch: np.ndarray, context: np.ndarray, *, pi: np.ndarray | None = None,
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


def _pass_time(p: StepLanes, batch: np.ndarray, context: np.ndarray, *, pi: np.ndarray | None = None,
               uniform: bool = True, moe_step_time: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
               detail: bool = False) -> StepTimes:
    """One forward pass of every lane of ``p`` (see :func:`step_time`): a plain
    decode step, or for a speculative lane its verify pass (d + 1 token rows
    per sequence, weights and KV read once), two-batch overlap included; no
    draft passes, no division by the accepted tokens.

    The pieces (attention, dense FFN, router + shared experts, LM head, the
    collectives) are the core's pass (``qsengine._core.step_pass``, one home:
    cpp/core/step.cc, formulas in docs/model.md); the routed experts' straggler
    that it adds comes from here: the Monte Carlo's ``moe_step_time`` or the
    closed form (:func:`~qsengine.decode.straggler.straggler_quantiles`)."""
    batch = np.ascontiguousarray(batch, dtype=np.float64)
    ctx = np.ascontiguousarray(context, dtype=np.float64)
    n_lanes = batch.shape[0]
    is_moe = np.broadcast_to(p.moe_layers > 0, (n_lanes,))
    tokens = np.ascontiguousarray(np.broadcast_to(routed_tokens(p, batch), (n_lanes,)))
    if moe_step_time is not None:
        moe = tuple(np.where(is_moe, np.asarray(v, dtype=np.float64), 0.0) for v in moe_step_time)
    elif is_moe.any():
        moe = straggler_quantiles(p, tokens, pi=pi, uniform=uniform)
    else:
        moe = (np.zeros(n_lanes),) * 3
    cols, index, indexed = p.pass_columns()
    r = _core.step_pass(cols, batch, ctx, tokens, *(np.ascontiguousarray(v) for v in moe), detail, index, indexed)
    pieces: tuple[PieceArrays, ...] = ()
    if detail:
        pieces = tuple(PieceArrays(name, r["piece_time"][j], r["piece_bytes"][j], r["piece_flops"][j],
                                   r["piece_count"][j], r["piece_present"][j],
                                   None if link else r["piece_bandwidth_bound"][j], link)
                       for j, (name, link) in enumerate(zip(_core.STEP_PIECES, _core.STEP_LINK_PIECES)))
    time, p50, p99 = r["time"], r["p50"], r["p99"]
    tbo = p.overlap == 2
    if tbo.any():
        time, p50, p99 = _two_batch_overlap(p, batch, ctx, tbo, time, p50, p99, pi, uniform, moe_step_time)
    return StepTimes(time=time, p50=p50, p99=p99, tokens=np.where(is_moe, tokens, 0.0), pieces=pieces,
                     compute=r["compute"], compute_p50=r["compute_p50"], compute_p99=r["compute_p99"],
                     comm=r["comm"])


def _two_batch_overlap(p: StepLanes, batch: np.ndarray, ctx: np.ndarray, tbo: np.ndarray, time: np.ndarray,
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


def draft_step_time(p: StepLanes, batch: np.ndarray, context: np.ndarray, *, pi: np.ndarray | None = None,
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
