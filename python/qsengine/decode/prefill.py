"""Whole requests: prefill time and the decode of a KV cache that grows.

A request has an input (prompt) of I tokens and an output of O tokens. The
point fields ``context`` (= I), ``output`` (= O) and ``prefill`` (the mode)
describe it; ``output=0`` is today's decode-only model at a fixed context.
Formulas and assumptions: ``docs/model.md``, section "Whole requests".

* **Decode with a growing cache** (:class:`Requests`): a sequence is admitted
  for its peak cache, I + O tokens (the packing call); the step that generates
  token j reads I + j cached tokens, so a decode step reads on average
  I + (O + 1)/2 tokens per sequence (the step model).
* **Prefill** (:func:`prefill_time`): one prompt of I tokens per prefill
  batch (per attention GPU under attention data-parallelism), every weight
  read once per batch, the GEMMs over I tokens, causal attention over the
  prompt, the same TP/EP/PP communication at prefill sizes, each piece a
  roofline with the accelerator efficiencies of the decode step model.
* **Modes** (:data:`PREFILL_MODES`): ``"none"`` (decode only), ``"colocated"``
  (prefill runs on the decode GPUs and takes their time: the plan is chosen for
  the end-to-end throughput), ``"disaggregated"`` (a separate prefill pool at
  its own best plan, sized in proportion to the work; both pools' GPUs count).
  In both cases the end-to-end output tokens/s per GPU is the harmonic
  combination :func:`end_to_end`.

Helpers only: the roofline and collectives come from
:mod:`qsengine.decode.kernels` (``_roof``, ``_allreduce``, ``_link_bw``) and
:mod:`qsengine.decode.straggler` (``straggler_closed_form``); nothing here edits the decode step's pieces.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qsengine.decode.kernels import _allreduce, _gemm, _link_bw, _roof
from qsengine.decode.params import StepParams
from qsengine.decode.straggler import straggler_closed_form
from qsengine.specs import Model

__all__ = ["PREFILL_MODES", "Requests", "prefill_ctx_flops", "prefill_time", "end_to_end"]

#: The ``prefill`` point field's values, in code order (``Requests.mode``).
PREFILL_MODES = ("none", "colocated", "disaggregated")


@dataclass(frozen=True)
class Requests:
    """The request workload of many lanes (float64 arrays, int8 ``mode``).

    ``read``: mean cached tokens one decode step reads per sequence;
    ``prompt``: I; ``output``: O (0 = decode only at a fixed context);
    ``mode``: index into :data:`PREFILL_MODES`."""

    read: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    mode: np.ndarray

    @staticmethod
    def make(context: np.ndarray, output: np.ndarray, mode: np.ndarray) -> tuple[np.ndarray, "Requests"]:
        """(admission context, requests) of lanes with ``context`` = I,
        ``output`` = O and ``mode`` codes: admission at the peak I + O, reads
        at the running mean I + (O + 1)/2 (I exactly when O = 0)."""
        ctx = np.asarray(context, dtype=np.int64)
        out = np.asarray(output, dtype=np.int64)
        read = np.where(out > 0, ctx + (out + 1) / 2.0, ctx.astype(np.float64))
        return ctx + out, Requests(read, ctx.astype(np.float64), out.astype(np.float64),
                                   np.asarray(mode, dtype=np.int8))

    def take(self, idx: np.ndarray) -> "Requests":
        return Requests(self.read[idx], self.prompt[idx], self.output[idx], self.mode[idx])


def prefill_ctx_flops(model: Model) -> float:
    """FLOPs of one (query, key) pair in one attention layer, all heads: QKᵀ
    and the weighted sum of values, 2·h·(d_qk + d_v).

    MHA/GQA: d_qk = head_dim. MLA prefills in its non-absorbed form (keys and
    values up-projected from the latent, DeepSeek-V2, arXiv:2405.04434 §2.1):
    d_qk = qk_nope_head_dim + qk_rope_head_dim (= ``head_dim``), d_v =
    ``value_dim``."""
    att = model.attention
    return 2.0 * att.num_heads * (att.head_dim + att.value_dim)


def _causal_pairs(prompt: np.ndarray, window: np.ndarray) -> np.ndarray:
    """(query, key) pairs of causal attention over a prompt of I tokens:
    I(I+1)/2; within a window W (sliding or chunked layers, W < I):
    W(W+1)/2 + (I − W)·W."""
    full = prompt * (prompt + 1) / 2.0
    w = np.minimum(window, prompt)
    capped = w * (w + 1) / 2.0 + (prompt - w) * w
    return np.where(window > 0, capped, full)


def prefill_time(p: StepParams, prompt: np.ndarray, ctx_flops: np.ndarray, *, pi: np.ndarray | None = None,
                 uniform: bool = True) -> np.ndarray:
    """Seconds of one replica per prefilled request, for every lane of ``p``.

    One round: every attention GPU group of every stage holds a prompt of
    I tokens (one per replica; one per GPU under attention data-parallelism,
    R = tp prompts per replica), every weight is read once, each piece is a
    roofline ``max(bytes/BW, flops/F)`` summed over all layers (like the
    decode step) plus communication. With pp stages pp rounds are in flight,
    so a request costs the replica ``t_round / (pp·R)``. MoE layers: the
    routed experts see the round's tokens of the whole stage, m = I·R·dp/copies
    per EP group; the busiest GPU's time is the closed-form straggler of the
    decode model at that m (at prefill sizes every expert is touched and the
    n_g term, compute, dominates). LM head: logits of the last token only.
    Not modelled: chunked prefill, the KV transfer of disaggregated serving
    (assumed overlapped with the next prompt's compute)."""
    prompt = np.asarray(prompt, dtype=np.float64)
    n = prompt.shape[0]
    adp = p.attn_dp > 0
    shard = np.where(adp, 1.0, p.tp)
    per_stage = np.where(adp, p.tp, 1.0)  # prompts per replica per stage and round (R)
    m = prompt  # tokens per attention GPU group
    norm_bytes = 2 * p.d * p.wb
    pieces = []
    # attention: projections over I tokens, causal scores over the prompt, the prompt's KV written once
    for nl, win in ((p.layers - p.local, np.zeros(n)), (p.local, p.window)):
        w = p.attn_params * p.wb / shard + norm_bytes
        kv = m * p.kv_layer / p.kv_split
        fl = (m * p.attn_proj_flops + ctx_flops * _causal_pairs(m, win)) / shard
        t, _ = _roof(w + kv, fl, p)
        pieces.append(np.where(nl > 0, t * nl, 0.0))
    # dense FFN
    t, _ = _roof(p.ffn_params * p.wb / shard, 2.0 * m * p.ffn_params / shard, p)
    pieces.append(np.where((p.dense_layers > 0) & (p.ffn_params > 0), t * p.dense_layers, 0.0))
    # MoE: router + shared experts, routed experts (busiest GPU of the EP group)
    is_moe = p.moe_layers > 0
    tokens = m * per_stage * p.dp / p.copies
    if is_moe.any():
        t, _ = _roof(p.router_params * p.wb / shard + p.shared_params * p.eb / shard,
                     2.0 * m * (p.router_params + p.shared_params) / shard, p)
        pieces.append(np.where(is_moe, t * p.moe_layers, 0.0))
        rows = np.flatnonzero(is_moe)
        mean = np.zeros(n)
        a = p.expert_params * p.eb / p.etp / p.bw
        b = 2.0 * p.expert_params / p.etp / p.flops
        experts, top_k = int(p.experts[rows[0]]), int(p.top_k[rows[0]])
        mean[rows], _ = straggler_closed_form(experts, top_k, tokens[rows], p.ep[rows], a[rows], b[rows],
                                              None if uniform else pi)
        pieces.append(np.where(is_moe, mean * p.moe_layers, 0.0))
    # LM head: the last token's logits
    t, _ = _roof(p.vd * p.wb / shard, 2.0 * p.vd / shard, p)
    pieces.append(t)
    # communication at prefill sizes
    comm = [np.where(shard > 1, _allreduce(m * p.d * p.ab, p.tp, p) * 2 * p.layers, 0.0)]
    if is_moe.any():
        tokens_src = m * per_stage / p.tp
        group = p.ep * p.etp
        nbytes = tokens_src * p.top_k * p.d * p.ab * (p.ep - 1) / p.ep
        inter = np.where(group <= p.domain, 0.0, 1.0 - p.domain / group)
        t_one = np.maximum(nbytes * (1 - inter) / (p.scaleup * p.link_eff),
                           nbytes * inter / (p.internode * p.link_eff))
        comm.append(np.where(is_moe & (p.ep > 1), 2 * (p.latency + t_one) * p.moe_layers, 0.0))
        has_etp = is_moe & (p.etp > 1) & ~((shard > 1) & (p.etp == p.tp) & (p.ep == 1))
        comm.append(np.where(has_etp, _allreduce(tokens / np.maximum(p.ep, 1) * p.top_k * p.d * p.ab, p.etp, p)
                             * p.moe_layers, 0.0))
    comm.append(np.where(p.pp > 1, (p.pp - 1) * (p.latency + m * per_stage * p.d * p.ab / _link_bw(p, p.tp * p.pp)),
                         0.0))
    compute = sum(pieces[1:], pieces[0])
    cal = p.kern > 0
    if cal.any():
        compute = np.where(cal, _calibrated_compute(p, m, shard, tokens, ctx_flops, pi, uniform), compute)
    link = sum(comm[1:], comm[0])
    t_round = np.where(p.overlap > 0, np.maximum(compute, link), compute + link)
    return t_round / (p.pp * per_stage)


def _calibrated_compute(p: StepParams, m: np.ndarray, shard: np.ndarray, tokens: np.ndarray, ctx_flops: np.ndarray,
                        pi: np.ndarray | None, uniform: bool) -> np.ndarray:
    """The compute of one prefill round with calibrated kernels (``StepOptions.kernels="calibrated"``):
    every GEMM the fitted GEMM kernel at its prefill shape, m = I tokens per attention GPU group (the decode
    step's projection, FFN, router and shared-expert shapes; the LM head at one row); the causal attention
    core's FLOPs at bf16 peak x the accelerator's measured bf16 matmul efficiency (``pf_core_f``: the
    decode attention fits are bandwidth-bound, their compute rate is not identified, and no prefill
    attention kernel is fitted), the prompt's KV written once at the HBM roofline; routed experts the decode model's calibrated grouped-GEMM cost
    ``fixed + max(a·u, b·n)`` through the closed-form straggler at the round's tokens."""
    n = m.shape[0]

    def gemm(nn: np.ndarray, k: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return _gemm(p, rows, nn, k)[0]

    proj = sum(gemm(nn, k, m) for nn, k in ((p.ap_n1, p.ap_k1), (p.ap_n2, p.ap_k2), (p.ap_n3, p.ap_k3),
                                             (p.ap_n4, p.ap_k4)))
    kv = m * p.kv_layer / p.kv_split / p.bw
    total = np.zeros(n)
    for nl, win in ((p.layers - p.local, np.zeros(n)), (p.local, p.window)):
        core = ctx_flops * _causal_pairs(m, win) / shard / p.pf_core_f
        total = total + np.where(nl > 0, (proj + core + kv) * nl, 0.0)
    has = (p.dense_layers > 0) & (p.ffn_params > 0)
    width = np.where(has, (p.ffn_params - p.ffn_bias * p.d) / (p.ffn_mats * p.d + p.ffn_bias * (p.ffn_mats - 1))
                     / shard, 0.0)  # no dense FFN: width 0, no GEMM (the formula would go negative with biases)
    ffn = gemm((p.ffn_mats - 1) * width, p.d, m) + gemm(np.where(width > 0, p.d, 0.0), width, m)
    total = total + np.where(has, ffn * p.dense_layers, 0.0)
    is_moe = p.moe_layers > 0
    if is_moe.any():
        shared = (gemm(np.where(is_moe, p.experts, 0.0), p.d, m) + gemm(p.sh_n, p.d, m)
                  + gemm(np.where(p.sh_k > 0, p.d, 0.0), p.sh_k, m))
        rows = np.flatnonzero(is_moe)
        routed = np.zeros(n)
        experts, top_k = int(p.experts[rows[0]]), int(p.top_k[rows[0]])
        routed[rows], _ = straggler_closed_form(experts, top_k, tokens[rows], p.ep[rows], p.moe_a[rows],
                                                p.moe_b[rows], None if uniform else pi)
        total = total + np.where(is_moe, (shared + routed + p.moe_fix) * p.moe_layers, 0.0)
    return total + gemm(p.lm_n, p.d, np.ones(n))


def end_to_end(decode_tps: np.ndarray, prefill_tps: np.ndarray, req: Requests) -> np.ndarray:
    """End-to-end output tokens/s of lanes (same units as the inputs, e.g. per
    GPU or per cluster-equivalent): a request costs O/decode + I/prefill
    seconds of the GPUs, so 1/e2e = 1/decode + (I/O)/prefill (the harmonic
    combination of the two pools, or of the two uses of one pool). Lanes
    with mode "none" return ``decode_tps`` itself; 0 where decode is 0."""
    dec = np.asarray(decode_tps, dtype=np.float64)
    pf = np.asarray(prefill_tps, dtype=np.float64)
    on = (req.mode > 0) & (dec > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        e2e = 1.0 / (1.0 / dec + (req.prompt / req.output) / pf)
    return np.where(req.mode > 0, np.where(on, e2e, 0.0), dec)
