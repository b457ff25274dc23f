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

from qsengine.decode.point import DEFAULT_SLO_TPOT
from qsengine.decode.step import StepOptions, decode_step, moe_straggler_closed_form
from qsengine.packing import pack
from qsengine.packing import plans as enumerate_plans
from qsengine.routing import independent_popularity
from qsengine.specs import Cluster, Model, Plan, Precision
from qsengine.specs.loaders import as_cluster, as_model, as_precision, default_precision
from qsengine.specs.twin import qs as qs_record

TIE = 1e-3


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
    for layers, window in ((model.decode_layers - att.local_layers, None),
                           (att.local_layers, att.local_window if att.local_layers else None)):
        if layers == 0:
            continue
        if window is None or n_tok <= window:
            pairs = n_tok * (n_tok + 1) / 2
        else:
            pairs = window * (window + 1) / 2 + (n_tok - window) * window
        nbytes = model.attention_params * precision.weight_bytes / shard + 2 * d * precision.weight_bytes \
            + n_tok * model.kv_bytes_per_token_per_layer(precision.kv_bytes) / kv_split
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
        b = 2.0 * model.expert_params / plan.expert_tp / peak
        compute += n_moe * moe_straggler_closed_form(model.routed_experts, k, tokens, plan.ep, a, b, pop)[0]
        if plan.ep > 1:
            sent = n_tok * prompts / plan.tp * k * d * precision.activation_bytes * (plan.ep - 1) / plan.ep
            group = plan.ep * plan.expert_tp
            inter = 0.0 if group <= acc.scaleup_domain else 1 - acc.scaleup_domain / group
            one = max(sent * (1 - inter) / (acc.scaleup_bandwidth * acc.link_efficiency),
                      sent * inter / (acc.internode_bandwidth * acc.link_efficiency))
            comm += n_moe * 2 * (options.collective_latency + one)
        etp = plan.expert_tp
        if etp > 1 and not (shard > 1 and etp == plan.tp and plan.ep == 1):
            nb = tokens / plan.ep * k * d * precision.activation_bytes
            comm += n_moe * (options.collective_latency + 2 * (etp - 1) / etp * nb / link(etp))
    compute += roof(model.vocab_size * d * precision.weight_bytes / shard, 2 * model.vocab_size * d / shard)
    if plan.pp > 1:
        comm += (plan.pp - 1) * (options.collective_latency
                                 + n_tok * prompts * d * precision.activation_bytes / link(plan.tp * plan.pp))
    total = max(compute, comm) if options.overlap_comm else compute + comm
    return total / (plan.pp * prompts)


def side(model: Model, cluster: Cluster, context: int, plan: Plan | str, precision: Precision,
         routing: Any, slo: float | None, options: StepOptions, fixed: int | None = None,
         output: int = 0, prefill: str = "none") -> dict[str, Any]:
    """One side at its best plan and batch. A request workload (output >= 1)
    admits at context + output and reads context + (output + 1)/2; prefill
    "colocated" scores plans by end-to-end tokens/s, "disaggregated" takes the
    prefill pool's best plan among all that pack."""
    admit = context + output
    read = context + (output + 1) / 2 if output else context
    acc = cluster.accelerator
    pop = independent_popularity(routing, model.routed_experts) if model.is_moe else None
    if isinstance(plan, Plan) and not model.is_moe and (plan.ep > 1 or plan.etp is not None):
        plan = dataclasses.replace(plan, ep=1, etp=None)
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
        pk = pack(model, used, admit, plan=p, precision=precision)
        if not pk.feasible:
            continue
        unit = p.tp if p.attn_dp else 1
        pf = math.nan
        if prefill != "none":
            t_pf = prefill_seconds(model, precision, acc, p, context, pop, options)
            pf = context * p.dp / t_pf  # colocated: the replicas prefill on the decode GPUs
            if prefill == "disaggregated":
                own = context / (t_pf * p.tp * p.pp) * cluster.num_gpus
                pool = own if math.isnan(pool) else max(pool, own)

        def score(thr: float) -> float:
            return 1 / (1 / thr + (context / output) / pf) if prefill == "colocated" else thr

        def step(units: int):
            return decode_step(model, precision, acc, p, units * unit, read, popularity=pop, options=options)

        units, limit = int(pk.admissible_batch), "hbm"
        if fixed is not None:  # the cluster batch split evenly over the replicas, if the plan holds it
            if fixed % p.dp or math.ceil(fixed // p.dp / unit) > units:
                continue
            st = decode_step(model, precision, acc, p, fixed // p.dp, read, popularity=pop, options=options)
            thr = fixed / st.time
            if best is None or score(thr) > best["score"] * (1 + 1e-12):
                best = dict(plan=p.label, batch=fixed, limit="fixed", tps=thr, tpot=st.time, p99=st.time_p99,
                            score=score(thr), pf=pf)
            continue
        st = step(units)
        if slo is not None and st.time_p99 > slo:
            limit = "slo"
            if step(1).time_p99 > slo:
                continue
            lo, hi = 1, units
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if step(mid).time_p99 <= slo:
                    lo = mid
                else:
                    hi = mid
            units, st = lo, step(lo)
        thr = st.tokens_per_second * p.dp
        if best is None or score(thr) > best["score"] * (1 + 1e-12):
            best = dict(plan=p.label, batch=units * unit * p.dp, limit=limit, tps=thr, tpot=st.time, p99=st.time_p99,
                        score=score(thr), pf=pf)
    if best is None:
        return dict(plan="", batch=0, limit="", tps=0.0, tpot=math.nan, p99=math.nan, e2e=0.0, pf=math.nan)
    if prefill == "disaggregated":
        best["pf"] = pool
    best["e2e"] = 1 / (1 / best["tps"] + (context / output) / best["pf"]) if prefill != "none" else best["tps"]
    return best


def record(model: str, cluster: str, context: int, q: Any = None, dense: str | None = None,
           routing: Any = "uniform", plan: Plan | str = "auto", precision: str | None = None,
           slo_tpot: float | None = DEFAULT_SLO_TPOT, twin_attention: str = "same", break_even: bool = True,
           options: StepOptions | None = None, batch: int | None = None, output: int = 0, prefill: str = "none",
           **_: Any) -> dict[str, Any]:
    """The comparison the plain way: the record columns that do not depend on
    wording (feasibility, plans, batches, throughput, TPOT, ratio, verdict, q*)."""
    m, c = as_model(model), as_cluster(cluster)
    prec = as_precision(precision) if precision is not None else default_precision(m)  # the MoE's, both sides
    opts = options or StepOptions()
    if dense is not None:
        d = as_model(dense)
        rec = qs_record(m, d)
    else:
        d = m.dense_twin("sqrt" if q is None else q, attention=twin_attention)
        rec = qs_record(m, "sqrt" if q is None else q)
    if batch is not None:
        slo_tpot = None  # a fixed batch is evaluated as given
    moe = side(m, c, context, plan, prec, routing, slo_tpot, opts, batch, output, prefill)
    den = side(d, c, context, plan, prec, "uniform", slo_tpot, opts, batch, output, prefill)
    # the maximum-throughput point: no latency target
    moe_max = side(m, c, context, plan, prec, routing, None, opts, batch, output, prefill) \
        if slo_tpot is not None else moe
    den_max = side(d, c, context, plan, prec, "uniform", None, opts, batch, output, prefill) \
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
                              output=output, prefill=prefill)
    out["break_even_q"] = q_star
    return out


def break_even_q(model: Model, cluster: Cluster, context: int, moe_tps: float, precision: Precision,
                 plan: Plan | str, slo: float | None, options: StepOptions, attention: str,
                 fixed: int | None = None, rtol: float = 1e-3, output: int = 0, prefill: str = "none") -> float:
    def ratio(q: float) -> float | None:
        try:
            twin = model.dense_twin(q, attention=attention)
        except ValueError:
            return None
        s = side(twin, cluster, context, plan, precision, "uniform", slo, options, fixed, output, prefill)
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


def same(want: dict[str, Any], got: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """The keys of ``want`` on which ``got`` differs (nan equals nan; floats exactly)."""
    bad = []
    for k, a in want.items():
        b = got[k]
        if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
            continue
        if a != b:
            bad.append((k, a, b))
    return bad
