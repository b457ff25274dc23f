"""One side (the MoE or the dense model) of many lanes at its best plan and
batch: the families of plans (cached per model or twin line, cluster,
precision, plan spec, options and routing law), the admission, the latency
target's bisection or a fixed batch, and the in-order best plan, over lanes x
plans at once."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qsengine._groups import split as _split
from qsengine.decode.prefill import Requests, admission_context, end_to_end, prefill_ctx_flops, prefill_time
from qsengine import _core
from qsengine.decode.params import StepOptions, StepParams, step_params
from qsengine.decode.step import routing_law
from qsengine.packing import PlanMemory, admissible_batches, plan_memory
from qsengine.specs import Cluster, Model, Plan, Precision

__all__ = ["Family", "family", "Side", "LIMITS", "in_order_best", "idle_candidates", "candidate_plans"]

_BLOCK = 1 << 14  # rows per step-model call: its ~150 temporaries stay in cache
_DEFAULT_OPTIONS = StepOptions()


# ---------------------------------------------------------------------------
# families: everything per (model, cluster, precision, plan spec, options, law)
# ---------------------------------------------------------------------------


@dataclass
class Family:
    """The plans of one model (or twin line) on one cluster and what the
    pipeline needs of each: packing constants, step parameters, replicas,
    and the admission unit (sequences per replica per admitted sequence:
    ``tp`` under attention data-parallelism, where the packer admits per
    GPU, else 1)."""

    model: Model  # the MoE, an explicit dense model, or the width-1 twin of a twin line
    cluster: Cluster
    precision: Precision
    plans: tuple[Plan, ...]
    memory: PlanMemory
    params: StepParams | None  # one lane per plan
    pi: np.ndarray | None  # inclusion probabilities (None: uniform)
    law: tuple  # identity of the routing law (families of one law may be stacked)
    dp: np.ndarray  # replicas per plan
    unit: np.ndarray  # admission unit per plan
    override: bool  # lanes carry their own dense-FFN parameters (twin lines)
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=object))  # Plan.label per plan
    dp_int: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # replicas per plan
    gpus: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # GPUs each plan uses


_FAMILIES: dict[tuple, Family] = {}


def _canon(x: Any) -> Any:
    """A hashable key for a spec value (dataclasses are frozen and hashable)."""
    try:
        hash(x)
        return x
    except TypeError:
        return repr(x)


def _law(model: Model, routing: Any, closed_form: bool) -> tuple[tuple, np.ndarray | None]:
    """(key, inclusion probabilities) of the closed-form routing law: exact for
    independent routing (``closed_form``), the independent proxy that ranks
    plans before a Monte Carlo otherwise; (None, None) for a dense model."""
    if not model.is_moe:
        return (None,), None
    from qsengine.decode.straggler import _inclusion_probabilities
    from qsengine.routing import independent_popularity, proxy_popularity

    pop = (independent_popularity if closed_form else proxy_popularity)(routing, model.routed_experts)
    if pop is None:
        return ("uniform", model.routed_experts, model.top_k), None
    pi = _inclusion_probabilities(pop, model.top_k)
    return ("pi", model.routed_experts, model.top_k, pi.tobytes()), pi


def idle_candidates(num_gpus: int) -> tuple[int, ...]:
    """GPU counts plan "auto" deploys on a cluster of ``num_gpus``: all of them,
    and, when that is not a power of two, the largest power of two below it
    (the rest idle). Expert counts are powers of two (8 … 256, plus any
    redundant slots a plan adds), so a cluster of 72 or 12 GPUs may serve more
    on 64 or 8 of them with a wider expert parallelism than on all of them;
    idle GPUs still count in tokens/s per GPU of the cluster."""
    n = int(num_gpus)
    p2 = 1 << (n.bit_length() - 1)
    return (n,) if p2 == n else (n, p2)


def candidate_plans(model: Model, cluster: Cluster) -> list[Plan]:
    """Plan "auto"'s candidates: every valid plan on all the cluster's GPUs,
    then on each smaller count of :func:`idle_candidates` (in that order, so a
    plan that leaves GPUs idle wins only when strictly better)."""
    from qsengine.packing import plans

    out: list[Plan] = []
    for g in idle_candidates(cluster.num_gpus):
        out.extend(plans(model, g))
    return out


def family(model: Model, cluster: Cluster, precision: Precision, plan: Plan | str, options: StepOptions,
           routing: Any = "uniform", closed_form: bool = True, override: bool = False) -> Family:
    """The (cached) :class:`Family` of ``model`` on ``cluster``: every valid
    plan for ``plan="auto"``, else the one plan (a dense model ignores its
    expert degrees)."""
    key = (model, cluster, precision, plan, options, _canon(routing) if model.is_moe else None,
           closed_form if model.is_moe else None, override)
    fam = _FAMILIES.get(key)
    if fam is not None:
        return fam
    if isinstance(plan, str):
        plan_list = candidate_plans(model, cluster)
    elif not model.is_moe and (plan.ep > 1 or plan.etp is not None or plan.redundant > 0):
        plan_list = [dataclasses.replace(plan, ep=1, etp=None, redundant=0)]
    else:
        plan_list = [plan]
    pm = plan_memory(model, cluster, precision, plan_list, draft_module=options.draft_tokens > 0,
                     draft_tokens=options.draft_tokens)
    acc = cluster.accelerator
    params = StepParams.stack([step_params(model, precision, acc, p, options) for p in pm.plans]) if pm.plans \
        else None
    law, pi = _law(model, routing, closed_form)
    fam = Family(model=model, cluster=cluster, precision=precision, plans=pm.plans, memory=pm, params=params,
                 pi=pi, law=law, dp=np.array([float(p.dp) for p in pm.plans]),
                 unit=np.array([p.tp if p.attn_dp else 1 for p in pm.plans], dtype=np.int64), override=override,
                 labels=np.array([p.label for p in pm.plans], dtype=object),
                 dp_int=np.array([p.dp for p in pm.plans], dtype=np.int64),
                 gpus=np.array([p.num_gpus for p in pm.plans], dtype=np.int64))
    if len(_FAMILIES) > 4096:
        _FAMILIES.clear()
    _FAMILIES[key] = fam
    return fam


# ---------------------------------------------------------------------------
# one side over many lanes
# ---------------------------------------------------------------------------


def _lanes(fill: Any, dtype: Any = np.float64, default: Any = None) -> Any:
    """A :class:`Side` field whose lanes start at ``fill`` (``dtype``) in :meth:`Side.empty`;
    required unless ``default`` (a factory) is given."""
    meta = {"empty": (fill, dtype)}
    if default is None:
        return field(metadata=meta)
    return field(default_factory=default, metadata=meta)


@dataclass
class Side:
    """One side (MoE or dense) of many lanes at its best plan and batch.

    ``plan``: index into the lane's family's plans (-1 if infeasible);
    ``batch``: sequences per replica; ``limit``: 1 = the TPOT target capped
    the batch, 0 = HBM; ``time``/``p99``: mean and p99 TPOT (s), the TPOT
    a user sees (colocated prefill: the decode step plus the amortised
    prefill stall ``batch · stall``); ``tps``: cluster decode tokens/s
    (``batch · replicas`` / the decode step's mean, stalls not counted).
    Infeasible lanes: ``why`` = the plan whose reason is reported, ``why_kind`` 1 (it misses the TPOT target at the smallest
    batch), 2 (it packs but cannot hold the fixed batch: it admits
    ``why_adm`` sequences per replica) or 0 (it does not pack; ``why_fit``:
    its weights fit, so the KV cache does not).

    ``max_*``: the maximum-throughput operating point, with no latency target
    (each plan at the largest batch its HBM holds; a fixed batch where one is
    given): plan index (-1 if nothing packs), batch per replica, mean and p99
    TPOT and cluster tokens/s; equal to the chosen point where the target
    does not bind."""

    # Each field declares the value and dtype of its lanes in Side.empty
    # (_lanes), so a new field cannot be left out of empty() or _SideSet.fill.
    feasible: np.ndarray = _lanes(False, np.bool_)
    plan: np.ndarray = _lanes(-1, np.int64)
    batch: np.ndarray = _lanes(0, np.int64)
    limit: np.ndarray = _lanes(0, np.int8)
    time: np.ndarray = _lanes(np.nan)
    p99: np.ndarray = _lanes(np.nan)
    tps: np.ndarray = _lanes(0.0)
    why: np.ndarray = _lanes(-1, np.int64)
    why_kind: np.ndarray = _lanes(0, np.int8)
    why_fit: np.ndarray = _lanes(False, np.bool_)
    why_adm: np.ndarray = _lanes(0, np.int64)
    max_plan: np.ndarray = _lanes(-1, np.int64)
    max_batch: np.ndarray = _lanes(0, np.int64)
    max_time: np.ndarray = _lanes(np.nan)
    max_p99: np.ndarray = _lanes(np.nan)
    max_tps: np.ndarray = _lanes(0.0)
    #: prefill tokens/s at the maximum-throughput point (as ``pf``)
    max_pf: np.ndarray = _lanes(np.nan)
    #: prefill tokens/s (cluster-equivalent: per GPU x the cluster's GPUs) of a request workload: at the chosen
    #: plan ("colocated") or at the prefill pool's best plan ("disaggregated"); nan without prefill
    pf: np.ndarray = _lanes(np.nan, default=lambda: np.zeros(0))
    #: colocated prefill: stall per running sequence and decode step at the chosen plan, t_pf / O (s); 0 otherwise
    stall: np.ndarray = _lanes(0.0, default=lambda: np.zeros(0))
    #: the same at the maximum-throughput point's plan
    max_stall: np.ndarray = _lanes(0.0, default=lambda: np.zeros(0))
    #: tokens admitted per sequence at the chosen plan (the admission context; a length distribution's
    #: mean cache plus its margin, prefill.admission_context); 0 if infeasible
    admit: np.ndarray = _lanes(0, np.int64, default=lambda: np.zeros(0, np.int64))

    @classmethod
    def empty(cls, n: int) -> "Side":
        """``n`` lanes, each field at its declared empty value (infeasible, no plan)."""
        return cls(**{f.name: np.full(n, *f.metadata["empty"]) for f in dataclasses.fields(cls)})


#: every Side field: what _SideSet.fill copies per group
_SIDE_FIELDS = tuple(f.name for f in dataclasses.fields(Side))
#: ``Side.limit`` codes and their record text
LIMITS = ("hbm", "slo", "fixed", "cap")


def capped_units(adm: np.ndarray, cap: np.ndarray, attn_dp: np.ndarray, tp: np.ndarray, unit: np.ndarray
                 ) -> np.ndarray:
    """Admission units per replica under a serving engine's cap of ``cap``
    sequences per scheduler (0: none; :mod:`qsengine.specs.serving`): a replica
    runs one scheduler, or one per attention rank under attention data-parallelism
    (tp of them), so it holds at most cap x schedulers sequences, i.e.
    ``cap x schedulers // unit`` admission units (at least one)."""
    sched = np.where(attn_dp > 0, tp, 1.0)
    limit = np.maximum((cap * sched) // unit, 1).astype(np.int64)
    return np.where(cap > 0, np.minimum(adm, limit), adm)


def _side(fams: "Family | Sequence[Family]", context: np.ndarray, slo: np.ndarray,
          ffn_params: np.ndarray | None = None, family: np.ndarray | None = None,
          fixed: np.ndarray | None = None, requests: Requests | None = None, cap: np.ndarray | None = None
          ) -> Side:
    """Best plan and batch for many lanes (context, slo (nan = none)[, dense
    FFN parameters][, fixed batch per replica (0 = none)]). Lane i belongs to
    ``fams[family[i]]`` (one family: all lanes); the families must share their
    routing law (dense families always do); ``ffn_params`` is read for
    families with ``override``. The TPOT target holds on the p99 step time.
    A fixed batch is evaluated on every plan that can hold it. With
    ``requests`` (:class:`~qsengine.decode.prefill.Requests`), ``context`` is
    the admission context (the peak cache), steps read ``requests.read``
    tokens, and prefill is costed: "colocated" lanes add the amortised
    prefill stall to their TPOT (mean and p99, so the target holds on it) and
    choose the plan by end-to-end throughput, "disaggregated" lanes get the prefill pool's best
    plan over every plan that packs (``Side.pf``). ``cap``: the serving
    engine's sequences per scheduler per lane (0 = none, :func:`capped_units`;
    a capped batch reports ``limit`` 3, "cap")."""
    if isinstance(fams, Family):
        fams = [fams]
    n = context.shape[0]
    fam_of = np.zeros(n, np.int64) if family is None else np.asarray(family, dtype=np.int64)
    out = Side.empty(n)
    counts = np.array([len(f.plans) for f in fams], dtype=np.int64)
    if n == 0 or not counts.any():
        return out
    if any(f.law != fams[0].law for f in fams):
        raise ValueError("_side: stacked families must share their routing law (pi, experts, top-k)")
    # lanes sorted by family: each family's rows (lane x its plans) are one slice
    order = np.argsort(fam_of, kind="stable")
    per_lane = counts[fam_of[order]]
    lane = order[np.repeat(np.arange(n), per_lane)]
    start = np.cumsum(per_lane) - per_lane
    pidx = np.arange(lane.size) - np.repeat(start, per_lane)  # plan index within the lane's family
    fam_row = fam_of[lane]
    ctx = context[lane]
    adm = np.zeros(lane.size, np.int64)
    fit = np.zeros(lane.size, bool)
    fullest = np.zeros(lane.size)  # weight bytes on the row's fullest GPU
    bounds = np.searchsorted(fam_row, np.arange(len(fams) + 1)) if len(fams) > 1 else np.array([0, lane.size])
    for f, fam in enumerate(fams):
        sl = slice(bounds[f], bounds[f + 1])
        if sl.start < sl.stop:
            fb = None
            if fam.override:
                fb = ffn_params[lane[sl]] * fam.precision.weight_bytes  # type: ignore[index]
            adm[sl], fit[sl], fullest[sl] = admissible_batches(fam.memory, pidx[sl], ctx[sl], fb, fullest=True)
    if requests is not None and bool((requests.spread > 0).any()):
        # length distributions: admitted at the mean cache plus a margin of z standard errors over the n
        # sequences of one memory pool, n the admission at the mean (one fixed-point step)
        spr = np.flatnonzero((requests.spread[lane] > 0) & (adm >= 1))
        if spr.size:
            ctx = ctx.copy()
            ctx[spr] = admission_context(requests.read[lane[spr]], requests.spread[lane[spr]], adm[spr])
            for f, fam in enumerate(fams):
                sub = spr[(spr >= bounds[f]) & (spr < bounds[f + 1])]
                if sub.size:
                    fb = None
                    if fam.override:
                        fb = ffn_params[lane[sub]] * fam.precision.weight_bytes  # type: ignore[index]
                    adm[sub], fit[sub] = admissible_batches(fam.memory, pidx[sub], ctx[sub], fb)
    ok = adm >= 1  # pack(...).feasible: weights fit and one sequence fits
    rows = np.flatnonzero(ok)
    stack = _stacked(fams)
    gplan = stack.offset[fam_row[rows]] + pidx[rows]
    lane_rows, pidx_rows = lane[rows], pidx[rows]
    ffn_rows = None
    if ffn_params is not None and any(f.override for f in fams):
        own = stack.params.ffn_params[gplan]
        ffn_rows = np.where(stack.override[gplan], ffn_params[lane_rows], own)
    c = ctx[rows].astype(np.float64) if requests is None else requests.read[lane_rows]
    s = slo[lane_rows]
    unit = stack.unit[gplan]
    K = rows.size
    fx = has_fixed = None  # a fixed cluster batch per row (the core splits it over the plan's replicas)
    if fixed is not None:
        fx = np.asarray(fixed, dtype=np.int64)[lane_rows]
        has_fixed = fx > 0
    pi = fams[0].pi
    # whole requests: seconds of one replica per prefilled request (rows of lanes with a prefill mode), and
    # the colocated prefill stall per running sequence and decode step, t_pf / O (docs/model.md "Prefill stalls")
    t_req = stall = None
    if requests is not None and bool((requests.mode > 0).any()):
        t_req = _prefill_seconds(fams, stack, gplan, fam_row[rows], lane_rows, ffn_rows, requests, pi)
        col = requests.mode[lane_rows] == 1
        if col.any():
            stall = np.where(col, t_req / requests.output[lane_rows], 0.0)

    # every row at its HBM-max (or fixed) batch, and the rows whose p99 misses the target bisected to the
    # largest batch that meets it, with exact pruning: the core's search (cpp/core/side_search.h)
    units = adm[rows]
    limit = np.zeros(K, np.int8)
    if cap is not None and bool((cap > 0).any()):  # the serving engine's sequences per scheduler
        pa = stack.params
        units = capped_units(units, cap[lane_rows].astype(np.int64), pa.attn_dp[gplan], pa.tp[gplan], unit)
        limit[units < adm[rows]] = 3
    if has_fixed is not None:
        limit[has_fixed] = 2
    got = _core.side_search(stack.fields, stack.unit, gplan, lane_rows, n, np.ascontiguousarray(c, np.float64),
                            np.ascontiguousarray(s, np.float64), units, fx, stall, ffn_rows, *stack.law(pi))
    limit[got["binds"]] = 1
    # the maximum-throughput point: every plan at its HBM-max (or fixed) batch, before the target caps it
    max_time, max_p99, max_valid = got["top_time"], got["top_p99"], got["top_valid"]
    max_batch, max_thr = got["top_batch"], got["top_tps"]
    units, time, p99, valid = got["units"], got["time"], got["p99"], got["valid"]
    batch, thr = got["batch"], got["tps"]  # decode tokens/s (stalls not counted)
    score, pf_rows, pool = thr, None, None
    if t_req is not None:
        score, pf_rows, pool = _prefill_rows(fams, stack, gplan, fam_row[rows], lane_rows, t_req, thr, requests, n)
    # in-order selection (the core's scan over each lane's rows, in plan order): a plan replaces the best only if
    # better by 1e-12 (relative)
    best, k = _core.in_order_best(lane_rows, score, valid, n)
    feas = k >= 0
    k = np.maximum(k, 0)
    arg = np.where(feas, pidx_rows[k], -1) if K else np.full(n, -1)
    # the reason reported when no plan is feasible: the first plan that packs
    # but misses the SLO at its smallest batch (or cannot hold the fixed
    # batch), else the packing-infeasible plan with the least weight on its
    # fullest GPU (first of equals)
    bad_rows = np.flatnonzero(~valid)
    bad_lane = lane_rows[bad_rows]
    first_bad = np.flatnonzero(np.r_[True, bad_lane[1:] != bad_lane[:-1]]) if bad_rows.size else bad_rows
    bad_lanes = bad_lane[first_bad]  # each lane's rows are contiguous, in plan order: its first invalid plan
    packs_but = np.zeros(n, bool)
    packs_but[bad_lanes] = True
    at = np.zeros(n, np.int64)  # the reported plan's row (where packs_but)
    at[bad_lanes] = bad_rows[first_bad]
    held = units * unit * stack.dp[gplan].astype(np.int64)  # sequences the cluster holds (invalid rows: HBM max)
    if has_fixed is not None and has_fixed[bad_rows].any():  # a fixed batch: report the plan that holds the most
        sel = bad_rows[has_fixed[bad_rows]]
        o = sel[np.lexsort((-held[sel], lane_rows[sel]))]  # by lane, the most held first, plan order among equals
        first = np.flatnonzero(np.r_[True, lane_rows[o][1:] != lane_rows[o][:-1]])
        at[lane_rows[o][first]] = o[first]
    out.why = np.where(packs_but, pidx_rows[at] if K else 0, 0)
    if K:
        fixed_at = has_fixed[at] if has_fixed is not None else np.zeros(n, bool)
        out.why_kind = np.where(packs_but, np.where(fixed_at, 2, 1), 0).astype(np.int8)
        out.why_adm = np.where(packs_but, held[at], 0)
    none_ok = (np.bincount(lane_rows, minlength=n) == 0) & ~packs_but & (counts[fam_of] > 0)
    if none_ok.any():
        lane_start = np.empty(n, np.int64)
        lane_start[order] = start
        bad = np.flatnonzero(none_ok)
        for f, pos in _split(fam_of[bad]):
            Pf = int(counts[f])
            sub = (lane_start[bad[pos]][:, None] + np.arange(Pf)).ravel()  # their rows, every plan
            why = np.argmin(fullest[sub].reshape(pos.size, Pf), axis=1)
            out.why[bad[pos]] = why
            out.why_fit[bad[pos]] = fit[lane_start[bad[pos]] + why]
    if K == 0:
        return out
    out.feasible = feas
    out.plan = arg
    out.batch = np.where(feas, batch[k], 0)
    out.limit = np.where(feas, limit[k], 0)
    out.admit = np.where(feas, ctx[rows][k], 0)
    out.time = np.where(feas, time[k], np.nan)
    out.p99 = np.where(feas, p99[k], np.nan)
    out.tps = np.where(feas, best, 0.0) if pf_rows is None else np.where(feas, thr[k], 0.0)
    if pf_rows is not None:
        mode = requests.mode  # type: ignore[union-attr]
        out.pf = np.where(feas & (mode == 1), pf_rows[k], np.where(feas & (mode == 2), pool, np.nan))
    if stall is not None:
        out.stall = np.where(feas, stall[k], 0.0)
    # the maximum-throughput point: the same objective (end to end for colocated prefill) at the HBM-max batches
    max_score = max_thr
    if pf_rows is not None:
        col = requests.mode[lane_rows] == 1  # type: ignore[union-attr]
        max_score = max_thr.copy()
        max_score[col] = end_to_end(max_thr[col], pf_rows[col], requests.take(lane_rows[col]))  # type: ignore[union-attr]
    _, mk = _core.in_order_best(lane_rows, max_score, max_valid, n)
    mfeas = mk >= 0
    mk = np.maximum(mk, 0)
    out.max_plan = np.where(mfeas, pidx_rows[mk], -1)
    out.max_batch = np.where(mfeas, max_batch[mk], 0)
    out.max_time = np.where(mfeas, max_time[mk], np.nan)
    out.max_p99 = np.where(mfeas, max_p99[mk], np.nan)
    out.max_tps = np.where(mfeas, max_thr[mk], 0.0)
    if pf_rows is not None:
        out.max_pf = np.where(mfeas & (mode == 1), pf_rows[mk], np.where(mfeas & (mode == 2), pool, np.nan))
    if stall is not None:
        out.max_stall = np.where(mfeas, stall[mk], 0.0)
    return out


def _prefill_seconds(fams: Sequence[Family], stack: "_Stack", gplan: np.ndarray, fam_rows: np.ndarray,
                     lane_rows: np.ndarray, ffn_rows: np.ndarray | None, req: Requests,
                     pi: np.ndarray | None) -> np.ndarray:
    """Seconds of one replica per prefilled request (:func:`prefill_time`) of
    the rows (lane x plan that packs) of lanes with a prefill mode; nan elsewhere."""
    on = np.flatnonzero(req.mode[lane_rows] > 0)
    t_req = np.full(gplan.size, np.nan)
    ctx_fl = np.array([prefill_ctx_flops(f.model) for f in fams])[fam_rows]

    def seconds(sub: np.ndarray, prompt: np.ndarray) -> np.ndarray:
        """prefill_time of rows ``on[sub]`` at ``prompt`` tokens, in cache-sized blocks."""
        got = np.empty(sub.size)
        for lo in range(0, sub.size, _BLOCK):
            blk = on[sub[lo:lo + _BLOCK]]
            sp = stack.params.take(gplan[blk])
            if ffn_rows is not None:
                sp = sp.replace(ffn_params=ffn_rows[blk])
            got[lo:lo + blk.size] = prefill_time(sp, prompt[lo:lo + _BLOCK], ctx_fl[blk], pi=pi, uniform=pi is None)
        return got

    t_req[on] = req.mean_prefill(lane_rows[on], seconds)  # E[t_pf(I)] over a prompt law
    return t_req


def _prefill_rows(fams: Sequence[Family], stack: "_Stack", gplan: np.ndarray, fam_rows: np.ndarray,
                  lane_rows: np.ndarray, t_req: np.ndarray, thr: np.ndarray, req: Requests,
                  n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prefill of the rows (lane x plan that packs) of lanes with a prefill
    mode: (selection score per row, colocated prefill tokens/s per row, the
    disaggregated pool's prefill tokens/s per lane), tokens/s
    cluster-equivalent. Colocated: the replicas prefill on the decode GPUs,
    I·dp / t_request, and the plan is scored by :func:`end_to_end`.
    Disaggregated: the pool is built of replicas of any plan that packs, each
    giving I / (t_request · tp · pp) per GPU; the best one, times the
    cluster's GPUs. ``t_req``: :func:`_prefill_seconds` of the rows."""
    prompt = req.prompt[lane_rows]
    gpus = np.array([float(f.cluster.num_gpus) for f in fams])[fam_rows]
    sp_all = stack.params
    with np.errstate(divide="ignore", invalid="ignore"):
        colocated = prompt * stack.dp[gplan] / t_req
        own = prompt / (t_req * sp_all.tp[gplan] * sp_all.pp[gplan]) * gpus
    mode = req.mode[lane_rows]
    col = mode == 1
    score = thr.copy()
    score[col] = end_to_end(thr[col], colocated[col], req.take(lane_rows[col]))
    pool = np.full(n, np.nan)
    dis = np.flatnonzero(mode == 2)
    np.fmax.at(pool, lane_rows[dis], own[dis])
    return score, colocated, pool


@dataclass
class _Stack:
    """The plans of several families end to end (global plan = offset[family] + plan)."""

    offset: np.ndarray
    params: StepParams
    dp: np.ndarray
    unit: np.ndarray
    override: np.ndarray
    #: the step fields by name, as the core's side search reads them (one entry per plan)
    fields: dict[str, np.ndarray] = field(default_factory=dict)
    _laws: dict[Any, tuple] = field(default_factory=dict)

    def law(self, pi: np.ndarray | None) -> tuple:
        """The closed-form straggler's routing law of the plans under ``pi``
        (None: uniform), as the core takes it (:func:`~qsengine.decode.step.routing_law`; cached)."""
        key = None if pi is None else pi.tobytes()
        got = self._laws.get(key)
        if got is None:
            got = self._laws[key] = routing_law(self.params, pi, uniform=pi is None)
        return got


_STACKS: dict[tuple[int, ...], tuple[tuple[Family, ...], _Stack]] = {}


def _stacked(fams: Sequence[Family]) -> _Stack:
    key = tuple(id(f) for f in fams)
    got = _STACKS.get(key)
    if got is None:
        present = [f for f in fams if f.plans]
        counts = [len(f.plans) for f in fams]
        params = StepParams.stack([f.params for f in present])  # type: ignore[misc]
        stack = _Stack(offset=np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64), params=params,
                       dp=np.concatenate([f.dp for f in present]),
                       unit=np.concatenate([f.unit for f in present]),
                       override=np.concatenate([np.full(len(f.plans), f.override) for f in present]),
                       fields=params.columns())
        if len(_STACKS) > 4096:
            _STACKS.clear()
        got = _STACKS[key] = (tuple(fams), stack)  # keep the families alive: their ids stay unique
    return got[1]


def in_order_best(T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``T`` (nan = no value): the value and column that a scan in
    column order keeps when a value replaces the best only if better by 1e-12
    (relative): plans earlier in the enumeration win near-ties (the core's
    ``in_order_best`` over the rows' columns, as ``_side`` chooses)."""
    n, P = T.shape
    score = np.ascontiguousarray(T, dtype=np.float64).reshape(-1)
    best, row = _core.in_order_best(np.repeat(np.arange(n, dtype=np.int64), P), score, ~np.isnan(score), n)
    return best, np.where(row >= 0, row % max(P, 1), -1)


@dataclass
class _SideSet:
    """Side results of many groups, each group filled from one stacked _side."""

    side: Side
    family: np.ndarray  # index into families
    families: list[Family] = field(default_factory=list)

    @classmethod
    def empty(cls, n: int) -> "_SideSet":
        return cls(Side.empty(n), np.zeros(n, np.int64))

    def fill(self, idx: np.ndarray, side: Side, fams: Sequence[Family], family: np.ndarray) -> None:
        """Groups ``idx`` take ``side``'s lanes; lane j is of ``fams[family[j]]``."""
        for name in _SIDE_FIELDS:
            getattr(self.side, name)[idx] = getattr(side, name)
        self.family[idx] = len(self.families) + family
        self.families.extend(fams)

    def family_of(self, k: int) -> Family:
        return self.families[int(self.family[k])]

    def plan_of(self, k: int) -> Plan | None:
        if not self.side.feasible[k]:
            return None
        return self.family_of(k).plans[int(self.side.plan[k])]

    def _per_plan(self, attr: str, plan: np.ndarray | None, empty: Any, dtype: Any) -> np.ndarray:
        """``attr`` (a per-plan array of the families) at each group's chosen
        plan, or at the plan indices ``plan`` (-1: none -> ``empty``)."""
        if plan is None:
            plan = np.where(self.side.feasible, self.side.plan, -1)
        out = np.full(plan.shape[0], empty, dtype=dtype)
        has = np.flatnonzero(plan >= 0)
        for f, pos in _split(self.family[has]):
            out[has[pos]] = getattr(self.families[int(f)], attr)[plan[has[pos]]]
        return out

    def plan_gpus(self, plan: np.ndarray | None = None) -> np.ndarray:
        """GPUs used by each group's chosen plan (or by the plan indices ``plan``; 0: none)."""
        return self._per_plan("gpus", plan, 0, np.int64)

    def plan_columns(self, plan: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(label, dp) of each group's chosen plan, or of the plan indices
        ``plan`` (-1: none; meaningless where infeasible)."""
        return self._per_plan("labels", plan, "", object), self._per_plan("dp_int", plan, 1, np.int64)
