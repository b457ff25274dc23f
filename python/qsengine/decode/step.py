"""The decode step model: roofline time of one decode step, piece by piece.

One decode step generates one token for each of the ``batch`` sequences that a
data-parallel replica serves. Every formula is written out in ``docs/model.md``;
the code follows it piece by piece:

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

This module is the step time itself (:func:`step_time`, the one-pass model,
two-batch overlap, the speculative draft passes, :func:`decode_step`); its
parts live a concept per module: the lane parameters and options in
:mod:`qsengine.decode.params`, the kernel times (calibrated kernels, roofline,
collectives) in :mod:`qsengine.decode.kernels`, the routed-expert straggler in
:mod:`qsengine.decode.straggler`, the typed results in
:mod:`qsengine.decode.breakdown`. The public names of all four are re-exported
here (``__all__``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from qsengine.decode.breakdown import Piece, PieceArrays, StepBreakdown, StepTimes, breakdown
from qsengine.decode.kernels import (_allreduce, _attn_core, _ep_alltoall, _fitted_collective, _gemm, _link_bw,
                                     _roof, grouped_cost, kernel_dtypes)
from qsengine.decode.params import (KERNELS, MAX_DRAFT_TOKENS, OVERLAP, StepOptions, StepParams,
                                    check_speculation, step_params)
from qsengine.decode.straggler import (MoeLayerShape, _inclusion_probabilities, max_iid_normal,
                                       moe_cost_coefficients, moe_layer_shape, moe_straggler_closed_form,
                                       straggler_ceiling, straggler_closed_form)
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

#: z of the normal 0.99 quantile (p99 = mean + Z99·sd of the summed straggler).
Z99 = 2.3263478740408408


def step_time(p: StepParams, batch: np.ndarray, context: np.ndarray, *, pi: np.ndarray | None = None,
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


def _pass_time(p: StepParams, batch: np.ndarray, context: np.ndarray, *, pi: np.ndarray | None = None,
               uniform: bool = True, moe_step_time: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
               detail: bool = False) -> StepTimes:
    """One forward pass of every lane of ``p`` (see :func:`step_time`): a plain
    decode step, or for a speculative lane its verify pass (d + 1 token rows
    per sequence, weights and KV read once), two-batch overlap included; no
    draft passes, no division by the accepted tokens."""
    batch = np.asarray(batch, dtype=np.float64)
    ctx = np.asarray(context, dtype=np.float64)
    n_lanes = batch.shape[0]
    detailed: list[PieceArrays] = []
    no = np.zeros(n_lanes, dtype=bool)

    def keep(name: str, time: np.ndarray, nbytes: Any, flops: Any, count: Any, present: Any,
             bandwidth: np.ndarray | None = None, link: bool = False) -> None:
        """Record a piece (callers only call it with ``detail``: its arguments cost)."""
        def arr(x: Any) -> np.ndarray:
            return np.broadcast_to(np.asarray(x, dtype=np.float64), (n_lanes,))
        detailed.append(PieceArrays(name, arr(time), arr(nbytes), arr(flops), arr(count),
                                    np.broadcast_to(np.asarray(present, dtype=bool), (n_lanes,)),
                                    None if bandwidth is None else np.broadcast_to(bandwidth, (n_lanes,)), link))

    micro = batch / p.pp
    adp = p.attn_dp > 0
    shard = np.where(adp, 1.0, p.tp)
    # speculative verify pass (docs/model.md, "Speculative decoding"): each sequence runs its d draft tokens
    # + 1 through the model, so token rows (GEMM rows, FLOPs, activations, routed tokens) are x(d+1), while
    # weights and each sequence's KV cache are read once; x1.0 (d = 0) leaves every value bit for bit
    spec_rows = 1.0 + p.draft
    micro_rows = micro * spec_rows  # token rows of one microbatch
    seqs_kv = np.where(adp, micro / p.tp, micro)  # sequences per attention group (KV caches read)
    seqs = seqs_kv * spec_rows  # token rows per attention group
    ctx_local = np.where(p.window > 0, np.minimum(ctx, p.window), ctx)
    # kernels per lane: calibrated (kern = 1) or roofline; each is computed only if some lane needs it
    cal = p.kern > 0
    any_cal = bool(cal.any())
    all_cal = any_cal and bool(cal.all())
    roof_work = detail or not all_cal

    def pick(t_cal: np.ndarray | None, t_roof: np.ndarray | None) -> np.ndarray:
        if all_cal:
            return t_cal  # type: ignore[return-value]
        if not any_cal:
            return t_roof  # type: ignore[return-value]
        return np.where(cal, t_cal, t_roof)  # type: ignore[arg-type]

    def gemms(shapes: tuple[tuple[np.ndarray, np.ndarray], ...], m: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """Summed calibrated GEMM time of ``shapes`` (n, k) at m tokens (default seqs), and whether bandwidth
        bound them."""
        t = np.zeros(n_lanes)
        tb = np.zeros(n_lanes)
        tf = np.zeros(n_lanes)
        rows_m = seqs if m is None else m
        for n_, k_ in shapes:
            if not n_.any():
                continue
            tg, gb, gf = _gemm(p, rows_m, n_, k_)
            t = t + tg
            if detail:
                tb = tb + np.where(n_ > 0, gb, 0.0)
                tf = tf + np.where(n_ > 0, gf, 0.0)
        return t, tb >= tf

    # attention: full-context layers, then local-window layers
    norm_bytes = 2 * p.d * p.wb
    pieces = []
    proj = ((p.ap_n1, p.ap_k1), (p.ap_n2, p.ap_k2), (p.ap_n3, p.ap_k3), (p.ap_n4, p.ap_k4))
    for name, nl, c in (("attention", p.layers - p.local, ctx), ("attention (local)", p.local, ctx_local)):
        if not detail and not (nl > 0).any():
            pieces.append(np.zeros(n_lanes))
            continue
        t_r = b_r = t_c = b_c = None
        if roof_work:  # the roofline's work: its time, and the bytes/FLOPs every piece reports
            w = p.attn_params * p.wb / shard + norm_bytes
            kv = seqs_kv * c * p.kv_layer / p.kv_split
            fl = seqs * (p.attn_proj_flops + p.attn_ctx_flops * c) / shard
            t_r, b_r = _roof(w + kv, fl, p)
        if any_cal:
            # the fitted kernel streams each sequence's KV once; the d extra query rows of a verify pass add
            # their score FLOPs at the kernel's fitted compute rate (tf: one row's compute term)
            t_c, tb, tf = _attn_core(p, seqs_kv, c)
            t_c = t_c + p.draft * tf
            tf = tf * spec_rows
            t_p, _ = gemms(proj)
            t_c = t_c + t_p
            b_c = tb >= tf
        t = pick(t_c, t_r)
        pieces.append(np.where(nl > 0, t * nl, 0.0))
        if detail:
            keep(name, pieces[-1], (w + kv) * nl, fl * nl, nl, nl > 0, pick(b_c, b_r))
    # dense FFN. A dense model under attention-DP runs its FFN and LM head
    # tensor-parallel over the replica's tp GPUs, on all the replica's tokens
    dense_adp = adp & (p.moe_layers == 0)
    fshard = np.where(dense_adp, p.tp, shard)
    ftok = np.where(dense_adp, micro_rows, seqs)
    has = (p.dense_layers > 0) & (p.ffn_params > 0)
    t_r = b_r = t_c = b_c = None
    if roof_work:
        w = p.ffn_params * p.wb / fshard
        fl = 2.0 * ftok * p.ffn_params / fshard
        t_r, b_r = _roof(w, fl, p)
    if any_cal:
        # FFN width per GPU, from P = mats·d·w (+ (mats-1)·w + d with biases; Model._ffn_params)
        width = (p.ffn_params - p.ffn_bias * p.d) / (p.ffn_mats * p.d + p.ffn_bias * (p.ffn_mats - 1)) / fshard
        t_c, b_c = gemms((((p.ffn_mats - 1) * width, p.d), (np.where(width > 0, p.d, 0.0), width)), m=ftok)
    t = pick(t_c, t_r)
    pieces.append(np.where(has, t * p.dense_layers, 0.0))
    if detail:
        keep("dense ffn", pieces[-1], w * p.dense_layers, fl * p.dense_layers, p.dense_layers, has, pick(b_c, b_r))
    # MoE: router + shared experts, routed experts (straggler). Dense-only lanes
    # skip it: its pieces would be exact zeros, and x + 0.0 == x for the
    # non-negative times summed below, so the results are bit-identical.
    n_moe = p.moe_layers
    is_moe = n_moe > 0
    any_moe = detail or bool(is_moe.any())
    tokens = batch / p.pp * p.dp / p.copies * spec_rows
    moe_mean = moe_p50 = moe_p99 = None
    if any_moe:
        t_r = b_r = t_c = b_c = None
        if roof_work:
            per_layer = p.router_params * p.wb / shard + p.shared_params * p.eb / shard
            fl = 2.0 * seqs * (p.router_params + p.shared_params) / shard
            t_r, b_r = _roof(per_layer, fl, p)
        if any_cal:
            t_c, b_c = gemms(((np.where(is_moe, p.experts, 0.0), p.d), (p.sh_n, p.d),
                              (np.where(p.sh_k > 0, p.d, 0.0), p.sh_k)))
        t = pick(t_c, t_r)
        pieces.append(np.where(is_moe, t * n_moe, 0.0))
        if detail:
            keep("router + shared experts", pieces[-1], per_layer * n_moe, fl * n_moe, n_moe, is_moe,
                 pick(b_c, b_r))
        a = p.moe_a
        bcoef = p.moe_b
        fix = n_moe * p.moe_fix  # the grouped GEMM's fixed per-layer cost (0 for the roofline)
        if moe_step_time is None:
            def lanes(v: np.ndarray) -> np.ndarray:  # one plan's one-element parameters, over the lanes
                return np.broadcast_to(v, (n_lanes,))

            rows = np.flatnonzero(lanes(is_moe))
            m = np.zeros(n_lanes)
            s = np.zeros(n_lanes)
            if rows.size:
                experts = int(lanes(p.experts)[rows[0]])
                top_k = int(lanes(p.top_k)[rows[0]])
                if np.any(lanes(p.experts)[rows] != experts) or np.any(lanes(p.top_k)[rows] != top_k):
                    raise ValueError("step_time: MoE lanes disagree on experts/top_k; the closed-form straggler "
                                     "takes one routing law per call (split the lanes)")
                red = lanes(p.redundant)[rows]
                m[rows], s[rows] = straggler_closed_form(experts, top_k, tokens[rows], lanes(p.ep)[rows],
                                                         lanes(a)[rows], lanes(bcoef)[rows], None if uniform else pi,
                                                         red.astype(np.int64) if red.any() else None)
            moe_mean = np.where(is_moe, n_moe * m, 0.0)
            sd = np.sqrt(n_moe) * s
            moe_p50 = moe_mean
            # the p99 is capped like the mean (straggler_ceiling): no GPU reads more than its experts
            # (a GPU holds (E + R)/ep slots with R redundant ones)
            ceiling = n_moe * straggler_ceiling((p.experts + p.redundant) // np.maximum(p.ep, 1), p.top_k, tokens,
                                                a, bcoef)
            moe_p99 = np.where(is_moe, np.minimum(moe_mean + Z99 * sd, np.maximum(ceiling, moe_mean)), 0.0)
        else:
            moe_mean, moe_p50, moe_p99 = (np.where(is_moe, np.asarray(v, dtype=np.float64), 0.0) for v in moe_step_time)
        if any_cal:
            moe_mean, moe_p50, moe_p99 = (np.where(is_moe, v + fix, 0.0) for v in (moe_mean, moe_p50, moe_p99))
        pieces.append(moe_mean)
        if detail:
            p1 = p.top_k / p.experts
            with np.errstate(divide="ignore", invalid="ignore"):
                # slots per GPU, (E + redundant)/ep; a slot's touch probability taken as uniform routing's
                mean_u = ((p.experts + p.redundant) // p.ep) * -np.expm1(tokens * np.log1p(-np.minimum(p1, 1 - 1e-15)))
                mean_n = tokens * p.top_k / p.ep
            eb_layer = mean_u * p.expert_params * p.eb / p.etp
            fl_layer = 2.0 * mean_n * p.expert_params / p.etp
            _, bwb = _roof(eb_layer, fl_layer, p)
            bwb = pick(a * mean_u >= bcoef * mean_n, bwb)
            keep("routed experts (straggler)", moe_mean, eb_layer * n_moe, fl_layer * n_moe, n_moe, is_moe, bwb)
    # LM head
    t_r = b_r = t_c = b_c = None
    if roof_work:
        w = p.vd * p.wb / fshard
        fl = 2.0 * ftok * p.vd / fshard
        t_r, b_r = _roof(w, fl, p)
    if any_cal:  # lm_n is vocab / shard: a dense model under attention-DP splits its LM head tp ways
        t_c, b_c = gemms(((np.where(dense_adp, p.lm_n / p.tp, p.lm_n), p.d),), m=ftok)
    t = pick(t_c, t_r)
    pieces.append(t)
    if detail:
        keep("lm head", t, w, fl, 1.0, ~no, pick(b_c, b_r))

    # communication: fitted collectives inside a scale-up domain for calibrated lanes, else the link model
    comm = []
    act = seqs * p.d * p.ab
    n = 2 * p.layers
    t = _allreduce(act, p.tp, p)
    if any_cal:
        t = np.where(cal & ~np.isnan(p.ar_a1), _fitted_collective(act, p.ar_a1, p.ar_b1, p.ar_a2, p.ar_b2), t)
    comm.append(np.where(shard > 1, t * n, 0.0))
    if detail:
        keep("tp all-reduce", comm[-1], act * n, 0.0, n, shard > 1, link=True)
    # attention-DP + TP FFN (dense): before each dense FFN (and the LM head) the
    # replica's tp GPUs all-gather their sequences' activations and reduce-scatter
    # the FFN's output: the bytes of a ring all-reduce of the replica's tokens
    # plus one more collective latency
    gathered = micro_rows * p.d * p.ab
    n_adp = p.dense_layers + 1
    t = _allreduce(gathered, p.tp, p) + p.latency
    if any_cal:  # two fitted calls (reduce-scatter and all-gather), each moving half an all-reduce's bytes
        t = np.where(cal & ~np.isnan(p.ar_a1),
                     2.0 * _fitted_collective(gathered / 2.0, p.ar_a1, p.ar_b1, p.ar_a2, p.ar_b2), t)
    comm.append(np.where(dense_adp & (p.tp > 1), t * n_adp, 0.0))
    if detail:
        keep("attention-dp gather/scatter", comm[-1], gathered * n_adp, 0.0, n_adp, dense_adp & (p.tp > 1),
             link=True)
    if any_moe:
        has_ep = is_moe & (p.ep > 1)
        stage_gpus = p.dp * p.tp
        tokens_src = micro_rows * p.dp / stage_gpus
        group = p.ep * p.etp
        remote = (p.ep - 1) / p.ep
        # dispatch (tokens out, Precision.dispatch_bytes per element) and combine (expert outputs back,
        # .combine_bytes), each one all-to-all; equal formats give 2 x one of them
        sent = []
        t = 0.0
        for el in (p.db, p.cb):
            nbytes = tokens_src * p.top_k * p.d * el * remote
            t_x = _ep_alltoall(nbytes, group, p)
            if any_cal:  # NCCL all-to-all of the whole send buffer (self chunk included)
                fit = _fitted_collective(tokens_src * p.top_k * p.d * el, p.aa_a1, p.aa_b1, p.aa_a2, p.aa_b2)
                # a fit measured on a switch (NVSwitch, transferred to TPUs) is a crossbar: a torus adds its
                # bisection bound
                fit = np.where(p.a2a_torus > 0, np.maximum(fit, t_x), fit)
                t_x = np.where(cal & ~np.isnan(p.aa_a1), fit, t_x)
            t = t + t_x
            sent.append(nbytes)
        comm.append(np.where(has_ep, t * n_moe, 0.0))
        if detail:
            keep("ep all-to-all", comm[-1], (sent[0] + sent[1]) * n_moe, 0.0, n_moe, has_ep, link=True)
        has_etp = is_moe & (p.etp > 1) & ~((shard > 1) & (p.etp == p.tp) & (p.ep == 1))
        nbytes = tokens / np.maximum(p.ep, 1) * p.top_k * p.d * p.ab
        t = _allreduce(nbytes, p.etp, p)
        if any_cal:
            t = np.where(cal & ~np.isnan(p.er_a1), _fitted_collective(nbytes, p.er_a1, p.er_b1, p.er_a2, p.er_b2), t)
        comm.append(np.where(has_etp, t * n_moe, 0.0))
        if detail:
            keep("expert-tp all-reduce", comm[-1], nbytes * n_moe, 0.0, n_moe, has_etp, link=True)
    nbytes = micro_rows * p.d * p.ab
    t = (p.pp - 1) * (p.latency + nbytes / _link_bw(p, p.tp * p.pp))
    comm.append(np.where(p.pp > 1, t, 0.0))
    if detail:
        keep("pp send", comm[-1], nbytes * (p.pp - 1), 0.0, p.pp - 1, p.pp > 1, link=True)

    compute_time = pieces[0]
    for x in pieces[1:]:
        compute_time = compute_time + x
    comm_time = comm[0]
    for x in comm[1:]:
        comm_time = comm_time + x
    ov = p.overlap == 1
    time = np.where(ov, np.maximum(compute_time, comm_time), compute_time + comm_time)
    if moe_mean is None:  # dense only: no straggler, every quantile is the time
        p50, p99 = time.copy(), time.copy()
        c50 = c99 = compute_time
    else:
        det = compute_time - moe_mean
        c50, c99 = det + moe_p50, det + moe_p99
        p50 = np.where(ov, np.maximum(c50, comm_time), c50 + comm_time)
        p99 = np.where(ov, np.maximum(c99, comm_time), c99 + comm_time)
    tbo = p.overlap == 2
    if tbo.any():
        time, p50, p99 = _two_batch_overlap(p, batch, ctx, tbo, time, p50, p99, pi, uniform, moe_step_time)
    return StepTimes(time=time, p50=p50, p99=p99, tokens=np.where(is_moe, tokens, 0.0), pieces=tuple(detailed),
                     compute=compute_time, compute_p50=c50, compute_p99=c99, comm=comm_time)


def _two_batch_overlap(p: StepParams, batch: np.ndarray, ctx: np.ndarray, tbo: np.ndarray, time: np.ndarray,
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


def draft_step_time(p: StepParams, batch: np.ndarray, context: np.ndarray, *, pi: np.ndarray | None = None,
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
