"""The closed-form fast path: many ``simulate(..., microbatches=0)`` points per call.

``evaluate_closed_form(points)`` returns exactly the rows
``simulate(**point).to_record()`` would, for a whole list of points, by
running the *same* step model (:func:`qsengine.step.step_time`) over arrays of
lanes instead of one point at a time:

* per (model, cluster, precision, plan spec, options, routing) a **family** is
  built once and cached: its plan list, the per-plan packing constants
  (:func:`qsengine.packing.plan_memory`) and the per-plan step parameters
  (:class:`qsengine.step.StepParams`); the dense twins of one MoE
  (``twin_attention="same"``) form one family whose members differ only in
  their FFN width (solved for many q at once by
  :func:`qsengine.specs.twin.solve_widths`);
* a **side** (the MoE, or a dense twin) of many lanes (context, SLO[, width])
  is evaluated over lanes x plans at once: admissible batch
  (:func:`qsengine.packing.admissible_batches`, equal to ``pack``), the
  largest batch meeting the SLO (the same bisection as
  ``simulation._best_batch``, in lockstep over lanes), the step time, and the
  best plan (the same in-order "better by 1e-12" rule as ``evaluate_side``);
* the break-even q* is the same bisection as ``simulation._break_even_q``,
  vectorised over points; results that do not depend on q (the MoE side, q*)
  are computed once per distinct point-without-q.

Points the fast path does not cover go through :func:`qsengine.simulate`
itself (one at a time): an explicit ``dense`` model, ``twin_attention="gqa"``
and ``microbatches != 0``. Infeasible sides take their reason from the scalar
``evaluate_side`` (cached), so the reason strings are the packer's own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qsengine.packing import PlanMemory, admissible_batches, plan_memory
from qsengine.simulation import _verdict_text
from qsengine.specs import Cluster, Model, Plan, Precision
from qsengine.step import StepOptions, StepParams, step_params, step_time

__all__ = ["evaluate_closed_form", "covers"]

_TIE = 1e-3  # simulation._verdict's tie tolerance
_DEFAULT_OPTIONS = StepOptions()


# ---------------------------------------------------------------------------
# families: everything per (model, cluster, precision, plan spec, options, routing)
# ---------------------------------------------------------------------------


@dataclass
class _Family:
    model: Model  # the MoE, or the width-1 twin standing for every twin of one MoE
    cluster: Cluster
    precision: Precision
    plans: tuple[Plan, ...]
    memory: PlanMemory
    params: StepParams  # one lane per plan
    pi: np.ndarray | None  # inclusion probabilities (None: uniform)
    dp: np.ndarray  # replicas per plan


_FAMILIES: dict[tuple, _Family] = {}
_TWINS: dict[tuple, tuple[Model, int, int, int, int]] = {}
_REASONS: dict[tuple, str] = {}


def _canon(x: Any) -> Any:
    """A hashable key for a spec value (dataclasses are frozen and hashable)."""
    try:
        hash(x)
        return x
    except TypeError:
        return repr(x)


def _family(model: Model, cluster: Cluster, precision: Precision, plan: Plan | str, options: StepOptions,
            routing: Any) -> _Family:
    from qsengine.routing import independent_popularity

    key = (model, cluster, precision, plan, options, _canon(routing) if model.is_moe else None)
    fam = _FAMILIES.get(key)
    if fam is not None:
        return fam
    if isinstance(plan, str):
        plan_list = None
    elif not model.is_moe and (plan.ep > 1 or plan.etp is not None):
        plan_list = [dataclasses.replace(plan, ep=1, etp=None)]
    else:
        plan_list = [plan]
    pm = plan_memory(model, cluster, precision, plan_list)
    acc = cluster.accelerator
    params = StepParams.stack([step_params(model, precision, acc, p, options) for p in pm.plans]) if pm.plans \
        else None
    pi = None
    if model.is_moe:
        from qsengine.step import _inclusion_probabilities

        pop = independent_popularity(routing, model.routed_experts)
        pi = None if pop is None else _inclusion_probabilities(pop, model.top_k)
    fam = _Family(model=model, cluster=cluster, precision=precision, plans=pm.plans, memory=pm, params=params,
                  pi=pi, dp=np.array([float(p.dp) for p in pm.plans]))
    if len(_FAMILIES) > 4096:
        _FAMILIES.clear()
    _FAMILIES[key] = fam
    return fam


def _twin_line(model: Model) -> tuple[Model, int, int, int, int]:
    """(width-1 twin, active params at width 1, active per unit width, FFN
    params at width 1, FFN params per unit width): the twins of ``model``
    (attention "same") are affine in their FFN width."""
    got = _TWINS.get(model)
    if got is None:
        from qsengine.specs.twin import _dense

        def build(width: int) -> Model:
            return _dense(model, ident=f"{model.id}-dense", name=f"{model.name} dense twin", notes="",
                          attention=model.attention, num_layers=model.num_layers, hidden=model.hidden_size,
                          width=width, gated=model.gated_ffn, bias=model.ffn_bias,
                          encoder_layers=model.encoder_layers, cross=model.cross_attention)

        m1, m2 = build(1), build(2)
        got = (m1, m1.active_params, m2.active_params - m1.active_params, m1.dense_ffn_params,
               m2.dense_ffn_params - m1.dense_ffn_params)
        _TWINS[model] = got
    return got


def _twin_widths(model: Model, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(width, valid, ffn params) of the twins of ``model`` for many q."""
    from qsengine.specs.twin import solve_widths, twin_width_ok

    _, a1, slope, f1, fslope = _twin_line(model)
    target = q * model.active_params
    width, _ = solve_widths(np.full(q.shape, a1), np.full(q.shape, slope), target)
    ok = twin_width_ok(a1, slope, width, target)
    ffn = f1 + (np.maximum(width, 1) - 1) * fslope
    return width, ok, ffn


# ---------------------------------------------------------------------------
# one side over many lanes
# ---------------------------------------------------------------------------


@dataclass
class _Side:
    feasible: np.ndarray
    plan: np.ndarray  # plan index (-1 if infeasible)
    batch: np.ndarray  # per replica
    limit: np.ndarray  # 1 = slo, 0 = hbm
    time: np.ndarray
    p99: np.ndarray
    tps: np.ndarray  # cluster tokens/s
    why: np.ndarray  # infeasible lanes: plan index whose reason evaluate_side reports
    why_slo: np.ndarray  # True: that plan misses the TPOT target at batch 1; False: its packing fails


def _side(fam: _Family, context: np.ndarray, slo: np.ndarray, ffn_params: np.ndarray | None = None) -> _Side:
    """Best plan and batch of one family for many lanes (context, slo
    (nan = none)[, twin FFN params]): ``simulation.evaluate_side`` with
    ``microbatches=0``, over arrays."""
    n = context.shape[0]
    P = len(fam.plans)
    out = _Side(np.zeros(n, bool), np.full(n, -1), np.zeros(n, np.int64), np.zeros(n, np.int8), np.zeros(n),
                np.zeros(n), np.zeros(n), np.full(n, -1), np.zeros(n, bool))
    if P == 0 or n == 0:
        return out
    lane = np.repeat(np.arange(n), P)
    pidx = np.tile(np.arange(P), n)
    ctx = context[lane]
    ffn_bytes = None if ffn_params is None else ffn_params[lane] * fam.precision.weight_bytes
    adm, _ = admissible_batches(fam.memory, pidx, ctx, ffn_bytes)
    ok = adm >= 1  # pack(...).feasible: weights fit and one sequence fits
    rows = np.flatnonzero(ok)
    sp = fam.params.take(pidx[rows])
    if ffn_params is not None:
        sp = sp.replace(ffn_params=ffn_params[lane[rows]].astype(np.float64))
    c = ctx[rows].astype(np.float64)
    s = slo[lane[rows]]
    pi = fam.pi

    def step(sub: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
        return step_time(sp.take(sub), b.astype(np.float64), c[sub], pi=pi, uniform=pi is None)

    K = rows.size
    batch = adm[rows].copy()
    limit = np.zeros(K, np.int8)
    top = step(np.arange(K), batch)
    time, p99 = top["time"], top["p99"]
    valid = np.ones(K, bool)
    has_slo = ~np.isnan(s)
    over = np.flatnonzero(has_slo & ~(time <= s))
    if over.size:
        limit[over] = 1
        first = step(over, np.ones(over.size, np.int64))
        miss = first["time"] > s[over]
        valid[over[miss]] = False
        act = over[~miss]
        lo = np.ones(act.size, np.int64)
        hi = batch[act].copy()
        while True:
            live = np.flatnonzero(hi - lo > 1)
            if live.size == 0:
                break
            mid = (lo[live] + hi[live]) // 2
            meets = step(act[live], mid)["time"] <= s[act[live]]
            lo[live] = np.where(meets, mid, lo[live])
            hi[live] = np.where(meets, hi[live], mid)
        if act.size:
            final = step(act, lo)
            batch[act] = lo
            time[act] = final["time"]
            p99[act] = final["p99"]
    with np.errstate(divide="ignore", invalid="ignore"):
        thr = np.where(time > 0, batch / time, 0.0) * fam.dp[pidx[rows]]
    # in-order selection: a plan replaces the best only if better by 1e-12 (relative)
    T = np.full((n, P), np.nan)
    T[lane[rows[valid]], pidx[rows[valid]]] = thr[valid]
    where = np.full((n, P), -1)
    where[lane[rows], pidx[rows]] = np.arange(K)
    best = np.full(n, np.nan)
    arg = np.full(n, -1)
    for j in range(P):
        t = T[:, j]
        better = ~np.isnan(t) & (np.isnan(best) | (t > best * (1 + 1e-12)))
        best = np.where(better, t, best)
        arg = np.where(better, j, arg)
    feas = arg >= 0
    k = np.maximum(where[np.arange(n), np.maximum(arg, 0)], 0)
    # the reason evaluate_side gives when no plan is feasible: the first plan
    # that packs but misses the SLO at batch 1, else the packing-infeasible plan
    # with the least weight on its fullest GPU (first of equals)
    slo_fail = np.zeros((n, P), bool)
    slo_fail[lane[rows[~valid]], pidx[rows[~valid]]] = True
    need = np.where(ok, np.inf, fam.memory.weight_total.max(axis=1)[pidx]).reshape(n, P)
    out.why_slo = slo_fail.any(axis=1)
    out.why = np.where(out.why_slo, np.argmax(slo_fail, axis=1), np.argmin(need, axis=1))
    if K == 0:
        return out
    out.feasible = feas
    out.plan = arg
    out.batch = np.where(feas, batch[k], 0)
    out.limit = np.where(feas, limit[k], 0)
    out.time = np.where(feas, time[k], np.nan)
    out.p99 = np.where(feas, p99[k], np.nan)
    out.tps = np.where(feas, best, 0.0)
    return out


# ---------------------------------------------------------------------------
# break-even q*, vectorised over points
# ---------------------------------------------------------------------------


def _break_even(groups: dict[tuple, list[int]], lanes: list[tuple], moe_tps: np.ndarray, rtol: float = 1e-3
                ) -> np.ndarray:
    """``simulation._break_even_q`` for every lane at once (nan = None).

    ``lanes[i]`` = (model, cluster, precision, plan, options, context, slo);
    ``groups`` maps a twin family key to its lane indices."""
    n = len(lanes)
    sparsity = np.array([ln[0].sparsity for ln in lanes])

    def ratio(idx: np.ndarray, q: np.ndarray) -> np.ndarray:
        """ratio(q) for lanes idx: nan = twin cannot be built, 0 = infeasible."""
        r = np.full(idx.size, np.nan)
        for key, members in groups.items():
            sel = np.flatnonzero(np.isin(idx, members))
            if sel.size == 0:
                continue
            model, cluster, precision, plan, options = key
            width, ok, ffn = _twin_widths(model, q[sel])
            fam = _family(_twin_line(model)[0], cluster, precision, plan, options, "uniform")
            lanes_ok = sel[ok]
            ctx = np.array([lanes[i][5] for i in idx[lanes_ok]], dtype=np.int64)
            slo = np.array([lanes[i][6] for i in idx[lanes_ok]], dtype=np.float64)
            side = _side(fam, ctx, slo, ffn[ok])
            r[lanes_ok] = np.where(side.feasible, side.tps / moe_tps[idx[lanes_ok]], 0.0)
        return r

    every = np.arange(n)
    lo = np.ones(n)
    hi = 1.0 / sparsity
    r_lo = ratio(every, lo)
    r_hi = ratio(every, hi)
    while True:  # smallest twin that can be built
        grow = np.flatnonzero(np.isnan(r_lo) & (lo < hi))
        if grow.size == 0:
            break
        lo[grow] = lo[grow] * 1.5
        r_lo[grow] = ratio(grow, lo[grow])
    widen = np.ones(n, bool)
    for _ in range(4):  # the dense side may still win at the MoE's full size
        widen &= ~(np.isnan(r_hi) | (r_hi < 1.0))
        w = np.flatnonzero(widen)
        if w.size == 0:
            break
        hi[w] = hi[w] * 2.0
        r_hi[w] = ratio(w, hi[w])
    none = np.isnan(r_lo) | np.isnan(r_hi) | (r_lo < 1.0) | (r_hi >= 1.0)
    act = ~none
    for _ in range(60):
        act &= ~(hi / lo - 1.0 <= rtol)
        a = np.flatnonzero(act)
        if a.size == 0:
            break
        mid = np.sqrt(lo[a] * hi[a])
        r = ratio(a, mid)
        up = ~np.isnan(r) & (r >= 1.0)
        lo[a] = np.where(up, mid, lo[a])
        hi[a] = np.where(up, hi[a], mid)
    return np.where(none, np.nan, np.sqrt(lo * hi))


# ---------------------------------------------------------------------------
# the entry point
# ---------------------------------------------------------------------------


def covers(point: dict[str, Any]) -> bool:
    """Whether the fast path computes this point itself (else it calls simulate)."""
    return (point.get("microbatches", "auto") == 0 and point.get("dense") is None
            and point.get("twin_attention", "same") == "same")


def _scalar(point: dict[str, Any]) -> dict[str, Any]:
    from qsengine.simulation import simulate

    return simulate(**point).to_record()


def evaluate_closed_form(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``[simulate(**p).to_record() for p in points]`` for closed-form points
    (``microbatches=0``), vectorised. Each point is a dict of simulate's
    keyword arguments (``model``, ``cluster``, ``context``, ``q``, ``routing``,
    ``plan``, ``precision``, ``slo_tpot``, ``twin_attention``, ``break_even``,
    ``options``; names or specs). Points the fast path does not cover
    (:func:`covers`) are passed to simulate one by one."""
    from qsengine.specs.loaders import as_cluster, as_model, as_precision
    from qsengine.specs.twin import qs as qs_record
    from qsengine.specs.twin import resolve_q

    rows: list[dict[str, Any] | None] = [None] * len(points)
    norm: list[tuple] = []
    # resolve each distinct raw value once (names hash fast; spec objects by identity)
    seen: dict[tuple, Any] = {}

    def resolve(kind: str, raw: Any, load) -> Any:
        k = (kind, raw) if raw is None or isinstance(raw, (str, int, float)) else (kind, id(raw))
        got = seen.get(k)
        if got is None:
            got = seen[k] = (load(raw), raw)  # keep raw alive: its id stays unique
        return got[0]

    for i, pt in enumerate(points):
        if not covers(pt):
            rows[i] = _scalar(pt)
            continue
        model = resolve("model", pt["model"], as_model)
        cluster = resolve("cluster", pt["cluster"], as_cluster)
        precision = resolve("precision", pt.get("precision"), as_precision)
        context = pt["context"]
        slo = pt.get("slo_tpot")
        options = pt.get("options") or _DEFAULT_OPTIONS
        if (isinstance(context, bool) or not isinstance(context, (int, np.integer)) or context < 1
                or not model.is_moe or (slo is not None and not (isinstance(slo, (int, float)) and slo > 0
                                                                  and math.isfinite(slo)))):
            rows[i] = _scalar(pt)  # simulate raises the error it raises
            continue
        q = pt.get("q")
        q_value = "sqrt" if q is None else q
        norm.append((i, model, cluster, precision, int(context), q_value, pt.get("routing", "uniform"),
                     pt.get("plan", "auto"), None if slo is None else float(slo), options,
                     bool(pt.get("break_even", True))))
    if not norm:
        return rows  # type: ignore[return-value]
    # small integer codes for the specs: keys below hash ints, not dataclasses
    codes: dict[int, int] = {}

    def code(obj: Any) -> int:
        c = codes.get(id(obj))
        if c is None:
            c = codes[id(obj)] = len(codes)
        return c

    specs: dict[tuple, tuple] = {}

    # ---- MoE side: once per distinct (model, cluster, precision, plan, options, routing, context, slo)
    moe_keys: dict[tuple, int] = {}
    moe_of = []
    for (_, model, cluster, precision, context, _, routing, plan, slo, options, _) in norm:
        sk = (code(model), code(cluster), code(precision), _canon(plan), code(options), _canon(routing))
        if sk not in specs:
            specs[sk] = (model, cluster, precision, plan, options, _canon(routing))
        k = sk + (context, slo)
        moe_of.append(moe_keys.setdefault(k, len(moe_keys)))
    moe_list = [specs[k[:6]] + k[6:] for k in moe_keys]
    moe = _sides_by_family(moe_list, lambda k: _family(k[0], k[1], k[2], k[3], k[4], _routing_of(k[5], norm)),
                           lambda k: (k[6], k[7]))

    # ---- dense twin: once per distinct (model, q, cluster, precision, plan, options, context, slo)
    qvals: dict[tuple, float] = {}
    dense_keys: dict[tuple, int] = {}
    dense_of = []
    for (_, model, cluster, precision, context, q_value, _, plan, slo, options, _) in norm:
        qk = (code(model), q_value)
        if qk not in qvals:
            qvals[qk] = resolve_q(model, q_value)
        sk = (code(model), code(cluster), code(precision), _canon(plan), code(options))
        if sk not in specs:
            specs[sk] = (model, cluster, precision, plan, options)
        k = sk + (qvals[qk], context, slo)
        dense_of.append(dense_keys.setdefault(k, len(dense_keys)))
    dense_list = [(specs[k[:5]][0], k[5]) + specs[k[:5]][1:] + k[6:] for k in dense_keys]
    dense = _dense_sides(dense_list)

    # ---- break-even q*: once per distinct MoE key (it does not depend on q)
    be_keys: dict[int, int] = {}
    for j, (*_, be) in enumerate(norm):
        if be and moe.feasible[moe_of[j]]:
            be_keys.setdefault(moe_of[j], len(be_keys))
    be_lanes = [(moe_list[m][0], moe_list[m][1], moe_list[m][2], moe_list[m][3], moe_list[m][4], moe_list[m][6],
                 np.nan if moe_list[m][7] is None else moe_list[m][7]) for m in be_keys]
    groups: dict[tuple, list[int]] = {}
    gkeys: dict[tuple, tuple] = {}
    for i, ln in enumerate(be_lanes):
        ck = (code(ln[0]), code(ln[1]), code(ln[2]), _canon(ln[3]), code(ln[4]))
        gkeys.setdefault(ck, ln[:5])
        groups.setdefault(gkeys[ck], []).append(i)
    q_star = _break_even(groups, be_lanes, moe.tps[list(be_keys)]) if be_lanes else np.zeros(0)

    # ---- rows
    qs_cache: dict[tuple, Any] = {}
    for j, (i, model, cluster, precision, context, q_value, routing, plan, slo, options, be) in enumerate(norm):
        qk = (code(model), q_value)
        rec = qs_cache.get(qk)
        if rec is None:
            rec = qs_cache[qk] = qs_record(model, q_value)
        m, d = moe_of[j], dense_of[j]
        mk, dk = moe_list[m], dense_list[d]
        qv = qvals[qk]
        g = cluster.num_gpus
        row: dict[str, Any] = {
            "model": model.id,
            "dense_model": f"{model.id}-dense-q{qv:.2f}",
            "cluster": cluster.label,
            "gpus": g,
            "context": context,
            "s": rec.s,
            "q": rec.q,
            "qs": rec.qs,
            "qs_verdict": _verdict_text(rec.verdict),
        }
        mf, df = bool(moe.feasible[m]), bool(dense.feasible[d])
        ratio = float(dense.tps[d] / moe.tps[m]) if (mf and df) else None
        if not mf and not df:
            verdict = "neither"
        elif not mf:
            verdict = "dense-only"
        elif not df:
            verdict = "moe-only"
        elif abs(ratio - 1.0) <= _TIE:  # type: ignore[operator]
            verdict = "tie"
        else:
            verdict = "dense" if ratio > 1 else "moe"  # type: ignore[operator]
        agrees = None
        if ratio is not None and verdict != "tie":
            agrees = (verdict == "dense") == (rec.qs < 1.0)
        qstar = math.nan
        if be and mf:
            v = q_star[be_keys[m]]
            qstar = float(v)
        row.update(ratio=ratio if ratio is not None else math.nan, verdict=verdict, agrees_with_qs=agrees,
                   break_even_q=qstar)
        for side, res, k, feas, model_for_reason in (("moe", moe, m, mf, None), ("dense", dense, d, df, q_value)):
            fam_plans = moe.plans[k] if side == "moe" else dense.plans[k]
            row[f"{side}_feasible"] = feas
            if feas:
                plan_obj = fam_plans[int(res.plan[k])]
                tps = float(res.tps[k])
                row[f"{side}_reason"] = ""
                row[f"{side}_plan"] = plan_obj.label
                row[f"{side}_batch"] = int(res.batch[k]) * plan_obj.dp
                row[f"{side}_batch_limit"] = "slo" if res.limit[k] else "hbm"
                row[f"{side}_tokens_per_s"] = tps
                row[f"{side}_tokens_per_s_per_gpu"] = tps / g
                row[f"{side}_tpot_ms"] = float(res.time[k]) * 1e3
                row[f"{side}_tpot_p99_ms"] = float(res.p99[k]) * 1e3
            else:
                reason = _infeasible_reason(side, res, k, model, cluster, precision, context, q_value, slo)
                row[f"{side}_reason"] = reason
                row[f"{side}_plan"] = ""
                row[f"{side}_batch"] = 0
                row[f"{side}_batch_limit"] = ""
                row[f"{side}_tokens_per_s"] = 0.0
                row[f"{side}_tokens_per_s_per_gpu"] = 0.0
                row[f"{side}_tpot_ms"] = math.nan
                row[f"{side}_tpot_p99_ms"] = math.nan
        rows[i] = row
    return rows  # type: ignore[return-value]


def _infeasible_reason(side: str, res: "_Sides", k: int, model: Model, cluster: Cluster, precision: Precision,
                       context: int, q_value: Any, slo: float | None) -> str:
    """evaluate_side's reason for an infeasible side (the packer's own words)."""
    from qsengine.packing import pack

    plans = res.plans[k]
    if not plans:
        m = model if side == "moe" else model.dense_twin(q_value)
        return f"no valid parallel plan for {m.id} on {cluster.label}"
    plan = plans[int(res.why[k])]
    if res.why_slo[k]:
        return f"even batch 1 misses the TPOT target {slo * 1e3:.3g} ms (plan {plan.label})"
    key = (side, model, q_value if side == "dense" else None, cluster, precision, context, plan)
    got = _REASONS.get(key)
    if got is None:
        m = model if side == "moe" else model.dense_twin(q_value)
        got = pack(m, cluster, context, plan=plan, precision=precision).reason
        if len(_REASONS) > 100_000:
            _REASONS.clear()
        _REASONS[key] = got
    return got


def _routing_of(canon_routing: Any, norm: list[tuple]) -> Any:
    """The routing value (as given) whose canonical key is ``canon_routing``."""
    for t in norm:
        if _canon(t[6]) == canon_routing:
            return t[6]
    return canon_routing  # pragma: no cover


@dataclass
class _Sides:
    feasible: np.ndarray
    plan: np.ndarray
    batch: np.ndarray
    limit: np.ndarray
    time: np.ndarray
    p99: np.ndarray
    tps: np.ndarray
    why: np.ndarray
    why_slo: np.ndarray
    plans: list


def _empty_sides(n: int) -> _Sides:
    return _Sides(np.zeros(n, bool), np.full(n, -1), np.zeros(n, np.int64), np.zeros(n, np.int8), np.zeros(n),
                  np.zeros(n), np.zeros(n), np.full(n, -1), np.zeros(n, bool), [()] * n)


def _fill(out: _Sides, idx: np.ndarray, side: _Side, plans: tuple) -> None:
    out.feasible[idx] = side.feasible
    out.plan[idx] = side.plan
    out.batch[idx] = side.batch
    out.limit[idx] = side.limit
    out.time[idx] = side.time
    out.p99[idx] = side.p99
    out.tps[idx] = side.tps
    out.why[idx] = side.why
    out.why_slo[idx] = side.why_slo
    for i in idx:
        out.plans[i] = plans


def _sides_by_family(keys: list[tuple], family_of, lane_of) -> _Sides:
    out = _empty_sides(len(keys))
    by: dict[int, tuple[_Family, list[int]]] = {}
    for i, k in enumerate(keys):
        fam = family_of(k)
        by.setdefault(id(fam), (fam, []))[1].append(i)
    for fam, members in by.values():
        idx = np.array(members)
        ctx = np.array([lane_of(keys[i])[0] for i in members], dtype=np.int64)
        slo = np.array([np.nan if lane_of(keys[i])[1] is None else lane_of(keys[i])[1] for i in members])
        _fill(out, idx, _side(fam, ctx, slo), fam.plans)
    return out


def _dense_sides(keys: list[tuple]) -> _Sides:
    """keys: (model, q, cluster, precision, plan, options, context, slo)."""
    out = _empty_sides(len(keys))
    by: dict[tuple, list[int]] = {}
    spec: dict[tuple, tuple] = {}
    for i, k in enumerate(keys):
        ik = (id(k[0]), id(k[2]), id(k[3]), _canon(k[4]), id(k[5]))
        if ik not in spec:
            spec[ik] = (k[0], k[2], k[3], k[4], k[5])
        by.setdefault(ik, []).append(i)
    for ik, members in by.items():
        model, cluster, precision, plan, options = spec[ik]
        idx = np.array(members)
        q = np.array([keys[i][1] for i in members])
        width, ok, ffn = _twin_widths(model, q)
        if not ok.all():  # simulate builds the twin before anything else: same error
            bad = int(idx[~ok][0])
            model.dense_twin(keys[bad][1])
        fam = _family(_twin_line(model)[0], cluster, precision, plan, options, "uniform")
        ctx = np.array([keys[i][6] for i in members], dtype=np.int64)
        slo = np.array([np.nan if keys[i][7] is None else keys[i][7] for i in members])
        _fill(out, idx, _side(fam, ctx, slo, ffn), fam.plans)
    return out
