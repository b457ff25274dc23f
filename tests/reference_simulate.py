"""A slow, obvious reference for closed-form comparison points (test-only).

Each side: for every valid plan, ``pack`` gives the admissible batch (per
GPU under attention data-parallelism, so the replica holds ``tp`` times it);
the largest batch meeting the TPOT target is found by bisection on
``decode_step``; the plan with the highest throughput wins, earlier plans
winning ties within 1e-12. The break-even q* bisects on q, one ``dense_twin``
and one side evaluation per probe. Nothing here is vectorised or cached: it is
what the pipeline (qsengine.decode.pipeline) computes, written the plain way.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from qsengine.calibration import runtime as kernels
from qsengine.calibration.models import roofline_time
from qsengine.decode.point import DEFAULT_SLO_TPOT
from qsengine.decode.step import StepOptions, decode_step, moe_straggler_closed_form, step_params, step_time
from qsengine.decode.straggler import _inclusion_probabilities
from qsengine.packing import pack
from qsengine.packing import plans as enumerate_plans
from qsengine.routing import independent_popularity
from qsengine.specs import Cluster, Model, Plan, Precision
from qsengine.specs.loaders import as_cluster, as_model, as_precision, default_precision
from qsengine.specs.serving import serving_policy
from qsengine.specs.twin import qs as qs_record

TIE = 1e-3
Z99 = 2.3263478740408408  # normal 0.99 quantile


# ---------------------------------------------------------------------------
# The calibrated step, scalar and piece by piece: every kernel through
# qsengine.calibration.runtime at its true per-GPU shape (independent of the
# vectorised code in qsengine.decode.step; only the closed-form straggler's
# normal approximation is shared).
# ---------------------------------------------------------------------------


def _slices(n: int, dims: int) -> list[tuple[int, ...]]:
    """Every ordered way to write n as a product of ``dims`` positive sides."""
    if dims == 1:
        return [(n,)]
    return [(k,) + rest for k in range(1, n + 1) if n % k == 0 for rest in _slices(n // k, dims - 1)]


def scaleup_share_seconds(acc: Any, group: int, sent: float) -> float:
    """Seconds for every chip of an all-to-all group to send ``sent`` bytes,
    spread evenly over the group's other chips, over the scale-up links. A
    switch: the chip's one-way bandwidth W. A torus (TPU ICI) is no faster than
    its bisection: the group sits on the slice of min(group, domain) chips whose
    longest side k is the shortest possible (all factorisations tried); cutting
    it across that side leaves floor(k/2) and ceil(k/2) planes of g/k chips; all
    bytes between the halves cross the cut's links (g/k per cut plane, two planes
    with wraparound), each of W/(2D) one way."""
    w = acc.scaleup_bandwidth * acc.link_efficiency
    crossbar = sent / w
    if acc.scaleup_topology != "torus":
        return crossbar
    g, dims = min(group, acc.scaleup_domain), acc.torus_dims
    k = min(max(sh) for sh in _slices(g, dims))
    plane = g // k
    half_a, half_b = (k // 2) * plane, (k - k // 2) * plane
    crossing = half_a * half_b * sent / (g - 1)  # bytes from one half to the other
    wraps = acc.torus_wraparound is None or g >= acc.torus_wraparound
    links = plane * (2 if wraps else 1)
    return max(crossbar, crossing / (links * w / (2 * dims)))


class Step:
    """What the reference reads of a step: mean and p99 TPOT."""

    def __init__(self, batch: float, time: float, p99: float) -> None:
        self.time, self.time_p99 = time, p99
        self.tokens_per_second = batch / time


def _dtypes(prec: Precision) -> tuple[str | None, str | None, str | None]:
    """(GEMM, grouped GEMM, KV) calibration dtypes of a precision (docs/model.md)."""
    names = {"fp8": "fp8_block", "fp4": "nvfp4"}
    gemm = names.get(prec.compute)
    grouped = names.get(prec.expert_compute)  # the routed experts run in their own compute dtype
    if prec.compute == "bf16":
        gemm = "bf16" if prec.weight_bytes == 2 else None
    if prec.expert_compute == "bf16":
        grouped = "bf16" if prec.expert_bytes == 2 else ("w4a16_mxfp4" if prec.expert_bytes < 1 else None)
    kv = "bf16" if prec.kv_bytes == 2 else ("fp8" if prec.kv_bytes == 1 else None)
    return gemm, grouped, kv


def kv_token_layer_bytes(model: Model, prec: Precision) -> float:
    """Bytes one token adds to one layer's KV cache. FlashMLA's fp8 layout of an MLA cache (its README,
    "FP8 KV Cache": per token 512 fp8 e4m3 latent values, 4 fp32 scales -- one per 128 of them -- and 64
    bf16 RoPE values, 656 B), written here for any latent r and RoPE width e: r·1 + ceil(r/128)·4 + e·2.
    Any other cache (plain layout, or MHA/GQA attention whatever the layout): the model's elements at kv_bytes."""
    att = model.attention
    if att.kind == "mla" and prec.kv_layout == "flashmla-fp8":
        r, e = att.kv_lora_rank, att.qk_rope_head_dim
        return r * 1.0 + math.ceil(r / 128) * 4.0 + e * 2.0
    return model.kv_bytes_per_token_per_layer(prec.kv_bytes)


def gemm_seconds(acc: Any, prec: Precision, m: float, n: float, k: float) -> float:
    """One GEMM [m,k] x [k,n] on one GPU: the fitted kernel in the precision's GEMM dtype, else the
    roofline at the spec efficiencies; 0 for n = 0."""
    g_dt = _dtypes(prec)[0]
    if n <= 0:
        return 0.0
    if g_dt is not None and kernels.kernel_params(acc, "gemm", g_dt) is not None:
        return float(kernels.gemm_time(acc, g_dt, m, n, k))
    nbytes = m * k * prec.activation_bytes + k * n * prec.weight_bytes + 2 * m * n
    return max(nbytes / (acc.hbm_bandwidth * acc.bandwidth_efficiency),
               2 * m * n * k / (acc.peak_flops(prec.compute) * acc.flops_efficiency))


def projections(model: Model, plan: Plan, m: float, gemm: Any) -> float:
    """One layer's attention projections at m token rows per attention GPU: MLA's fused q_a + kv_a
    (replicated), q_b, kv_b and o; GQA's fused QKV and o."""
    att, d = model.attention, model.hidden_size
    h = att.num_heads
    shard = 1 if plan.attn_dp else plan.tp
    if att.kind == "mla":
        rope, r_kv, r_q = att.qk_rope_head_dim, att.kv_lora_rank, att.q_lora_rank or 0
        nope = att.qk_nope_head_dim if att.qk_nope_head_dim is not None else att.head_dim - rope
        return (gemm(r_q + r_kv + rope, d, m) + gemm(h * (nope + rope) / shard, r_q or d, m)
                + gemm(h * (nope + att.value_dim) / shard, r_kv, m) + gemm(d, h * att.value_dim / shard, m))
    kvh = att.num_kv_heads if plan.attn_dp else att.num_kv_heads / min(plan.tp, att.num_kv_heads)
    return (gemm(h * att.head_dim / shard + kvh * (att.head_dim + att.value_dim), d, m)
            + gemm(d, h * att.value_dim / shard, m))


def _grouped(model: Model, prec: Precision, acc: Any, plan: Plan) -> tuple[float, float, float]:
    """(a, b, fixed) of one GPU's routed experts per layer: the calibrated grouped GEMM's
    ``fixed + max(a·u, b·n)``, or the roofline where no grouped-GEMM fit exists."""
    from qsengine.calibration.models import ACT_BYTES, PEAK_DTYPE, WEIGHT_BYTES

    d = model.hidden_size
    e_dt = _dtypes(prec)[1]
    etp = plan.expert_tp
    f = None if e_dt is None else kernels.kernel_params(acc, "grouped_gemm", e_dt)
    if f is None:
        a = model.expert_params * prec.expert_bytes / etp / (acc.hbm_bandwidth * acc.bandwidth_efficiency)
        bb = 2 * model.expert_params / etp / (acc.peak_flops(prec.expert_compute) * acc.flops_efficiency)
        fixed = 0.0
    else:
        bw = acc.hbm_bandwidth * f["eta_bw"]
        fl = acc.peak_flops(PEAK_DTYPE[e_dt]) * f["eta_f"]
        one = model.expert_params / etp
        io = d * (ACT_BYTES[e_dt] + 2) / bw + f["c1"]
        a = one * WEIGHT_BYTES[e_dt] / bw + f["c_expert"] + io
        bb = 2 * one / fl + io
        col = model.expert_params / model.moe_intermediate
        fixed = f["c0"] + max(col * f["width_pad"] * WEIGHT_BYTES[e_dt] / bw, 2 * col * f["width_pad"] / fl)
    return a, bb, fixed


def calibrated_step(model: Model, prec: Precision, acc: Any, plan: Plan, batch: float, context: float,
                    pop: Any, options: StepOptions, rows: int = 1) -> Step:
    """One pass of ``batch`` sequences; ``rows`` token rows per sequence (a
    speculative verify pass: d + 1) that each pay their GEMM rows, routing
    and activations, while each sequence's KV is streamed once."""

    att = model.attention
    d = model.hidden_size
    kv_dt = _dtypes(prec)[2]
    shard = 1 if plan.attn_dp else plan.tp
    b_seq = batch / plan.pp
    seqs_kv = b_seq / plan.tp if plan.attn_dp else b_seq  # sequences whose KV an attention GPU reads
    b = b_seq * rows  # token rows of a microbatch
    seqs = seqs_kv * rows

    def fit(family: str, dtype: str | None) -> dict | None:
        return None if dtype is None else kernels.kernel_params(acc, family, dtype)

    # a dense model under attention-DP: FFN and LM head tensor-parallel over the replica's tp GPUs, on all its tokens
    dense_adp = plan.attn_dp and not model.is_moe
    fshard, ftok = (plan.tp, b) if dense_adp else (shard, seqs)

    def gemm(n: float, k: float, m: float | None = None) -> float:
        return gemm_seconds(acc, prec, seqs if m is None else m, n, k)

    # attention: projections + the decode attention core
    h = att.num_heads
    if att.kind == "mla":
        rope, r_kv = att.qk_rope_head_dim, att.kv_lora_rank
    proj = projections(model, plan, seqs, gemm)

    def core(ctx: float) -> float:
        heads = h / shard
        if att.kind == "mla":
            fam, kind, kvh_gpu = "attention_mla", "mla", 1.0
        else:
            kvh_gpu = att.num_kv_heads if plan.attn_dp else att.num_kv_heads / min(plan.tp, att.num_kv_heads)
            fam, kind = ("attention_mha" if heads == kvh_gpu else "attention_gqa"), "gqa"
        # score FLOPs of one query row per sequence
        if kind == "mla":
            flops = 2 * seqs_kv * ctx * heads * (2 * r_kv + rope)
        else:
            flops = 4 * seqs_kv * ctx * heads * att.head_dim
        f = fit(fam, kv_dt) or fit("attention_gqa", kv_dt)
        if f is not None and kind == "mla" and prec.kv_layout != "plain":
            # the fitted fp8 MLA kernel streaming the layout's bytes per cached token (FlashMLA fp8: 656, not
            # 576), Q and O in bf16: calibration.models.mla_work's bytes with the layout's token size
            tok = kv_token_layer_bytes(model, prec)
            nb = ((seqs_kv * ctx + f["stream_pad"] * min(ctx, f["split"])) * tok
                  + seqs_kv * heads * (2 * r_kv + rope) * 2.0)
            t = float(roofline_time(nb, flops, acc.hbm_bandwidth, acc.peak_flops("bf16"), f["eta_bw"], f["eta_f"],
                                    f["p"], f["c0"], f.get("c1", 0.0), seqs_kv * heads))
            return t + (rows - 1) * flops / (acc.peak_flops("bf16") * f["eta_f"])
        if f is not None:
            t = float(kernels.attention_time(acc, kind, seqs_kv, ctx, heads, kvh_gpu, att.head_dim, kv_dtype=kv_dt))
            # a verify pass's rows - 1 extra query rows: their score FLOPs at the kernel's fitted rate
            return t + (rows - 1) * flops / (acc.peak_flops("bf16") * f["eta_f"])
        if kind == "mla":
            nbytes = seqs_kv * ctx * kv_token_layer_bytes(model, prec) + seqs_kv * heads * (2 * r_kv + rope) * 2
        else:
            nbytes = seqs_kv * kvh_gpu * ctx * 2 * att.head_dim * prec.kv_bytes + seqs_kv * heads * att.head_dim * 4
        rate = acc.peak_flops("bf16") * acc.flops_efficiency
        return max(nbytes / (acc.hbm_bandwidth * acc.bandwidth_efficiency), flops / rate) + (rows - 1) * flops / rate

    local = att.local_layers
    window = att.local_window or 0
    compute = (model.decode_layers - local) * (proj + core(context))
    if local:
        compute += local * (proj + core(min(context, window) if window else context))
    # dense FFN: up (+ gate) and down
    mats = 3 if model.gated_ffn else 2
    if model.decode_dense_layers and model.dense_intermediate:
        w = model.dense_intermediate / fshard
        compute += model.decode_dense_layers * (gemm((mats - 1) * w, d, ftok) + gemm(d, w, ftok))
    # MoE: router, shared experts, routed straggler (+ the grouped GEMM's fixed term)
    n_moe = model.decode_moe_layers if model.is_moe else 0
    moe_mean = moe_p99 = 0.0
    if n_moe:
        ws = model.shared_experts * model.shared_intermediate / shard
        compute += n_moe * gemm(model.routed_experts, d)
        if ws:
            compute += n_moe * (gemm((mats - 1) * ws, d) + gemm(d, ws))
        a, bb, fixed = _grouped(model, prec, acc, plan)
        tokens = b * plan.dp / plan.expert_copies
        # the slot straggler (redundant slots) is the library's, proved against the Monte Carlo in test_slots.py
        m, sd = moe_straggler_closed_form(model.routed_experts, model.top_k, tokens, plan.ep, a, bb, pop,
                                          plan.redundant)
        per = (model.routed_experts + plan.redundant) // plan.ep
        ceiling = max(a * per, bb * tokens * min(model.top_k, per))
        moe_mean = n_moe * (m + fixed)
        moe_p99 = min(n_moe * m + Z99 * math.sqrt(n_moe) * sd, n_moe * max(ceiling, m)) + n_moe * fixed
        compute += moe_mean
    compute += gemm(model.vocab_size / fshard, d, ftok)  # LM head

    # communication: fitted collectives inside the scale-up domain, else the link model
    lat = options.collective_latency

    def link(group: int) -> float:
        return (acc.scaleup_bandwidth if group <= acc.scaleup_domain else acc.internode_bandwidth) * acc.link_efficiency

    def fitted(group: int) -> bool:
        try:
            kernels.calibration_info(acc)
        except ValueError:
            return False
        return 1 < group <= acc.scaleup_domain

    def allreduce(group: int, nbytes: float) -> float:
        if group <= 1:
            return 0.0
        if fitted(group):
            return float(kernels.allreduce_time(acc, group, nbytes))
        return lat + 2 * (group - 1) / group * nbytes / link(group)

    comm = 0.0
    if shard > 1:
        comm += 2 * model.decode_layers * allreduce(plan.tp, seqs * d * prec.activation_bytes)
    if dense_adp and plan.tp > 1:  # all-gather + reduce-scatter of the replica's tokens per dense layer and the LM head
        gathered = b * d * prec.activation_bytes
        one = (2 * float(kernels.allreduce_time(acc, plan.tp, gathered / 2)) if fitted(plan.tp)
               else allreduce(plan.tp, gathered) + lat)
        comm += (model.decode_dense_layers + 1) * one
    if n_moe and plan.ep > 1:
        group = plan.ep * plan.expert_tp
        t = 0.0
        for el in (prec.dispatch_bytes, prec.combine_bytes):  # dispatch, then combine, each in its own format
            send = b * plan.dp / (plan.dp * plan.tp) * model.top_k * d * el
            remote = send * (plan.ep - 1) / plan.ep
            out = 0.0 if group <= acc.scaleup_domain else 1 - acc.scaleup_domain / group
            t_link = lat + max(scaleup_share_seconds(acc, group, remote * (1 - out)),
                               remote * out / (acc.internode_bandwidth * acc.link_efficiency))
            one = t_link
            if fitted(group):
                one = float(kernels.alltoall_time(acc, group, send))
                if acc.scaleup_topology == "torus":  # the fit is a switch's (transferred): the torus bounds it below
                    one = max(one, t_link)
            t += one
        comm += n_moe * t
    if n_moe and plan.expert_tp > 1 and not (shard > 1 and plan.expert_tp == plan.tp and plan.ep == 1):
        tokens = b * plan.dp / plan.expert_copies
        comm += n_moe * allreduce(plan.expert_tp, tokens / plan.ep * model.top_k * d * prec.activation_bytes)
    if plan.pp > 1:
        comm += (plan.pp - 1) * (lat + b * d * prec.activation_bytes / link(plan.tp * plan.pp))
    det = compute - moe_mean
    if options.overlap == "tbo":  # two microbatches of half the batch, each one's comm behind the other's compute
        half = calibrated_step(model, prec, acc, plan, batch / 2, context, pop,
                               dataclasses.replace(options, overlap="none"), rows)
        return Step(batch, 2 * max(half.compute, half.comm) + min(half.compute, half.comm) / model.decode_layers,
                    2 * max(half.compute99, half.comm) + min(half.compute99, half.comm) / model.decode_layers)
    if options.overlap_comm or options.overlap == "full":
        st = Step(batch, max(compute, comm), max(det + moe_p99, comm))
    else:
        st = Step(batch, compute + comm, det + moe_p99 + comm)
    st.compute, st.compute99, st.comm = compute, det + moe_p99, comm
    return st


def plain_step(model: Model, prec: Precision, acc: Any, plan: Plan, batch: float, context: float, pop: Any,
               options: StepOptions) -> Any:
    """A step without speculation (roofline kernels: the library's decode_step, checked elsewhere)."""
    if options.kernels == "roofline":
        return decode_step(model, prec, acc, plan, batch, context, popularity=pop, options=options)
    return calibrated_step(model, prec, acc, plan, batch, context, pop, options)


def one_block(model: Model) -> Model:
    """The draft (MTP) module's decoder block as a model of one layer of
    ``model``'s kind: an MoE layer for an MoE model, else a dense layer; full
    attention, no encoder."""
    att = dataclasses.replace(model.attention, local_layers=0, local_window=None)
    moe = 1 if model.is_moe else 0
    return model.replace(num_layers=1, dense_layers=1 - moe, moe_layers=moe, encoder_layers=0, cross_attention=False,
                         attention=att, published_total_params=None, published_active_params=None)


def step_of(model: Model, prec: Precision, acc: Any, plan: Plan, batch: float, context: float, pop: Any,
            options: StepOptions) -> Any:
    """The step per accepted token. d = options.draft_tokens drafts: a verify
    pass of d + 1 rows per sequence (calibrated: ``rows``; roofline: a plain
    step of B(d+1) sequences whose KV bytes per element are divided by d + 1,
    so each sequence's cache is read once), plus d draft passes, each a plain
    step of the one-block model on the microbatch B/pp (no pipeline, no
    two-batch overlap) plus the 2d x d projection GEMM; the sum over
    1 + a + ... + a^d accepted tokens."""
    dr = options.draft_tokens
    plain_opts = dataclasses.replace(options, draft_tokens=0, acceptance=0.0)
    if dr == 0:
        return plain_step(model, prec, acc, plan, batch, context, pop, plain_opts)
    if options.kernels == "roofline":
        # the roofline reads only bytes per token: a layout's, as plain bytes per element, divided by d + 1
        kv_el = prec.kv_bytes if prec.kv_layout == "plain" else (
            kv_token_layer_bytes(model, prec) / model.attention.kv_elements_per_token())
        vprec = dataclasses.replace(prec, kv_bytes=kv_el / (dr + 1), kv_layout="plain")
        verify = decode_step(model, vprec, acc, plan, batch * (dr + 1), context, popularity=pop, options=plain_opts)
    else:
        verify = calibrated_step(model, prec, acc, plan, batch, context, pop, plain_opts, rows=dr + 1)
    one_opts = dataclasses.replace(plain_opts, overlap="none") if options.overlap == "tbo" else plain_opts
    micro = batch / plan.pp  # may be below one sequence (a fixed batch over pp stages)
    blk_model, blk_plan = one_block(model), dataclasses.replace(plan, pp=1)
    if options.kernels == "roofline":  # decode_step's lane without its whole-batch check
        pi = _inclusion_probabilities(pop, model.top_k) if (pop is not None and model.is_moe) else None
        r = step_time(step_params(blk_model, prec, acc, blk_plan, one_opts), np.array([micro]),
                      np.array([float(context)]), pi=pi, uniform=pi is None)
        blk = Step(micro, float(r.time[0]), float(r.p99[0]))
    else:
        blk = calibrated_step(blk_model, prec, acc, blk_plan, micro, context, pop, one_opts)
    d = model.hidden_size
    shard, seqs = (1, micro / plan.tp) if plan.attn_dp else (plan.tp, micro)
    if options.kernels == "roofline":
        proj = max(2 * d * d * prec.weight_bytes / shard / (acc.hbm_bandwidth * acc.bandwidth_efficiency),
                   2 * seqs * 2 * d * d / shard / (acc.peak_flops(prec.compute) * acc.flops_efficiency))
    elif _dtypes(prec)[0] is not None and kernels.kernel_params(acc, "gemm", _dtypes(prec)[0]) is not None:
        proj = float(kernels.gemm_time(acc, _dtypes(prec)[0], seqs, d / shard, 2 * d))
    else:  # no measured GEMM in this dtype: the GEMM roofline at the spec efficiencies
        n, k = d / shard, 2 * d
        nbytes = seqs * k * prec.activation_bytes + k * n * prec.weight_bytes + 2 * seqs * n
        proj = max(nbytes / (acc.hbm_bandwidth * acc.bandwidth_efficiency),
                   2 * seqs * n * k / (acc.peak_flops(prec.compute) * acc.flops_efficiency))
    accepted = sum(options.acceptance ** i for i in range(dr + 1))
    return Step(batch, (verify.time + dr * (blk.time + proj)) / accepted,
                (verify.time_p99 + dr * (blk.time_p99 + proj)) / accepted)


def causal_layers(model: Model, n_tok: float) -> list[tuple[int, float]]:
    """(layers, causal (query, key) pairs per layer) of a prompt of n_tok tokens: full layers
    n(n+1)/2, windowed layers W(W+1)/2 + (n - W)·W when the window W is shorter than the prompt."""
    att = model.attention
    out = []
    for layers, window in ((model.decode_layers - att.local_layers, None),
                           (att.local_layers, att.local_window if att.local_layers else None)):
        if layers == 0:
            continue
        if window is None or n_tok <= window:
            out.append((layers, n_tok * (n_tok + 1) / 2))
        else:
            out.append((layers, window * (window + 1) / 2 + (n_tok - window) * window))
    return out


def prefill_seconds(model: Model, precision: Precision, acc: Any, plan: Plan, prompt: int,
                    pop: Any, options: StepOptions) -> float:
    """Seconds of one replica per prefilled request of ``prompt`` tokens, the
    plain way: one prompt per attention group (per GPU under attention
    data-parallelism), each weight read once, rooflines summed over the
    layers, communication at prefill sizes; pp rounds in flight."""
    bw = acc.hbm_bandwidth * acc.bandwidth_efficiency
    peak = acc.peak_flops(precision.compute) * acc.flops_efficiency

    def roof(nbytes: float, flops: float) -> float:
        return max(nbytes / bw, flops / peak)

    def link(group: int) -> float:
        return (acc.scaleup_bandwidth if group <= acc.scaleup_domain else acc.internode_bandwidth) * acc.link_efficiency

    att, d, n_tok = model.attention, model.hidden_size, float(prompt)
    shard = 1 if plan.attn_dp else plan.tp
    prompts = plan.tp if plan.attn_dp else 1  # per replica and stage in one round
    kv_split = 1 if (plan.attn_dp or att.kind == "mla") else min(plan.tp, att.num_kv_heads)
    per_pair = 2.0 * att.num_heads * (att.head_dim + att.value_dim)  # QK^T and PV, non-absorbed MLA
    compute = 0.0
    for layers, pairs in causal_layers(model, n_tok):
        nbytes = model.attention_params * precision.weight_bytes / shard + 2 * d * precision.weight_bytes \
            + n_tok * kv_token_layer_bytes(model, precision) / kv_split
        compute += layers * roof(nbytes, (n_tok * 2.0 * att.params(d) + per_pair * pairs) / shard)
    if model.decode_dense_layers and model.dense_ffn_params:
        w = model.dense_ffn_params
        compute += model.decode_dense_layers * roof(w * precision.weight_bytes / shard, 2 * n_tok * w / shard)
    comm = 0.0
    if shard > 1:
        comm += 2 * model.decode_layers * (options.collective_latency
                                           + 2 * (plan.tp - 1) / plan.tp * n_tok * d * precision.activation_bytes
                                           / link(plan.tp))
    if model.is_moe:
        n_moe, k = model.decode_moe_layers, model.top_k
        shared = model.shared_experts * model.shared_expert_params
        compute += n_moe * roof((model.router_params * precision.weight_bytes + shared * precision.expert_bytes)
                                / shard, 2 * n_tok * (model.router_params + shared) / shard)
        tokens = n_tok * prompts * plan.dp / plan.expert_copies
        a = model.expert_params * precision.expert_bytes / plan.expert_tp / bw
        b = 2.0 * model.expert_params / plan.expert_tp / (acc.peak_flops(precision.expert_compute)
                                                          * acc.flops_efficiency)
        compute += n_moe * moe_straggler_closed_form(model.routed_experts, k, tokens, plan.ep, a, b, pop,
                                                     plan.redundant)[0]  # the plan's redundant slots, as in decode
        if plan.ep > 1:
            group = plan.ep * plan.expert_tp
            inter = 0.0 if group <= acc.scaleup_domain else 1 - acc.scaleup_domain / group
            for el in (precision.dispatch_bytes, precision.combine_bytes):
                sent = n_tok * prompts / plan.tp * k * d * el * (plan.ep - 1) / plan.ep
                one = max(scaleup_share_seconds(acc, group, sent * (1 - inter)),
                          sent * inter / (acc.internode_bandwidth * acc.link_efficiency))
                comm += n_moe * (options.collective_latency + one)
        etp = plan.expert_tp
        if etp > 1 and not (shard > 1 and etp == plan.tp and plan.ep == 1):
            nb = tokens / plan.ep * k * d * precision.activation_bytes
            comm += n_moe * (options.collective_latency + 2 * (etp - 1) / etp * nb / link(etp))
    compute += roof(model.vocab_size * d * precision.weight_bytes / shard, 2 * model.vocab_size * d / shard)
    if options.kernels == "calibrated":
        compute = calibrated_prefill_compute(model, precision, acc, plan, n_tok, pop)
    if plan.pp > 1:
        comm += (plan.pp - 1) * (options.collective_latency
                                 + n_tok * prompts * d * precision.activation_bytes / link(plan.tp * plan.pp))
    total = max(compute, comm) if options.overlap_comm else compute + comm
    return total / (plan.pp * prompts)


def calibrated_prefill_compute(model: Model, precision: Precision, acc: Any, plan: Plan, n_tok: float,
                               pop: Any) -> float:
    """The compute of one prefill round with calibrated kernels, the plain way: every GEMM the fitted
    kernel at n_tok rows (the LM head at one), the causal attention core's FLOPs at bf16 peak x the
    measured bf16 efficiency, the prompt's KV written at the HBM roofline, the routed experts the
    calibrated grouped-GEMM cost through the closed-form straggler."""
    att, d = model.attention, model.hidden_size
    shard = 1 if plan.attn_dp else plan.tp
    prompts = plan.tp if plan.attn_dp else 1
    kv_split = 1 if (plan.attn_dp or att.kind == "mla") else min(plan.tp, att.num_kv_heads)

    def gemm(n: float, k: float, m: float) -> float:
        return gemm_seconds(acc, precision, m, n, k)

    proj = projections(model, plan, n_tok, gemm)
    write = n_tok * kv_token_layer_bytes(model, precision) / kv_split / (
        acc.hbm_bandwidth * acc.bandwidth_efficiency)
    rate = acc.peak_flops("bf16") * acc.flops_efficiency
    per_pair = 2.0 * att.num_heads * (att.head_dim + att.value_dim)
    total = 0.0
    for layers, pairs in causal_layers(model, n_tok):
        total += layers * (proj + per_pair * pairs / shard / rate + write)
    mats = 3 if model.gated_ffn else 2
    if model.decode_dense_layers and model.dense_intermediate:
        w = model.dense_intermediate / shard
        total += model.decode_dense_layers * (gemm((mats - 1) * w, d, n_tok) + gemm(d, w, n_tok))
    if model.is_moe:
        ws = model.shared_experts * model.shared_intermediate / shard
        per_layer = gemm(model.routed_experts, d, n_tok)
        if ws:
            per_layer += gemm((mats - 1) * ws, d, n_tok) + gemm(d, ws, n_tok)
        a, bb, fixed = _grouped(model, precision, acc, plan)
        tokens = n_tok * prompts * plan.dp / plan.expert_copies
        m, _ = moe_straggler_closed_form(model.routed_experts, model.top_k, tokens, plan.ep, a, bb, pop,
                                         plan.redundant)
        total += model.decode_moe_layers * (per_layer + m + fixed)
    return total + gemm(model.vocab_size / shard, d, 1.0)


def length_workload(context: int, output: int, context_dist: str, output_dist: str
                    ) -> tuple[float, float, list[tuple[float, float]]]:
    """(mean cache a slot holds = mean a step reads, its sd, prompt law as (length, probability) pairs) of
    requests with I and O drawn independently from the named laws (their discrete form is the definition,
    qsengine.decode.prefill.LengthDist; everything else the plain way). A slot holds request (i, o) for o
    steps, so it is seen with probability ∝ p(i)·p(o)·o, at a step j uniform on 1..o, caching i + j."""
    from qsengine.decode.prefill import LengthDist

    ins = list(zip(*(x.tolist() for x in LengthDist.parse(context_dist).discretise(context))))
    outs = list(zip(*(x.tolist() for x in LengthDist.parse(output_dist).discretise(output))))
    norm = sum(po * o for o, po in outs)
    c1 = c2 = 0.0
    for i, pi_ in ins:
        for o, po in outs:
            w = pi_ * po * o / norm
            c1 += w * (i + (o + 1) / 2)  # the mean over j of i + j
            c2 += w * (i * i + i * (o + 1) + (o + 1) * (2 * o + 1) / 6)  # the mean over j of (i + j)^2
    return c1, math.sqrt(max(c2 - c1 * c1, 0.0)), ins


def side(model: Model, cluster: Cluster, context: int, plan: Plan | str, precision: Precision,
         routing: Any, slo: float | None, options: StepOptions, fixed: int | None = None,
         output: int = 0, prefill: str = "none", context_dist: str = "fixed",
         output_dist: str = "fixed", cap: int = 0) -> dict[str, Any]:
    """One side at its best plan and batch. ``cap``: the serving engine's
    sequences per scheduler (one scheduler per replica, per attention rank under
    attention-DP; 0 = none). A request workload (output >= 1)
    admits at context + output and reads context + (output + 1)/2; prefill
    "colocated" scores plans by end-to-end tokens/s, "disaggregated" takes the
    prefill pool's best plan among all that pack. Colocated TPOTs (mean, p99,
    and the target) include the amortised prefill stall B·t_pf/O."""
    admit = context + output
    read = context + (output + 1) / 2 if output else context
    laws = output >= 1 and (context_dist, output_dist) != ("fixed", "fixed")
    prompts = [(float(context), 1.0)]
    sd = 0.0
    if laws:  # paged KV: admitted at the mean cache plus a 99% margin over the sequences of one memory pool
        read, sd, prompts = length_workload(context, output, context_dist, output_dist)
        admit = math.ceil(read)
    acc = cluster.accelerator
    pop = independent_popularity(routing, model.routed_experts) if model.is_moe else None
    if isinstance(plan, Plan) and not model.is_moe and (plan.ep > 1 or plan.etp is not None or plan.redundant):
        plan = dataclasses.replace(plan, ep=1, etp=None, redundant=0)  # the dense side has no expert slots
    if isinstance(plan, str):  # every plan on all GPUs, then on the largest power of two below (others idle)
        counts = [cluster.num_gpus]
        p2 = 1
        while p2 * 2 <= cluster.num_gpus:
            p2 *= 2
        if p2 != cluster.num_gpus:
            counts.append(p2)
        candidates = [p for g in counts for p in enumerate_plans(model, g)]
    else:
        candidates = [plan]
    best = None
    pool = math.nan  # disaggregated: the prefill pool's best tokens/s per GPU x the cluster's GPUs
    for p in candidates:
        used = cluster if p.num_gpus == cluster.num_gpus else Cluster(acc, p.num_gpus)
        pk = pack(model, used, admit, plan=p, precision=precision, draft_module=options.draft_tokens > 0,
                      draft_tokens=options.draft_tokens)
        admitted = admit
        if laws and pk.feasible:
            admitted = math.ceil(read + Z99 * sd / math.sqrt(pk.admissible_batch))
            pk = pack(model, used, admitted, plan=p, precision=precision, draft_module=options.draft_tokens > 0,
                      draft_tokens=options.draft_tokens)
        if model.is_moe:  # every GPU holds (E + redundant)/ep expert slots of each of its stage's MoE layers
            slots = (model.routed_experts + p.redundant) // p.ep
            per_slot = model.expert_params * precision.expert_bytes / p.expert_tp
            layers = model.num_layers + (options.draft_tokens > 0)  # the draft module: one more MoE layer, last
            moe_layers = [sum(1 for i in range(s * layers // p.pp, (s + 1) * layers // p.pp)
                              if i >= model.dense_layers) for s in range(p.pp)]  # dense layers come first
            want = [slots * n * per_slot for n in moe_layers]
            got = pk.gpu_map.groupby("stage")["routed_experts"].max().tolist()
            assert np.allclose(got, want, rtol=1e-9), (p.label, got, want)
        if not pk.feasible:
            continue
        unit = p.tp if p.attn_dp else 1
        pf = math.nan
        stall = 0.0  # colocated: each of the B running sequences' replacement prompt stops decode once per O steps
        if prefill != "none":
            t_pf = sum(w * prefill_seconds(model, precision, acc, p, i, pop, options) for i, w in prompts)
            pf = context * p.dp / t_pf  # colocated: the replicas prefill on the decode GPUs
            if prefill == "colocated":
                stall = t_pf / output
            if prefill == "disaggregated":
                own = context / (t_pf * p.tp * p.pp) * cluster.num_gpus
                pool = own if math.isnan(pool) else max(pool, own)

        def score(thr: float) -> float:
            return 1 / (1 / thr + (context / output) / pf) if prefill == "colocated" else thr

        def step(units: int):
            return step_of(model, precision, acc, p, units * unit, read, pop, options)

        def seen(st, seqs: int) -> tuple[float, float]:
            """(mean, p99) TPOT a user sees with seqs running sequences per replica: the step plus the
            amortised prefill stalls, seqs/O prompts of t_pf each per step."""
            return st.time + seqs * stall, st.time_p99 + seqs * stall

        units, limit = int(pk.admissible_batch), "hbm"
        schedulers = p.tp if p.attn_dp else 1
        if cap and max(1, cap * schedulers // unit) < units:
            units, limit = max(1, cap * schedulers // unit), "cap"
        if fixed is not None:  # the cluster batch split evenly over the replicas, if the plan holds it
            if fixed % p.dp or math.ceil(fixed // p.dp / unit) > units:
                continue
            st = step_of(model, precision, acc, p, fixed // p.dp, read, pop, options)
            thr = fixed / st.time
            if best is None or score(thr) > best["score"] * (1 + 1e-12):
                t_mean, t_p99 = seen(st, fixed // p.dp)
                best = dict(plan=p.label, batch=fixed, limit="fixed", tps=thr, tpot=t_mean, p99=t_p99,
                            score=score(thr), pf=pf, admit=admitted)
            continue
        st = step(units)
        if slo is not None and seen(st, units * unit)[1] > slo:
            limit = "slo"
            if seen(step(1), unit)[1] > slo:
                continue
            lo, hi = 1, units
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if seen(step(mid), mid * unit)[1] <= slo:
                    lo = mid
                else:
                    hi = mid
            units, st = lo, step(lo)
        thr = st.tokens_per_second * p.dp
        if best is None or score(thr) > best["score"] * (1 + 1e-12):
            t_mean, t_p99 = seen(st, units * unit)
            best = dict(plan=p.label, batch=units * unit * p.dp, limit=limit, tps=thr, tpot=t_mean, p99=t_p99,
                        score=score(thr), pf=pf, admit=admitted)
    if best is None:
        return dict(plan="", batch=0, limit="", tps=0.0, tpot=math.nan, p99=math.nan, e2e=0.0, pf=math.nan, admit=0)
    if prefill == "disaggregated":
        best["pf"] = pool
    best["e2e"] = 1 / (1 / best["tps"] + (context / output) / best["pf"]) if prefill != "none" else best["tps"]
    return best


def record(model: str, cluster: str, context: int, q: Any = None, dense: str | None = None,
           routing: Any = "uniform", plan: Plan | str = "auto", precision: str | None = None,
           slo_tpot: float | None = DEFAULT_SLO_TPOT, twin_attention: str = "same", break_even: bool = True,
           options: StepOptions | None = None, batch: int | None = None, output: int = 0, prefill: str = "none",
           draft_tokens: int = 0, acceptance: float = 0.0, context_dist: str = "fixed", output_dist: str = "fixed",
           serving: str = "qsengine", **_: Any) -> dict[str, Any]:
    """The comparison the plain way: the record columns that do not depend on
    wording (feasibility, plans, batches, throughput, TPOT, ratio, verdict, q*)."""
    m, c = as_model(model), as_cluster(cluster)
    policy = serving_policy(serving)  # the engine's memory budget on the accelerator, and its batch cap
    cap = policy.max_sequences(c.accelerator)
    c = dataclasses.replace(c, accelerator=policy.accelerator(c.accelerator))
    prec = as_precision(precision) if precision is not None else default_precision(m)  # the MoE's, both sides
    opts = options or StepOptions()
    if draft_tokens:  # speculative decoding on both sides
        opts = dataclasses.replace(opts, draft_tokens=draft_tokens, acceptance=acceptance)
    if dense is not None:
        d = as_model(dense)
        rec = qs_record(m, d)
    else:
        d = m.dense_twin("sqrt" if q is None else q, attention=twin_attention)
        rec = qs_record(m, "sqrt" if q is None else q)
    if batch is not None:
        slo_tpot = None  # a fixed batch is evaluated as given
    moe = side(m, c, context, plan, prec, routing, slo_tpot, opts, batch, output, prefill, context_dist, output_dist,
               cap)
    den = side(d, c, context, plan, prec, "uniform", slo_tpot, opts, batch, output, prefill, context_dist, output_dist,
               cap)
    # the maximum-throughput point: no latency target
    moe_max = side(m, c, context, plan, prec, routing, None, opts, batch, output, prefill, context_dist,
                   output_dist, cap) \
        if slo_tpot is not None else moe
    den_max = side(d, c, context, plan, prec, "uniform", None, opts, batch, output, prefill, context_dist, output_dist,
                   cap) \
        if slo_tpot is not None else den
    gpus = c.num_gpus
    out: dict[str, Any] = {"dense_model": d.id, "q": rec.q, "qs": rec.qs}
    for name, s, x in (("moe", moe, moe_max), ("dense", den, den_max)):
        out.update({f"{name}_feasible": bool(s["plan"]), f"{name}_plan": s["plan"], f"{name}_batch": s["batch"],
                    f"{name}_batch_limit": s["limit"], f"{name}_tokens_per_s": s["tps"],
                    f"{name}_tpot_ms": s["tpot"] * 1e3, f"{name}_tpot_p99_ms": s["p99"] * 1e3,
                    f"{name}_max_plan": x["plan"], f"{name}_max_batch": x["batch"],
                    f"{name}_max_tokens_per_s_per_gpu": x["tps"] / gpus, f"{name}_max_tpot_ms": x["tpot"] * 1e3})
    out["ratio_max_throughput"] = den_max["e2e"] / moe_max["e2e"] if moe_max["plan"] and den_max["plan"] \
        else math.nan
    both = bool(moe["plan"]) and bool(den["plan"])
    ratio = den["e2e"] / moe["e2e"] if both else math.nan
    out["ratio_decode"] = den["tps"] / moe["tps"] if both else math.nan
    for name, s in (("moe", moe), ("dense", den)):
        on = prefill != "none" and bool(s["plan"])
        out[f"{name}_prefill_tokens_per_s_per_gpu"] = s["pf"] / c.num_gpus if on else math.nan
        out[f"{name}_request_tokens_per_s_per_gpu"] = s["e2e"] / c.num_gpus if on else math.nan
        out[f"{name}_admit_context"] = s["admit"]
    if not moe["plan"] and not den["plan"]:
        verdict = "neither"
    elif not moe["plan"]:
        verdict = "dense-only"
    elif not den["plan"]:
        verdict = "moe-only"
    elif abs(ratio - 1) <= TIE:
        verdict = "tie"
    else:
        verdict = "dense" if ratio > 1 else "moe"
    out.update(ratio=ratio, verdict=verdict)
    q_star = math.nan
    if break_even and moe["plan"] and dense is None:
        q_star = break_even_q(m, c, context, moe["e2e"], prec, plan, slo_tpot, opts, twin_attention, batch,
                              output=output, prefill=prefill, context_dist=context_dist, output_dist=output_dist,
                              cap=cap)
    out["break_even_q"] = q_star
    return out


def break_even_q(model: Model, cluster: Cluster, context: int, moe_tps: float, precision: Precision,
                 plan: Plan | str, slo: float | None, options: StepOptions, attention: str,
                 fixed: int | None = None, rtol: float = 1e-3, output: int = 0, prefill: str = "none",
                 context_dist: str = "fixed", output_dist: str = "fixed", cap: int = 0) -> float:
    def ratio(q: float) -> float | None:
        try:
            twin = model.dense_twin(q, attention=attention)
        except ValueError:
            return None
        s = side(twin, cluster, context, plan, precision, "uniform", slo, options, fixed, output, prefill, context_dist,
                 output_dist, cap)
        return s["e2e"] / moe_tps if s["plan"] else 0.0

    lo, hi = 1.0, 1.0 / model.sparsity
    r_lo, r_hi = ratio(lo), ratio(hi)
    while r_lo is None and lo < hi:
        lo *= 1.5
        r_lo = ratio(lo)
    for _ in range(4):
        if r_hi is None or r_hi < 1.0:
            break
        hi *= 2.0
        r_hi = ratio(hi)
    if r_lo is None or r_hi is None or r_lo < 1.0 or r_hi >= 1.0:
        return math.nan
    for _ in range(60):
        if hi / lo - 1.0 <= rtol:
            break
        mid = math.sqrt(lo * hi)
        r = ratio(mid)
        if r is not None and r >= 1.0:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


def same(want: dict[str, Any], got: dict[str, Any], rtol: float = 1e-9) -> list[tuple[str, Any, Any]]:
    """The keys of ``want`` on which ``got`` differs (nan equals nan; floats to ``rtol``: the
    reference's scalar calibrated step sums its pieces in another order than the vectorised one)."""
    bad = []
    for k, a in want.items():
        b = got[k]
        if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
            continue
        if isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=rtol, abs_tol=0.0):
            continue
        if a != b:
            bad.append((k, a, b))
    return bad
