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

from qsengine.decode.step import StepOptions, decode_step
from qsengine.packing import pack
from qsengine.packing import plans as enumerate_plans
from qsengine.routing import independent_popularity
from qsengine.specs import Cluster, Model, Plan, Precision
from qsengine.specs.loaders import as_cluster, as_model, as_precision, default_precision
from qsengine.specs.twin import qs as qs_record

TIE = 1e-3


def side(model: Model, cluster: Cluster, context: int, plan: Plan | str, precision: Precision,
         routing: Any, slo: float | None, options: StepOptions, fixed: int | None = None) -> dict[str, Any]:
    acc = cluster.accelerator
    pop = independent_popularity(routing, model.routed_experts) if model.is_moe else None
    if isinstance(plan, Plan) and not model.is_moe and (plan.ep > 1 or plan.etp is not None or plan.redundant):
        plan = dataclasses.replace(plan, ep=1, etp=None, redundant=0)  # the dense side has no expert slots
    candidates = enumerate_plans(model, cluster) if isinstance(plan, str) else [plan]
    best = None
    for p in candidates:
        pk = pack(model, cluster, context, plan=p, precision=precision)
        if model.is_moe:  # every GPU holds (E + redundant)/ep expert slots of each of its stage's MoE layers
            slots = (model.routed_experts + p.redundant) // p.ep
            per_slot = model.expert_params * precision.expert_bytes / p.expert_tp
            moe_layers = [sum(1 for i in range(s * model.num_layers // p.pp, (s + 1) * model.num_layers // p.pp)
                              if i >= model.dense_layers) for s in range(p.pp)]  # dense layers come first
            want = [slots * n * per_slot for n in moe_layers]
            got = pk.gpu_map.groupby("stage")["routed_experts"].max().tolist()
            assert np.allclose(got, want, rtol=1e-9), (p.label, got, want)
        if not pk.feasible:
            continue
        unit = p.tp if p.attn_dp else 1

        def step(units: int):
            return decode_step(model, precision, acc, p, units * unit, context, popularity=pop, options=options)

        units, limit = int(pk.admissible_batch), "hbm"
        if fixed is not None:  # the cluster batch split evenly over the replicas, if the plan holds it
            if fixed % p.dp or math.ceil(fixed // p.dp / unit) > units:
                continue
            st = decode_step(model, precision, acc, p, fixed // p.dp, context, popularity=pop, options=options)
            thr = fixed / st.time
            if best is None or thr > best["tps"] * (1 + 1e-12):
                best = dict(plan=p.label, batch=fixed, limit="fixed", tps=thr, tpot=st.time, p99=st.time_p99)
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
        if best is None or thr > best["tps"] * (1 + 1e-12):
            best = dict(plan=p.label, batch=units * unit * p.dp, limit=limit, tps=thr, tpot=st.time, p99=st.time_p99)
    return best or dict(plan="", batch=0, limit="", tps=0.0, tpot=math.nan, p99=math.nan)


def record(model: str, cluster: str, context: int, q: Any = None, dense: str | None = None,
           routing: Any = "uniform", plan: Plan | str = "auto", precision: str | None = None,
           slo_tpot: float | None = None, twin_attention: str = "same", break_even: bool = True,
           options: StepOptions | None = None, batch: int | None = None, **_: Any) -> dict[str, Any]:
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
    moe = side(m, c, context, plan, prec, routing, slo_tpot, opts, batch)
    den = side(d, c, context, plan, prec, "uniform", slo_tpot, opts, batch)
    out: dict[str, Any] = {"dense_model": d.id, "q": rec.q, "qs": rec.qs}
    for name, s in (("moe", moe), ("dense", den)):
        out.update({f"{name}_feasible": bool(s["plan"]), f"{name}_plan": s["plan"], f"{name}_batch": s["batch"],
                    f"{name}_batch_limit": s["limit"], f"{name}_tokens_per_s": s["tps"],
                    f"{name}_tpot_ms": s["tpot"] * 1e3, f"{name}_tpot_p99_ms": s["p99"] * 1e3})
    both = bool(moe["plan"]) and bool(den["plan"])
    ratio = den["tps"] / moe["tps"] if both else math.nan
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
        q_star = break_even_q(m, c, context, moe["tps"], prec, plan, slo_tpot, opts, twin_attention, batch)
    out["break_even_q"] = q_star
    return out


def break_even_q(model: Model, cluster: Cluster, context: int, moe_tps: float, precision: Precision,
                 plan: Plan | str, slo: float | None, options: StepOptions, attention: str,
                 fixed: int | None = None, rtol: float = 1e-3) -> float:
    def ratio(q: float) -> float | None:
        try:
            twin = model.dense_twin(q, attention=attention)
        except ValueError:
            return None
        s = side(twin, cluster, context, plan, precision, "uniform", slo, options, fixed)
        return s["tps"] / moe_tps if s["plan"] else 0.0

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
