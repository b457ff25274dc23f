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
* **Length distributions** (:class:`LengthDist`, point fields
  ``context_dist``, ``output_dist``): I and O drawn independently from
  "fixed", "uniform:w", "exponential" or "lognormal:s" laws of mean
  ``context`` and ``output``, discretised into :data:`DIST_POINTS`
  equiprobable bins. A slot of a continuously batched replica holds a request
  for O steps, so the request a step sees is length-biased (probability ∝ O):
  steps read E[O·(I + (O+1)/2)]/E[O] tokens per sequence, prefill costs
  E[t_pf(I)] per request, and sequences are admitted at the mean cache plus a
  margin (:func:`admission_context`; fixed lengths keep the peak I + O).
* **Modes** (:data:`PREFILL_MODES`): ``"none"`` (decode only), ``"colocated"``
  (prefill runs on the decode GPUs and takes their time: the plan is chosen for
  the end-to-end throughput), ``"disaggregated"`` (a separate prefill pool at
  its own best plan, sized in proportion to the work; both pools' GPUs count).
  In both cases the end-to-end output tokens/s per GPU is the harmonic
  combination :func:`end_to_end`.

Helpers only: the roofline and collectives come from
:mod:`qsengine.decode.kernels` (``_roof``, ``_allreduce``, ``_link_bw``, ``_ep_alltoall``) and
:mod:`qsengine.decode.straggler` (``straggler_closed_form``); nothing here edits the decode step's pieces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from collections.abc import Callable, Sequence

from qsengine.decode.kernels import _allreduce, _ep_alltoall, _gemm, _link_bw, _roof
from qsengine.decode.params import StepParams
from qsengine.decode.straggler import straggler_closed_form
from qsengine.specs import Model

__all__ = ["PREFILL_MODES", "LENGTH_DISTRIBUTIONS", "DIST_POINTS", "ADMISSION_Z", "LengthDist", "Requests",
           "admission_context", "prefill_ctx_flops", "prefill_time", "end_to_end"]

#: The ``prefill`` point field's values, in code order (``Requests.mode``).
PREFILL_MODES = ("none", "colocated", "disaggregated")

#: The length laws of the ``context_dist`` / ``output_dist`` point fields (docs/model.md "Length distributions").
LENGTH_DISTRIBUTIONS = ("fixed", "uniform", "exponential", "lognormal")

#: Equiprobable bins a length law is discretised into (each bin at its conditional mean, so the mean is exact;
#: the sd loses the within-bin part: 0.01% for uniform, 0.9% for exponential, 1.1% for lognormal:0.5, 6% for
#: lognormal:1, all of it in the top bin's tail).
DIST_POINTS = 64

#: Admission margin of a length distribution, in standard errors of the batch's mean cache per sequence: the
#: one-sided 99% normal quantile (the sum of the n independent slots' caches of one memory pool exceeds the
#: admitted n·(mean + z·sd/√n) on about 1% of steps, central limit theorem; an engine then preempts, e.g. vLLM's
#: recompute preemption, https://docs.vllm.ai/en/latest/configuration/optimization.html#preemption).
ADMISSION_Z = NormalDist().inv_cdf(0.99)


@dataclass(frozen=True)
class LengthDist:
    """A law of request lengths L ≥ 1 of a given mean m: L = 1 + Y with
    E[Y] = m − 1, Y ≥ 0 (so every law keeps lengths ≥ 1 and its mean exact).

    * ``"fixed"``: L = m;
    * ``"uniform:w"`` (0 < w ≤ 1): Y uniform on [(m−1)(1−w), (m−1)(1+w)];
    * ``"exponential"``: Y exponential of mean m − 1 (sd = m − 1);
    * ``"lognormal:s"`` (0 < s ≤ 4): ln Y normal of sd s and mean ln(m−1) − s²/2.

    ``spread`` is w or s (0 for fixed and exponential)."""

    kind: str = "fixed"
    spread: float = 0.0

    @staticmethod
    def parse(v: Any, field_name: str = "context_dist") -> "LengthDist":
        """A LengthDist from its string form ("fixed", "uniform:0.5",
        "exponential", "lognormal:0.8") or itself; errors name the field."""
        if isinstance(v, LengthDist):
            v = v.label
        if not isinstance(v, str):
            raise TypeError(f"field {field_name!r} = {v!r}: must be a string such as 'fixed', 'uniform:0.5', "
                            f"'exponential' or 'lognormal:0.8', got {type(v).__name__}")
        kind, _, arg = v.strip().lower().partition(":")
        if kind not in LENGTH_DISTRIBUTIONS:
            raise ValueError(f"field {field_name!r} = {v!r}: the law must be one of {list(LENGTH_DISTRIBUTIONS)}")
        if kind in ("fixed", "exponential"):
            if arg:
                raise ValueError(f"field {field_name!r} = {v!r}: {kind!r} takes no parameter")
            return LengthDist(kind)
        try:
            x = float(arg)
        except ValueError:
            raise ValueError(f"field {field_name!r} = {v!r}: {kind!r} needs its spread, e.g. "
                             f"'{kind}:{'0.5' if kind == 'uniform' else '0.8'}'") from None
        hi = 1.0 if kind == "uniform" else 4.0
        if not (math.isfinite(x) and 0 < x <= hi):
            raise ValueError(f"field {field_name!r} = {v!r}: the spread must be in (0, {hi:g}] "
                             f"({'half-width over the mean' if kind == 'uniform' else 'sd of the log'})")
        return LengthDist(kind, x)

    @property
    def label(self) -> str:
        return self.kind if self.kind in ("fixed", "exponential") else f"{self.kind}:{self.spread:g}"

    @property
    def is_fixed(self) -> bool:
        return self.kind == "fixed"

    def discretise(self, mean: float, k: int = DIST_POINTS) -> tuple[np.ndarray, np.ndarray]:
        """(values, weights) of ``k`` equiprobable bins of the law of mean
        ``mean``, each value the bin's conditional mean E[L | bin] (so
        Σ w·v = mean up to rounding). "fixed" (or mean 1): one point."""
        theta = float(mean) - 1.0
        if self.is_fixed or theta <= 0:
            return np.array([float(mean)]), np.array([1.0])
        p = np.arange(k + 1) / k
        if self.kind == "uniform":  # the bin's midpoint
            lo, hi = theta * (1 - self.spread), theta * (1 + self.spread)
            y = lo + (hi - lo) * (np.arange(k) + 0.5) / k
        elif self.kind == "exponential":
            # partial expectation E[Y·1{Y ≤ x_p}] = θ·(1 − (1 − p)(1 − ln(1 − p))), x_p the p-quantile
            q = 1.0 - p
            with np.errstate(divide="ignore", invalid="ignore"):
                g = theta * (1.0 - q * (1.0 - np.log(q)))
            g[-1] = theta
            y = np.diff(g) * k
        else:  # lognormal: E[Y·1{Y ≤ x_p}] = E[Y]·Φ(Φ⁻¹(p) − s)
            nd = NormalDist()
            g = np.array([0.0] + [nd.cdf(nd.inv_cdf(x) - self.spread) for x in p[1:-1]] + [1.0]) * theta
            y = np.diff(g) * k
        return 1.0 + y, np.full(k, 1.0 / k)


def length_moments(context: float, output: float, cd: LengthDist, od: LengthDist
                   ) -> tuple[float, float, np.ndarray, np.ndarray]:
    """(mean cache per slot, its sd, prompt values, prompt weights) of
    requests with I ~ ``cd`` of mean ``context`` and O ~ ``od`` of mean
    ``output`` ≥ 1, independent. A slot's request is length-biased (∝ O) and
    at a uniform step J ∈ {1..O} of it, so its cache C = I + J has
    E[C] = E[I] + E_b[J], Var[C] = Var[I] + Var_b[J] with
    E_b[J] = E[O(O+1)/2]/E[O] and E_b[J²] = E[O(O+1)(2O+1)/6]/E[O]
    (E[C] is also the mean a step reads, E[O·(I + (O+1)/2)]/E[O])."""
    iv, iw = cd.discretise(context)
    ov, ow = od.discretise(output)
    m_i, m_o = float(context), float(output)
    var_i = float(np.sum(iw * iv * iv)) - m_i * m_i if not cd.is_fixed else 0.0
    o2, o3 = float(np.sum(ow * ov ** 2)), float(np.sum(ow * ov ** 3))
    ej = (o2 + m_o) / (2.0 * m_o)
    ej2 = (2.0 * o3 + 3.0 * o2 + m_o) / (6.0 * m_o)
    return m_i + ej, math.sqrt(max(var_i + ej2 - ej * ej, 0.0)), iv, iw


def admission_context(mean: np.ndarray, sd: np.ndarray, units: np.ndarray) -> np.ndarray:
    """Tokens admitted per sequence of a length distribution (paged KV):
    ceil(mean + z·sd/√n), the mean cache plus :data:`ADMISSION_Z` standard
    errors of the mean over the n sequences sharing one memory pool (``units``,
    the admissible batch at the mean: per replica, or per GPU under attention
    data-parallelism)."""
    n = np.maximum(np.asarray(units, dtype=np.float64), 1.0)
    return np.ceil(np.asarray(mean) + ADMISSION_Z * np.asarray(sd) / np.sqrt(n)).astype(np.int64)


@dataclass(frozen=True)
class Requests:
    """The request workload of many lanes (float64 arrays, int8 ``mode``).

    ``read``: mean cached tokens one decode step reads per sequence;
    ``prompt``: I (its mean); ``output``: O (its mean; 0 = decode only at a
    fixed context); ``mode``: index into :data:`PREFILL_MODES`. Length
    distributions: ``spread`` = sd of a slot's cache (> 0: admitted by
    :func:`admission_context` at ``read`` plus a margin; 0: at the admission
    context given), ``pcode`` = index into ``ptable`` of the lane's prompt
    law (values, weights), -1 for a fixed prompt."""

    read: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    mode: np.ndarray
    spread: np.ndarray = field(default_factory=lambda: np.zeros(0))
    pcode: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    ptable: tuple[tuple[np.ndarray, np.ndarray], ...] = ()

    def __post_init__(self) -> None:
        n = self.read.shape[0]
        if self.spread.shape[0] != n:
            object.__setattr__(self, "spread", np.zeros(n))
        if self.pcode.shape[0] != n:
            object.__setattr__(self, "pcode", np.full(n, -1, np.int64))

    @staticmethod
    def make(context: np.ndarray, output: np.ndarray, mode: np.ndarray, dists: Sequence[LengthDist] = (),
             context_dist: np.ndarray | None = None, output_dist: np.ndarray | None = None
             ) -> tuple[np.ndarray, "Requests"]:
        """(admission context, requests) of lanes with ``context`` = I,
        ``output`` = O and ``mode`` codes: admission at the peak I + O, reads
        at the running mean I + (O + 1)/2 (I exactly when O = 0). With
        length laws (``dists`` and each lane's index into it for I and O, all
        "fixed" when omitted): lanes with a non-fixed law read the
        length-biased mean E[C] (:func:`length_moments`), are admitted at
        ceil(E[C]) here and at :func:`admission_context` by the side, and
        prefill E[t_pf(I)] over the prompt law (one loop per distinct law)."""
        ctx = np.asarray(context, dtype=np.int64)
        out = np.asarray(output, dtype=np.int64)
        read = np.where(out > 0, ctx + (out + 1) / 2.0, ctx.astype(np.float64))
        admit = ctx + out
        n = ctx.shape[0]
        spread, pcode = np.zeros(n), np.full(n, -1, np.int64)
        table: list[tuple[np.ndarray, np.ndarray]] = []
        if dists and context_dist is not None and output_dist is not None:
            fixed = np.array([d.is_fixed for d in dists], dtype=bool)
            cd, od = np.asarray(context_dist, np.int64), np.asarray(output_dist, np.int64)
            lanes = np.flatnonzero(~(fixed[cd] & fixed[od]) & (out > 0))
            if lanes.size:
                from qsengine._groups import group

                g, first = group(lanes.size, ctx[lanes], out[lanes], cd[lanes], od[lanes])
                read = read.copy()
                pkey: dict[tuple, int] = {}
                for k, i in enumerate(lanes[first].tolist()):
                    mean, sd, iv, iw = length_moments(float(ctx[i]), float(out[i]), dists[cd[i]], dists[od[i]])
                    sel = lanes[g == k]
                    read[sel], spread[sel] = mean, sd
                    admit[sel] = math.ceil(mean)
                    if not dists[cd[i]].is_fixed:
                        key = (int(ctx[i]), dists[cd[i]])
                        if key not in pkey:
                            pkey[key] = len(table)
                            table.append((iv, iw))
                        pcode[sel] = pkey[key]
        return admit, Requests(read, ctx.astype(np.float64), out.astype(np.float64),
                               np.asarray(mode, dtype=np.int8), spread, pcode, tuple(table))

    def take(self, idx: np.ndarray) -> "Requests":
        return Requests(self.read[idx], self.prompt[idx], self.output[idx], self.mode[idx], self.spread[idx],
                        self.pcode[idx], self.ptable)

    def mean_prefill(self, lanes: np.ndarray, seconds: "Callable[[np.ndarray, np.ndarray], np.ndarray]"
                     ) -> np.ndarray:
        """E[t_pf(I)] of rows whose lanes are ``lanes``: ``seconds(rows,
        prompts)`` for a fixed prompt, Σ_k w_k·seconds(rows, I_k) over the
        lane's prompt law otherwise (one call per distinct law, each over its
        rows x the law's values)."""
        code = self.pcode[lanes]
        fixed = np.flatnonzero(code < 0)
        out = np.empty(lanes.size)
        if fixed.size:
            out[fixed] = seconds(fixed, self.prompt[lanes[fixed]])
        for c in np.unique(code[code >= 0]).tolist():
            rows = np.flatnonzero(code == c)
            iv, iw = self.ptable[c]
            t = seconds(np.repeat(rows, iv.size), np.tile(iv, rows.size)).reshape(rows.size, iv.size)
            out[rows] = t @ iw
        return out


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
        # the roofline expert cost (kernels._kernel_lane: weights at BW·η, FLOPs at the peak of
        # Precision.expert_compute); calibrated lanes are recomputed by _calibrated_compute below
        a, b = p.moe_a, p.moe_b
        experts, top_k = int(p.experts[rows[0]]), int(p.top_k[rows[0]])
        red = p.redundant[rows]  # a plan's redundant expert slots (EPLB) serve prefill as they serve decode
        mean[rows], _ = straggler_closed_form(experts, top_k, tokens[rows], p.ep[rows], a[rows], b[rows],
                                              None if uniform else pi, red.astype(np.int64) if red.any() else None)
        pieces.append(np.where(is_moe, mean * p.moe_layers, 0.0))
    # LM head: the last token's logits
    t, _ = _roof(p.vd * p.wb / shard, 2.0 * p.vd / shard, p)
    pieces.append(t)
    # communication at prefill sizes
    comm = [np.where(shard > 1, _allreduce(m * p.d * p.ab, p.tp, p) * 2 * p.layers, 0.0)]
    if is_moe.any():
        tokens_src = m * per_stage / p.tp
        group = p.ep * p.etp
        t = 0.0
        for el in (p.db, p.cb):  # dispatch, then combine (Precision.dispatch_bytes, .combine_bytes)
            nbytes = tokens_src * p.top_k * p.d * el * (p.ep - 1) / p.ep
            t = t + _ep_alltoall(nbytes, group, p)
        comm.append(np.where(is_moe & (p.ep > 1), t * p.moe_layers, 0.0))
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
        red = p.redundant[rows]  # the plan's redundant expert slots, as in the roofline prefill and decode
        routed[rows], _ = straggler_closed_form(experts, top_k, tokens[rows], p.ep[rows], p.moe_a[rows],
                                                p.moe_b[rows], None if uniform else pi,
                                                red.astype(np.int64) if red.any() else None)
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
