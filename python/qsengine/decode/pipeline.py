"""The evaluation pipeline: every comparison point, one or a million, goes through here.

``simulate`` is this pipeline at n = 1; ``sweep`` and the study call it on
columns of points. The stages, each written once and vectorised over lanes:

1. **points** (:mod:`qsengine.decode.point`): fields validated per distinct
   value, resolved to specs;
2. **twins** (:func:`qsengine.specs.twin.solve_twins`): the dense side of
   each lane: the quality-matched twin of any shape, or an explicit dense
   model;
3. **families**: per (model or twin line, cluster, precision, plan spec,
   options, routing law) the plan list, the packing constants
   (:func:`qsengine.packing.plan_memory`) and the step parameters
   (:class:`qsengine.decode.step.StepParams`), built once and cached;
4. **sides** (:func:`_side`): over lanes x plans at once, the admissible
   batch (the core's batched admission, equal to ``pack``), the largest
   batch meeting the TPOT target (a bisection in lockstep over lanes), the
   step time (:func:`qsengine.decode.step.step_time`) and the best plan (the
   in-order "better by 1e-12" rule);
5. **Monte Carlo refinement** (:func:`_refine`): for lanes with
   ``microbatches != 0`` the routing Monte Carlo replaces the closed-form
   straggler at the chosen operating point (plans were ranked with the
   routing law's independent proxy);
6. **comparison** (:func:`compare`): ratio, verdict (ties within 1e-3) and
   whether it agrees with the qs inequality;
7. **why** (:func:`explain`): the ratio as a product of factors (headroom,
   weights, attention/KV, communication, other), from the step pieces at
   both operating points;
8. **break-even** (:func:`_break_even`): q* where the ratio crosses 1, a
   bisection over twins, vectorised over lanes.

:func:`frontier` (one side's latency-throughput Pareto frontier) and
:func:`throughput_at` serve :class:`~qsengine.decode.result.SimulationResult`'s
equal-latency comparison.

Data per lane stays in numpy arrays; Python loops run over distinct values
and families, never over points.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qsengine._groups import group as _group
from qsengine._groups import split as _split
from qsengine.decode.point import FIELDS, Validator, Value
from qsengine.decode.step import StepOptions, StepParams, step_params, step_time
from qsengine.packing import PlanMemory, admissible_batches, plan_memory
from qsengine.specs import Cluster, Model, Plan, Precision

__all__ = ["evaluate_columns", "evaluate", "Evaluation", "encode_points", "compare", "explain", "frontier",
           "throughput_at", "WHY", "RECORD_COLUMNS",
           "TIE_TOLERANCE", "AUTO_MAX_MICROBATCHES"]

#: |ratio - 1| within which the verdict is a tie.
TIE_TOLERANCE = 1e-3
_BLOCK = 1 << 14  # rows per step-model call: its ~150 temporaries stay in cache
_DEFAULT_OPTIONS = StepOptions()

#: ``microbatches="auto"``: the Monte Carlo runs until the relative standard
#: errors of the mean and p99 routed-straggler step time reach the point's
#: ``rtol`` (:func:`qsengine.route` with ``rtol``: checkpoints on a fixed block
#: schedule, so the stop is the same for any thread count), at most this many
#: microbatches.
AUTO_MAX_MICROBATCHES = 100_000


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


_FAMILIES: dict[tuple, Family] = {}
_REASONS: dict[tuple, str] = {}


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
    from qsengine.decode.step import _inclusion_probabilities
    from qsengine.routing import independent_popularity, proxy_popularity

    pop = (independent_popularity if closed_form else proxy_popularity)(routing, model.routed_experts)
    if pop is None:
        return ("uniform", model.routed_experts, model.top_k), None
    pi = _inclusion_probabilities(pop, model.top_k)
    return ("pi", model.routed_experts, model.top_k, pi.tobytes()), pi


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
        plan_list = None
    elif not model.is_moe and (plan.ep > 1 or plan.etp is not None):
        plan_list = [dataclasses.replace(plan, ep=1, etp=None)]
    else:
        plan_list = [plan]
    pm = plan_memory(model, cluster, precision, plan_list)
    acc = cluster.accelerator
    params = StepParams.stack([step_params(model, precision, acc, p, options) for p in pm.plans]) if pm.plans \
        else None
    law, pi = _law(model, routing, closed_form)
    fam = Family(model=model, cluster=cluster, precision=precision, plans=pm.plans, memory=pm, params=params,
                 pi=pi, law=law, dp=np.array([float(p.dp) for p in pm.plans]),
                 unit=np.array([p.tp if p.attn_dp else 1 for p in pm.plans], dtype=np.int64), override=override)
    if len(_FAMILIES) > 4096:
        _FAMILIES.clear()
    _FAMILIES[key] = fam
    return fam


# ---------------------------------------------------------------------------
# one side over many lanes
# ---------------------------------------------------------------------------


@dataclass
class Side:
    """One side (MoE or dense) of many lanes at its best plan and batch.

    ``plan``: index into the lane's family's plans (-1 if infeasible);
    ``batch``: sequences per replica; ``limit``: 1 = the TPOT target capped
    the batch, 0 = HBM; ``time``/``p99``: mean and p99 TPOT (s); ``tps``:
    cluster tokens/s. Infeasible lanes: ``why`` = the plan whose reason is
    reported, ``why_kind`` 1 (it misses the TPOT target at the smallest
    batch), 2 (it packs but cannot hold the fixed batch: it admits
    ``why_adm`` sequences per replica) or 0 (it does not pack; ``why_fit``:
    its weights fit, so the KV cache does not)."""

    feasible: np.ndarray
    plan: np.ndarray
    batch: np.ndarray
    limit: np.ndarray
    time: np.ndarray
    p99: np.ndarray
    tps: np.ndarray
    why: np.ndarray
    why_kind: np.ndarray
    why_fit: np.ndarray
    why_adm: np.ndarray

    @classmethod
    def empty(cls, n: int) -> "Side":
        return cls(np.zeros(n, bool), np.full(n, -1), np.zeros(n, np.int64), np.zeros(n, np.int8),
                   np.full(n, np.nan), np.full(n, np.nan), np.zeros(n), np.full(n, -1), np.zeros(n, np.int8),
                   np.zeros(n, bool), np.zeros(n, np.int64))


_SIDE_FIELDS = ("feasible", "plan", "batch", "limit", "time", "p99", "tps", "why", "why_kind", "why_fit", "why_adm")
#: ``Side.limit`` codes and their record text
LIMITS = ("hbm", "slo", "fixed")


def _side(fams: "Family | Sequence[Family]", context: np.ndarray, slo: np.ndarray,
          ffn_params: np.ndarray | None = None, family: np.ndarray | None = None,
          fixed: np.ndarray | None = None) -> Side:
    """Best plan and batch for many lanes (context, slo (nan = none)[, dense
    FFN parameters][, fixed batch per replica (0 = none)]). Lane i belongs to
    ``fams[family[i]]`` (one family: all lanes); the families must share their
    routing law (dense families always do); ``ffn_params`` is read for
    families with ``override``. The TPOT target holds on the p99 step time.
    A fixed batch is evaluated on every plan that can hold it."""
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
    ok = adm >= 1  # pack(...).feasible: weights fit and one sequence fits
    rows = np.flatnonzero(ok)
    stack = _stacked(fams)
    gplan = stack.offset[fam_row[rows]] + pidx[rows]
    ffn_rows = None
    if ffn_params is not None and any(f.override for f in fams):
        own = stack.params.ffn_params[gplan]
        ffn_rows = np.where(stack.override[gplan], ffn_params[lane[rows]], own)
    c = ctx[rows].astype(np.float64)
    s = slo[lane[rows]]
    unit = stack.unit[gplan]
    K = rows.size
    fx = np.zeros(K, np.int64) if fixed is None else np.asarray(fixed, dtype=np.int64)[lane[rows]]
    dp_rows = stack.dp[gplan].astype(np.int64)
    fx_rep = fx // dp_rows  # a fixed cluster batch split evenly over the plan's replicas
    pi = fams[0].pi

    def step(sub: np.ndarray | None, b: np.ndarray) -> dict[str, np.ndarray]:
        """time and p99 of rows ``sub`` (None: all) at ``b`` admitted units
        (batch per replica = b x unit; a fixed batch where one is given), in
        cache-sized blocks (the step model is elementwise over rows)."""
        idx = np.arange(rows.size) if sub is None else sub
        got = {"time": np.empty(idx.size), "p99": np.empty(idx.size)}
        for lo in range(0, idx.size, _BLOCK):
            blk = idx[lo:lo + _BLOCK]
            sp = stack.params.take(gplan[blk])
            if ffn_rows is not None:
                sp = sp.replace(ffn_params=ffn_rows[blk])
            bb = np.where(fx[blk] > 0, fx_rep[blk], b[lo:lo + _BLOCK] * unit[blk]).astype(np.float64)
            r = step_time(sp, bb, c[blk], pi=pi, uniform=pi is None)
            got["time"][lo:lo + blk.size] = r.time
            got["p99"][lo:lo + blk.size] = r.p99
        return got

    units = adm[rows]
    limit = np.zeros(K, np.int8)
    top = step(None, units)
    time, p99 = top["time"], top["p99"]
    valid = np.ones(K, bool)
    has_fixed = fx > 0
    limit[has_fixed] = 2
    # the plan cannot hold the fixed batch, or cannot split it evenly over its replicas
    too_big = has_fixed & ((-(-fx_rep // unit) > units) | (fx % dp_rows != 0) | (fx_rep < 1))
    valid[too_big] = False
    has_slo = ~np.isnan(s) & ~has_fixed
    over = np.flatnonzero(has_slo & ~(p99 <= s))
    if over.size:
        limit[over] = 1
        first = step(over, np.ones(over.size, np.int64))
        miss = first["p99"] > s[over]
        valid[over[miss]] = False
        act = over[~miss]
        lo = np.ones(act.size, np.int64)
        hi = units[act].copy()
        while True:
            live = np.flatnonzero(hi - lo > 1)
            if live.size == 0:
                break
            mid = (lo[live] + hi[live]) // 2
            meets = step(act[live], mid)["p99"] <= s[act[live]]
            lo[live] = np.where(meets, mid, lo[live])
            hi[live] = np.where(meets, hi[live], mid)
        if act.size:
            final = step(act, lo)
            units[act] = lo
            time[act] = final["time"]
            p99[act] = final["p99"]
    batch = np.where(has_fixed, fx_rep, units * unit)
    with np.errstate(divide="ignore", invalid="ignore"):
        thr = np.where(time > 0, batch / time, 0.0) * stack.dp[gplan]
    # in-order selection: a plan replaces the best only if better by 1e-12 (relative)
    P = int(counts.max())
    T = np.full((n, P), np.nan)
    T[lane[rows[valid]], pidx[rows[valid]]] = thr[valid]
    where = np.full((n, P), -1)
    where[lane[rows], pidx[rows]] = np.arange(K)
    best, arg = in_order_best(T)
    feas = arg >= 0
    k = np.maximum(where[np.arange(n), np.maximum(arg, 0)], 0)
    # the reason reported when no plan is feasible: the first plan that packs
    # but misses the SLO at its smallest batch (or cannot hold the fixed
    # batch), else the packing-infeasible plan with the least weight on its
    # fullest GPU (first of equals)
    slo_fail = np.zeros((n, P), bool)
    slo_fail[lane[rows[~valid]], pidx[rows[~valid]]] = True
    packs_but = slo_fail.any(axis=1)
    out.why = np.argmax(slo_fail, axis=1)
    if K and has_fixed.any():  # a fixed batch: report the plan that holds the most
        A = np.full((n, P), -1)
        A[lane[rows[~valid]], pidx[rows[~valid]]] = (units * unit * dp_rows)[~valid]
        lanes_fx = np.zeros(n, bool)
        lanes_fx[lane[rows[has_fixed]]] = True
        out.why = np.where(lanes_fx, np.argmax(A, axis=1), out.why)
    at = np.maximum(where[np.arange(n), out.why], 0)
    if K:
        out.why_kind = np.where(packs_but, np.where(has_fixed[at], 2, 1), 0).astype(np.int8)
        out.why_adm = np.where(packs_but, (units * unit * dp_rows)[at], 0)
    none_ok = (np.bincount(lane[rows], minlength=n) == 0) & ~packs_but & (counts[fam_of] > 0)
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
    out.time = np.where(feas, time[k], np.nan)
    out.p99 = np.where(feas, p99[k], np.nan)
    out.tps = np.where(feas, best, 0.0)
    return out


@dataclass
class _Stack:
    """The plans of several families end to end (global plan = offset[family] + plan)."""

    offset: np.ndarray
    params: StepParams
    dp: np.ndarray
    unit: np.ndarray
    override: np.ndarray


_STACKS: dict[tuple[int, ...], tuple[tuple[Family, ...], _Stack]] = {}


def _stacked(fams: Sequence[Family]) -> _Stack:
    key = tuple(id(f) for f in fams)
    got = _STACKS.get(key)
    if got is None:
        present = [f for f in fams if f.plans]
        counts = [len(f.plans) for f in fams]
        stack = _Stack(offset=np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64),
                       params=StepParams.stack([f.params for f in present]),  # type: ignore[misc]
                       dp=np.concatenate([f.dp for f in present]),
                       unit=np.concatenate([f.unit for f in present]),
                       override=np.concatenate([np.full(len(f.plans), f.override) for f in present]))
        if len(_STACKS) > 4096:
            _STACKS.clear()
        got = _STACKS[key] = (tuple(fams), stack)  # keep the families alive: their ids stay unique
    return got[1]


def in_order_best(T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``T`` (nan = no value): the value and column that a scan in
    column order keeps when a value replaces the best only if better by 1e-12
    (relative): plans earlier in the enumeration win near-ties. Rows whose
    maximum beats every other value by more than that tolerance take the
    argmax; the few others are scanned."""
    n, P = T.shape
    valid = ~np.isnan(T)
    filled = np.where(valid, T, -np.inf)
    arg = np.argmax(filled, axis=1)
    best = filled[np.arange(n), arg]
    second = np.max(np.where(np.arange(P) == arg[:, None], -np.inf, filled), axis=1) if P > 1 \
        else np.full(n, -np.inf)
    clear = ((best > second * (1 + 1e-12)) & (best >= 0)) | (second == -np.inf)
    arg = np.where(valid.any(axis=1), arg, -1)
    best = np.where(arg >= 0, best, np.nan)
    scan = np.flatnonzero(~clear & (arg >= 0))
    if scan.size:
        b = np.full(scan.size, np.nan)
        a = np.full(scan.size, -1)
        for j in range(P):
            t = T[scan, j]
            better = ~np.isnan(t) & (np.isnan(b) | (t > b * (1 + 1e-12)))
            b = np.where(better, t, b)
            a = np.where(better, j, a)
        best[scan], arg[scan] = b, a
    return best, arg


# ---------------------------------------------------------------------------
# comparison and break-even
# ---------------------------------------------------------------------------


def compare(moe_feasible: np.ndarray, dense_feasible: np.ndarray, moe_tps: np.ndarray, dense_tps: np.ndarray,
            qs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ratio, verdict, agrees_with_qs) per lane.

    ratio = dense tokens/s ÷ MoE tokens/s (nan unless both sides fit);
    verdict: "neither", "dense-only", "moe-only", "tie" (|ratio - 1| ≤
    :data:`TIE_TOLERANCE`), "dense" or "moe"; agrees: whether the winner is
    the side the qs inequality predicts (qs < 1: dense), None for ties and
    one-sided outcomes."""
    mf, df = np.asarray(moe_feasible, bool), np.asarray(dense_feasible, bool)
    both = mf & df
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(both, dense_tps / moe_tps, np.nan)
    tie = both & (np.abs(ratio - 1.0) <= TIE_TOLERANCE)
    verdict = np.select([~mf & ~df, ~mf, ~df, tie, ratio > 1], ["neither", "dense-only", "moe-only", "tie", "dense"],
                        "moe").astype(object)
    agrees = np.full(mf.size, None, dtype=object)
    decided = both & ~tie
    agrees[decided] = ((ratio > 1) == (np.asarray(qs) < 1.0))[decided]
    return ratio, verdict, agrees


def _break_even(specs: list[tuple], spec_of: np.ndarray, context: np.ndarray, slo: np.ndarray,
                moe_tps: np.ndarray, fixed: np.ndarray | None = None, rtol: float = 1e-3) -> np.ndarray:
    """q* per lane (nan = not bracketed): the twin size multiplier at which
    dense tokens/s equals ``moe_tps``, by bisection on q.

    Lane i compares with the twins of ``specs[spec_of[i]]`` = (model,
    cluster, precision, plan, options, twin attention) at ``context[i]``,
    ``slo[i]`` (and fixed batch ``fixed[i]``, 0 = none). Dense throughput falls as q grows. The bracket runs from the
    smallest constructible twin (q ≥ 1, grown by 1.5x) to 1/s (the twin as
    large as the MoE's total parameters), widened up to 16/s while the twin
    still wins there."""
    from qsengine.specs.twin import solve_twins

    n = spec_of.size

    def ratio(idx: np.ndarray, q: np.ndarray) -> np.ndarray:
        """ratio(q) for lanes idx: nan = twin cannot be built, 0 = infeasible."""
        r = np.full(idx.size, np.nan)
        ok = np.zeros(idx.size, bool)
        ffn = np.zeros(idx.size)
        fams: list[Family] = []
        fam_of = np.zeros(idx.size, np.int64)
        index: dict[int, int] = {}
        for t, sel in _split(spec_of[idx]):
            model, cluster, precision, plan, opts, att = specs[t]
            sol = solve_twins(model, q[sel], att)
            ok[sel] = sol.ok
            ffn[sel] = sol.ffn_params()
            for li, lsel in _split(sol.line_of):
                fam = family(sol.lines[li].base, cluster, precision, plan, opts, override=True)
                k = index.get(id(fam))
                if k is None:
                    k = index[id(fam)] = len(fams)
                    fams.append(fam)
                fam_of[sel[lsel]] = k
        lanes_ok = np.flatnonzero(ok)
        lanes = idx[lanes_ok]
        side = _side(fams, context[lanes], slo[lanes], ffn[lanes_ok], family=fam_of[lanes_ok],
                     fixed=None if fixed is None else fixed[lanes])
        r[lanes_ok] = np.where(side.feasible, side.tps / moe_tps[lanes], 0.0)
        return r

    every = np.arange(n)
    lo = np.ones(n)
    hi = np.array([1.0 / specs[t][0].sparsity for t in spec_of.tolist()])
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
# Monte Carlo refinement of the chosen operating point
# ---------------------------------------------------------------------------


@dataclass
class Refined:
    """The MoE side of one lane after the routing Monte Carlo."""

    batch: int
    limit: int
    moe_step_time: tuple[float, float, float]  # routed straggler (mean, p50, p99) summed over MoE layers
    time: float
    p99: float
    tps: float
    stats: Any  # RoutingStats


def _refine(model: Model, precision: Precision, cluster: Cluster, plan: Plan, context: int, batch: int,
            limit: int, slo_tpot: float | None, routing: Any, microbatches: int | str,
            seed: np.random.SeedSequence | None, threads: int | None, options: StepOptions,
            rtol: float = 1e-3) -> Refined:
    """The step time at ``batch`` with the routed-expert straggler from the
    routing Monte Carlo; if the Monte Carlo TPOT misses the target, the batch
    steps down (in admission units) and the Monte Carlo runs again (the
    target holds on the p99)."""
    from qsengine.decode.step import moe_cost_coefficients, moe_layer_shape
    from qsengine.routing import Placement, route

    acc = cluster.accelerator
    a, bcoef = moe_cost_coefficients(model, precision, acc, plan)
    unit = plan.tp if plan.attn_dp else 1
    p = step_params(model, precision, acc, plan, options)
    while True:
        shape = moe_layer_shape(model, plan, batch)
        tokens = max(1, int(round(shape.tokens)))
        auto = microbatches == "auto"
        n = AUTO_MAX_MICROBATCHES if auto else int(microbatches)
        stats = route(model.routed_experts, model.top_k, tokens, n, routing=routing,
                      placement=Placement.contiguous(shape.gpus), seed=seed, threads=threads,
                      layers=model.decode_moe_layers, cost=(a, bcoef), rtol=rtol if auto else None)
        dist = stats.step_time
        mean, p99 = dist.mean, dist.quantile(0.99)
        # times are log-binned (ratio 1.001): a quantile is known to its bin, and within that bin it is no
        # lower than the exact mean (a near-constant straggler put the p99 at the bin centre, below the mean)
        if p99 < mean <= p99 * math.sqrt(1.001):
            p99 = mean
        mst = (mean, dist.quantile(0.5), p99)
        r = step_time(p, np.array([float(batch)]), np.array([float(context)]),
                      moe_step_time=tuple(np.array([v]) for v in mst))  # type: ignore[arg-type]
        t, t99 = float(r.time[0]), float(r.p99[0])
        if slo_tpot is None or t99 <= slo_tpot or batch <= unit:
            return Refined(batch, limit, mst, t, t99, batch / t * plan.dp if t > 0 else 0.0, stats)
        batch = max(unit, int(batch * slo_tpot / t99) // unit * unit)
        limit = 1


# ---------------------------------------------------------------------------
# why: the ratio as a product of factors
# ---------------------------------------------------------------------------


def _category_times(sides: _SideSet, groups: np.ndarray, context: np.ndarray, ffn: np.ndarray | None,
                    refined: Mapping[int, Refined] | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per feasible group in ``groups``: the step time of its chosen plan and
    batch split into the categories "weights", "attention",
    "communication", "other" (summed pieces), and the step time itself
    (the same step model, with the pieces kept; families sharing a routing
    law in one call; Monte Carlo-refined groups take their routed straggler
    from the Monte Carlo)."""
    n = groups.size
    cat = {k: np.zeros(n) for k in ("weights", "attention", "communication", "other")}
    total = np.zeros(n)
    refined = refined or {}
    if n == 0:
        return cat, total
    fam_ids = sides.family[groups]
    mc = np.array([int(g) in refined for g in groups.tolist()], dtype=bool)
    laws: dict[tuple, list[int]] = {}
    for f in np.unique(fam_ids).tolist():
        laws.setdefault(sides.families[f].law, []).append(f)
    for fs in laws.values():
        fams = [sides.families[f] for f in fs]
        local = np.full(len(sides.families), -1, np.int64)
        local[fs] = np.arange(len(fs))
        stack = _stacked(fams)
        for is_mc in (False, True):
            sub = np.flatnonzero((local[fam_ids] >= 0) & (mc == is_mc))
            if sub.size == 0:
                continue
            g = groups[sub]
            gplan = stack.offset[local[fam_ids[sub]]] + sides.side.plan[g]
            sp = stack.params.take(gplan)
            if ffn is not None and stack.override.any():
                sp = sp.replace(ffn_params=np.where(stack.override[gplan], ffn[sub], sp.ffn_params))
            mst = None
            if is_mc:
                mst = tuple(np.array([refined[int(k)].moe_step_time[j] for k in g.tolist()]) for j in range(3))
            r = step_time(sp, sides.side.batch[g].astype(np.float64), context[sub].astype(np.float64),
                          pi=fams[0].pi, uniform=fams[0].pi is None, moe_step_time=mst,  # type: ignore[arg-type]
                          detail=True)
            for pa in r.pieces:
                key = "communication" if pa.link else _CATEGORY[pa.name]
                cat[key][sub] += np.where(pa.present, pa.time, 0.0)
            total[sub] = r.time
    return cat, total


def explain(moe: dict[str, np.ndarray], moe_time: np.ndarray, moe_batch: np.ndarray,
            dense: dict[str, np.ndarray], dense_time: np.ndarray, dense_batch: np.ndarray) -> dict[str, np.ndarray]:
    """The ratio as a product of factors, per lane (:data:`WHY`).

    ratio = (B_dense / B_moe) x (T_moe / T_dense), with B the concurrent
    sequences on the cluster and T the step time. ``headroom`` = B_dense /
    B_moe: the batch each side holds (HBM, or the latency target). The step
    time ratio is taken apart by swapping the dense step's pieces for the
    MoE's one category at a time, in a fixed order: ``weights`` (dense FFN
    against router, shared and routed experts: reuse fragmentation),
    ``attention`` (attention weights and KV reads), ``communication``
    (TP/EP/PP collectives), ``other`` (the LM head, and overlap of
    communication with compute when it is on). Each factor is the step time
    after the swap over the step time before it, so the factors multiply back
    to the ratio exactly (up to rounding); a factor above 1 favours the dense
    side."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = {"headroom": dense_batch / moe_batch}
        cur = sum(dense[k] for k in ("weights", "attention", "communication", "other"))
        dense_sum = cur
        for k in ("weights", "attention", "communication"):
            nxt = cur - dense[k] + moe[k]
            out[k] = nxt / cur
            cur = nxt
        moe_sum = cur - dense["other"] + moe["other"]
        # "other": the LM head swap, and the overlap of communication (time != sum of pieces) on either side
        out["other"] = moe_sum / cur * (moe_time / moe_sum) / (dense_time / dense_sum)
    return out


# ---------------------------------------------------------------------------
# the latency-throughput frontier of one side
# ---------------------------------------------------------------------------

#: Columns of :func:`frontier`.
FRONTIER_COLUMNS = ("side", "plan", "batch", "tpot", "tpot_p99", "tokens_per_s_per_gpu", "tokens_per_s_per_user")


def frontier(fam: Family, context: int, ffn_params: float | None = None, *, side: str = "",
             points: int = 40):
    """The Pareto frontier of one side: output tokens/s per GPU of the
    cluster against tokens/s per user (1/TPOT), over every feasible plan of
    ``fam`` and, per plan, ``points`` batches spaced geometrically from one
    sequence per admission unit to the admissible maximum (the step model at
    each; the closed-form straggler of the family's routing law, so for a
    Monte Carlo point its independent proxy). A point is kept when no other
    point has both a lower (or equal) mean TPOT and a higher throughput per
    GPU. Returns a DataFrame with :data:`FRONTIER_COLUMNS` (``batch``:
    concurrent sequences on the cluster; ``tpot``/``tpot_p99`` in seconds),
    sorted by TPOT."""
    import pandas as pd

    P = len(fam.plans)
    empty = pd.DataFrame({c: [] for c in FRONTIER_COLUMNS})
    if P == 0:
        return empty
    idx = np.arange(P)
    fb = None
    if fam.override and ffn_params is not None:
        fb = np.full(P, float(ffn_params) * fam.precision.weight_bytes)
    adm, _ = admissible_batches(fam.memory, idx, np.full(P, int(context)), fb)
    plan_rows, unit_rows = [], []
    for p in np.flatnonzero(adm >= 1).tolist():
        u = np.unique(np.round(np.geomspace(1, int(adm[p]), points)).astype(np.int64))
        plan_rows.append(np.full(u.size, p))
        unit_rows.append(u)
    if not plan_rows:
        return empty
    plan_idx = np.concatenate(plan_rows)
    batch = (np.concatenate(unit_rows) * fam.unit[plan_idx]).astype(np.float64)
    sp = fam.params.take(plan_idx)  # type: ignore[union-attr]
    if fam.override and ffn_params is not None:
        sp = sp.replace(ffn_params=np.full(plan_idx.size, float(ffn_params)))
    r = step_time(sp, batch, np.full(plan_idx.size, float(context)), pi=fam.pi, uniform=fam.pi is None)
    dp = fam.dp[plan_idx]
    gpus = fam.cluster.num_gpus
    with np.errstate(divide="ignore", invalid="ignore"):
        per_gpu = batch * dp / r.time / gpus
        per_user = 1.0 / r.time
    order = np.lexsort((-per_gpu, r.time))
    best = np.maximum.accumulate(per_gpu[order])
    keep = order[np.concatenate([[True], per_gpu[order][1:] > best[:-1]])]
    labels = np.array([fam.plans[i].label for i in range(P)], dtype=object)
    return pd.DataFrame({"side": side, "plan": labels[plan_idx[keep]], "batch": (batch * dp)[keep].astype(np.int64),
                         "tpot": r.time[keep], "tpot_p99": r.p99[keep], "tokens_per_s_per_gpu": per_gpu[keep],
                         "tokens_per_s_per_user": per_user[keep]}).reset_index(drop=True)


def throughput_at(front, tpot: float, column: str = "tpot") -> float:
    """Tokens/s per GPU a side reaches at a TPOT of ``tpot`` seconds on its
    frontier: linear interpolation in TPOT between the frontier points around
    it; below the fastest point nan (the side cannot serve that fast), above
    the slowest its maximum throughput. ``column``: "tpot" (mean) or
    "tpot_p99"."""
    if len(front) == 0:
        return math.nan
    t = front[column].to_numpy()
    g = front["tokens_per_s_per_gpu"].to_numpy()
    order = np.argsort(t, kind="stable")
    t, g = t[order], np.maximum.accumulate(g[order])
    if tpot < t[0]:
        return math.nan
    return float(np.interp(tpot, t, g))


# ---------------------------------------------------------------------------
# columns in, evaluation out
# ---------------------------------------------------------------------------


#: Columns of ``SimulationResult.to_record()`` in order, with their kind:
#: "str", "int", "float", "bool", or "bool?" (True/False/None).
RECORD_COLUMNS: tuple[tuple[str, str], ...] = (
    ("model", "str"), ("dense_model", "str"), ("dense_shape", "str"), ("moe_kv_bytes_per_token", "float"),
    ("dense_kv_bytes_per_token", "float"), ("cluster", "str"), ("gpus", "int"), ("context", "int"),
    ("s", "float"), ("q", "float"), ("qs", "float"), ("qs_verdict", "str"), ("ratio", "float"),
    ("verdict", "str"), ("agrees_with_qs", "bool?"), ("break_even_q", "float"),
    *((f"{side}_{name}", kind) for side in ("moe", "dense") for name, kind in (
        ("feasible", "bool"), ("reason", "str"), ("plan", "str"), ("batch", "int"), ("batch_limit", "str"),
        ("tokens_per_s", "float"), ("tokens_per_s_per_gpu", "float"), ("tpot_ms", "float"),
        ("tpot_p99_ms", "float"))),
    *((f"why_{name}", "float") for name in ("headroom", "weights", "attention", "communication", "other")),
    ("mc_microbatches", "int"), ("mc_rse_mean", "float"), ("mc_rse_p99", "float"),
)
#: The factors of :func:`explain`, in order: their product is the ratio.
WHY = ("headroom", "weights", "attention", "communication", "other")
#: Which step pieces each time factor of :data:`WHY` swaps (the rest: "other").
_CATEGORY = {"attention": "attention", "attention (local)": "attention", "dense ffn": "weights",
             "router + shared experts": "weights", "routed experts (straggler)": "weights",
             "lm head": "other"}
_EMPTY = {"str": "", "int": 0, "float": math.nan, "bool": False, "bool?": None}

#: The point columns of :func:`evaluate_columns`: per field, (distinct values, code per lane).
Columns = Mapping[str, "tuple[Sequence[Any], np.ndarray]"]


def _empty_columns(n: int) -> dict[str, np.ndarray]:
    dtypes = {"str": object, "int": np.int64, "float": np.float64, "bool": bool, "bool?": object}
    return {name: np.full(n, _EMPTY[kind], dtype=dtypes[kind]) for name, kind in RECORD_COLUMNS}


def encode_points(points: Sequence[Mapping[str, Any]]) -> tuple[dict[str, tuple[list[Any], np.ndarray]], int]:
    """Point dicts as :data:`Columns` (missing fields take their defaults)."""
    n = len(points)
    cols: dict[str, tuple[list[Any], np.ndarray]] = {}
    for fname, default in FIELDS.items():
        distinct: list[Any] = []
        index: dict[Any, int] = {}
        codes = np.empty(n, dtype=np.int64)
        for i, pt in enumerate(points):
            if default is ... and fname not in pt:
                raise ValueError(f"point {i}: required field {fname!r} is missing")
            v = pt.get(fname, default)
            try:
                k = (type(v), v)
                c = index.get(k)
            except TypeError:  # unhashable: by identity
                k = ("id", id(v))
                c = index.get(k)
            if c is None:
                c = index[k] = len(distinct)
                distinct.append(v)
            codes[i] = c
        cols[fname] = (distinct, codes)
    return cols, n


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

    def plan_columns(self) -> tuple[np.ndarray, np.ndarray]:
        """(label, dp) of each group's chosen plan (meaningless where infeasible)."""
        labels = np.array([""] + [p.label for f in self.families for p in f.plans], dtype=object)
        dps = np.array([1] + [p.dp for f in self.families for p in f.plans], dtype=np.int64)
        offset = np.cumsum([1] + [len(f.plans) for f in self.families])[:-1]
        at = np.where(self.side.feasible, offset[self.family] + self.side.plan, 0) if self.families else \
            np.zeros(self.side.feasible.size, dtype=np.int64)
        return labels[at], dps[at]


@dataclass
class Evaluation:
    """The pipeline's answer for n lanes: the record columns, plus what
    :func:`qsengine.simulate` needs to build its rich result (per lane: the
    resolved values, each side's group and the Monte Carlo refinements)."""

    n: int
    columns: dict[str, np.ndarray]
    values: dict[str, list[Value]]
    codes: dict[str, np.ndarray]
    moe: _SideSet
    dense: _SideSet
    moe_group: np.ndarray
    dense_group: np.ndarray
    dense_models: list[Model | None]  # per (model, q, dense, attention) group: explicit dense model, else None
    dense_model_group: np.ndarray
    q_value: np.ndarray  # numeric q per lane
    refined: dict[int, Refined]  # MoE group -> Monte Carlo refinement
    dense_ffn: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per dense group: its dense-FFN parameters

    def value(self, fname: str, i: int) -> Any:
        return self.values[fname][int(self.codes[fname][i])].obj


def evaluate_columns(columns: Columns, n: int, *, seeds: Sequence[Any] | None = None, threads: int | None = None,
                     check_points: bool = True, strict: bool = False) -> dict[str, np.ndarray]:
    """The records of ``n`` points given column-wise, as columns.

    ``columns[field] = (values, codes)``: the distinct values of that point
    field and, per point, the index of its value (every field of
    :data:`qsengine.decode.point.FIELDS`; a missing field takes its default;
    values already validated may be given as :class:`~qsengine.decode.point.Value`).
    Returns ``{name: array of n}`` for every column of
    ``SimulationResult.to_record()`` (:data:`RECORD_COLUMNS`): int64, float64
    and bool arrays, object arrays of str, and of True/False/None for
    ``agrees_with_qs``. Monte Carlo points (``microbatches != 0``) need
    ``seeds`` (one SeedSequence per point)."""
    return evaluate(columns, n, seeds=seeds, threads=threads, check_points=check_points, strict=strict).columns


def _resolve(columns: Columns, n: int, check_points: bool, strict: bool
             ) -> tuple[dict[str, list[Value]], dict[str, np.ndarray]]:
    val = Validator(strict)
    values: dict[str, list[Value]] = {}
    codes: dict[str, np.ndarray] = {}
    for fname, default in FIELDS.items():
        if fname in columns:
            vals, c = columns[fname]
            c = np.asarray(c, dtype=np.int64)
            if c.shape != (n,) or (n and (c.min() < 0 or c.max() >= len(vals))):
                raise ValueError(f"evaluate_columns: field {fname!r}: codes must be {n} indices into its "
                                 f"{len(vals)} values")
            values[fname] = [v if isinstance(v, Value) else val.value(fname, v) for v in vals]
            codes[fname] = c
        elif default is ...:
            raise ValueError(f"evaluate_columns: required field {fname!r} is missing")
        else:
            values[fname] = [val.value(fname, default)]
            codes[fname] = np.zeros(n, dtype=np.int64)
    if n and check_points:
        val.points(values, codes, n)
    return values, codes


def evaluate(columns: Columns, n: int, *, seeds: Sequence[Any] | None = None, threads: int | None = None,
             check_points: bool = True, strict: bool = False) -> Evaluation:
    """Run the pipeline on ``n`` points given as :data:`Columns` (see
    :func:`evaluate_columns`); the whole :class:`Evaluation`."""
    from qsengine.specs.twin import qs as qs_record
    from qsengine.specs.twin import resolve_q, solve_twins, twin_id

    values, codes = _resolve(columns, n, check_points, strict)
    out = _empty_columns(n)

    def objs(fname: str) -> list[Any]:
        return [v.obj for v in values[fname]]

    models, clusters, precisions = objs("model"), objs("cluster"), objs("precision")
    options, plans, routings, denses = objs("options"), objs("plan"), objs("routing"), objs("dense")
    contexts = np.array([v.obj for v in values["context"]], dtype=np.int64)
    slos = np.array([np.nan if v.obj is None else float(v.obj) for v in values["slo_tpot"]])
    fixeds = np.array([0 if v.obj is None else int(v.obj) for v in values["batch"]], dtype=np.int64)
    breaks = np.array([bool(v.obj) for v in values["break_even"]])
    mbs = [v.obj for v in values["microbatches"]]
    rtols = [float(v.obj) for v in values["rtol"]]
    attentions = objs("twin_attention")
    m, c, pr, pl, op, rt = (codes[f] for f in ("model", "cluster", "precision", "plan", "options", "routing"))
    pr, precisions = _deployed(pr, precisions, m, models)
    dn, at, qc, mb = codes["dense"], codes["twin_attention"], codes["q"], codes["microbatches"]
    ctx, slo, fixed = contexts[codes["context"]], slos[codes["slo_tpot"]], fixeds[codes["batch"]]
    closed = np.array([v == 0 for v in mbs], dtype=bool)[mb]
    empty_ev = Evaluation(n, out, values, codes, _SideSet.empty(0), _SideSet.empty(0), np.zeros(0, np.int64),
                          np.zeros(0, np.int64), [], np.zeros(0, np.int64), np.zeros(0), {})
    if n == 0:
        return empty_ev

    # ---- the dense side's identity per (model, q, dense, attention): numeric q, qs record, id, model
    dq, dq_first = _group(n, m, qc, dn, at)
    qv = np.empty(dq_first.size)
    dq_rec = []
    dq_dense: list[Model | None] = []
    for g, i in enumerate(dq_first.tolist()):
        model, dense = models[m[i]], denses[dn[i]]
        if dense is not None:  # one definition of q: the dense model's active parameters over the MoE's
            rec = qs_record(model, dense)
            qv[g] = rec.q
            dq_rec.append((rec, dense.id))
        else:
            qraw = values["q"][int(qc[i])].arg
            q_value = "sqrt" if qraw is None else qraw
            qv[g] = resolve_q(model, q_value)
            rec = qs_record(model, q_value)
            dq_rec.append((rec, twin_id(model, qv[g], attentions[at[i]])))
        dq_dense.append(dense)

    # ---- the MoE side: once per distinct (specs, routing, closed form?, context, slo); families sharing
    # a routing law in one stacked call
    mg, m_first = _group(n, m, c, pr, pl, op, rt, closed.astype(np.int64), codes["context"], codes["slo_tpot"],
                         codes["batch"], mb, codes["rtol"])
    moe = _SideSet.empty(m_first.size)
    fg, f_first = _group(m_first.size, *(x[m_first] for x in (m, c, pr, pl, op, rt)),
                         closed[m_first].astype(np.int64))
    fams = []
    for i in m_first[f_first].tolist():
        fams.append(family(models[m[i]], clusters[c[i]], precisions[pr[i]], plans[pl[i]], options[op[i]],
                           routings[rt[i]], closed_form=bool(closed[i])))
    laws: dict[tuple, list[int]] = {}
    for f, fam in enumerate(fams):
        laws.setdefault(fam.law, []).append(f)
    for fs in laws.values():
        local = np.full(len(fams), -1, np.int64)
        local[fs] = np.arange(len(fs))
        members = np.flatnonzero(local[fg] >= 0)
        lanes_f = m_first[members]
        stacked = [fams[f] for f in fs]
        moe.fill(members, _side(stacked, ctx[lanes_f], slo[lanes_f], family=local[fg[members]],
                                fixed=fixed[lanes_f]), stacked, local[fg[members]])

    # ---- Monte Carlo refinement of the MoE side's operating point
    refined: dict[int, Refined] = {}
    mc_n = np.zeros(m_first.size, np.int64)
    mc_rse = np.full((m_first.size, 2), np.nan)
    for g in np.flatnonzero(~closed[m_first] & moe.side.feasible).tolist():
        i = int(m_first[g])
        if seeds is None:
            raise ValueError("evaluate: Monte Carlo points (microbatches != 0) need seeds")
        plan = moe.plan_of(g)
        assert plan is not None
        r = _refine(models[m[i]], precisions[pr[i]], clusters[c[i]], plan, int(ctx[i]), int(moe.side.batch[g]),
                    int(moe.side.limit[g]), None if np.isnan(slo[i]) else float(slo[i]), routings[rt[i]],
                    mbs[mb[i]], seeds[i], threads, options[op[i]], rtols[codes["rtol"][i]])
        refined[g] = r
        mc_n[g] = r.stats.microbatches
        if r.stats.precision is not None:
            mc_rse[g] = (r.stats.rse_mean, r.stats.rse_p99)
        moe.side.batch[g], moe.side.limit[g] = r.batch, r.limit
        moe.side.time[g], moe.side.p99[g], moe.side.tps[g] = r.time, r.p99, r.tps

    # ---- the dense side: once per distinct (specs, dense identity, context, slo), in one stacked call
    dg, d_first = _group(n, m, c, pr, pl, op, dq, codes["context"], codes["slo_tpot"], codes["batch"])
    dense = _SideSet.empty(d_first.size)
    ffn = np.zeros(d_first.size)
    dfam_of = np.zeros(d_first.size, np.int64)
    dfams: list[Family] = []
    dindex: dict[int, int] = {}

    def add_family(fam: Family) -> int:
        k = dindex.get(id(fam))
        if k is None:
            k = dindex[id(fam)] = len(dfams)
            dfams.append(fam)
        return k

    dgroup = dq[d_first]
    dshape = np.full(d_first.size, "", dtype=object)
    dkv = np.zeros(d_first.size)
    tg, t_first = _group(d_first.size, *(x[d_first] for x in (m, c, pr, pl, op, at)), dn[d_first])
    for t, members in _split(tg):
        i = int(d_first[t_first[t]])
        model, cluster, precision, plan, opts = models[m[i]], clusters[c[i]], precisions[pr[i]], plans[pl[i]], \
            options[op[i]]
        explicit = denses[dn[i]]
        if explicit is not None:
            fam = family(explicit, cluster, precision, plan, opts)
            dfam_of[members] = add_family(fam)
            ffn[members] = explicit.dense_ffn_params
            dshape[members] = shape_label(explicit.attention, explicit.num_layers, explicit.hidden_size,
                                          explicit.dense_intermediate)
            dkv[members] = explicit.kv_bytes_per_token(precision.kv_bytes)
            continue
        sol = solve_twins(model, qv[dgroup[members]], attentions[at[i]])
        if not sol.ok.all():  # the validator builds every twin first; keep its error if one slipped through
            bad = members[~sol.ok][0]
            model.dense_twin(qv[dgroup[bad]], attention=attentions[at[i]])
        ffn[members] = sol.ffn_params()
        for li, lsel in _split(sol.line_of):
            line = sol.lines[li]
            dfam_of[members[lsel]] = add_family(family(line.base, cluster, precision, plan, opts, override=True))
            sh = line.shape
            uw, inv = np.unique(sol.width[lsel], return_inverse=True)
            dshape[members[lsel]] = np.array([shape_label(sh.attention, sh.num_layers, sh.hidden, int(w))
                                              for w in uw.tolist()], dtype=object)[inv.reshape(-1)]
            dkv[members[lsel]] = line.base.kv_bytes_per_token(precision.kv_bytes)
    dense.fill(np.arange(d_first.size), _side(dfams, ctx[d_first], slo[d_first], ffn, family=dfam_of,
                                              fixed=fixed[d_first]), dfams, dfam_of)

    # ---- comparison
    qs_val = np.array([r[0].qs for r in dq_rec])[dq]
    ratio, verdict, agrees = compare(moe.side.feasible[mg], dense.side.feasible[dg], moe.side.tps[mg],
                                     dense.side.tps[dg], qs_val)

    # ---- why: the ratio as a product of factors, for lanes where both sides fit
    both = np.flatnonzero(moe.side.feasible[mg] & dense.side.feasible[dg])
    if both.size:
        bm, bm_first = _group(both.size, mg[both], dg[both])
        lanes_w = both[bm_first]
        um, um_inv = np.unique(mg[lanes_w], return_inverse=True)
        ud, ud_inv = np.unique(dg[lanes_w], return_inverse=True)
        cm, tm = _category_times(moe, um, ctx[m_first[um]], None, refined)
        cd, td = _category_times(dense, ud, ctx[d_first[ud]], ffn[ud])
        _, mdp = moe.plan_columns()
        _, ddp = dense.plan_columns()

        def cluster_batch(sides: _SideSet, g: np.ndarray, dps: np.ndarray, lanes: np.ndarray) -> np.ndarray:
            return np.where(fixed[lanes] > 0, fixed[lanes], sides.side.batch[g] * dps[g])

        why = explain({k: v[um_inv] for k, v in cm.items()}, tm[um_inv],
                      cluster_batch(moe, mg[lanes_w], mdp, lanes_w),
                      {k: v[ud_inv] for k, v in cd.items()}, td[ud_inv],
                      cluster_batch(dense, dg[lanes_w], ddp, lanes_w))
        for k in WHY:
            out[f"why_{k}"][both] = why[k][bm]

    # ---- break-even q*: once per distinct feasible MoE side that asks for it (twins only)
    be = breaks[codes["break_even"]] & np.array([d is None for d in denses], dtype=bool)[dn]
    bg, b_first = _group(n, mg, at)
    want = be[b_first] & moe.side.feasible[mg[b_first]]
    q_star_b = np.full(b_first.size, np.nan)
    if want.any():
        lanes_b = b_first[want]
        sg, s_first = _group(lanes_b.size, *(x[lanes_b] for x in (m, c, pr, pl, op, at)))
        specs = [(models[m[i]], clusters[c[i]], precisions[pr[i]], plans[pl[i]], options[op[i]], attentions[at[i]])
                 for i in lanes_b[s_first].tolist()]
        q_star_b[want] = _break_even(specs, sg, ctx[lanes_b], slo[lanes_b], moe.side.tps[mg[lanes_b]],
                                     fixed[lanes_b])

    # ---- columns
    out["model"][:] = np.array([x.id for x in models], dtype=object)[m]
    out["dense_model"][:] = np.array([r[1] for r in dq_rec], dtype=object)[dq]
    out["dense_shape"][:] = dshape[dg]
    out["dense_kv_bytes_per_token"][:] = dkv[dg]
    out["moe_kv_bytes_per_token"][:] = np.array([mm.kv_bytes_per_token(pp.kv_bytes) if pp is not None else np.nan
                                                 for mm in models for pp in precisions]
                                                ).reshape(len(models), len(precisions))[m, pr]
    out["cluster"][:] = np.array([x.label for x in clusters], dtype=object)[c]
    gpus = np.array([x.num_gpus for x in clusters], dtype=np.int64)[c]
    out["gpus"][:] = gpus
    out["context"][:] = ctx
    out["s"][:] = np.array([r[0].s for r in dq_rec])[dq]
    out["q"][:] = np.array([r[0].q for r in dq_rec])[dq]
    out["qs"][:] = qs_val
    out["qs_verdict"][:] = np.array([str(r[0].verdict.value) for r in dq_rec], dtype=object)[dq]
    out["ratio"][:] = ratio
    out["verdict"][:] = verdict
    out["agrees_with_qs"][:] = agrees
    out["break_even_q"][:] = np.where(be & moe.side.feasible[mg], q_star_b[bg], np.nan)
    out["mc_microbatches"][:] = mc_n[mg]
    out["mc_rse_mean"][:] = mc_rse[mg, 0]
    out["mc_rse_p99"][:] = mc_rse[mg, 1]
    for side_name, res, grp, first in (("moe", moe, mg, m_first), ("dense", dense, dg, d_first)):
        sd = res.side
        feas = sd.feasible[grp]
        out[f"{side_name}_feasible"][:] = feas
        labels, dps = res.plan_columns()
        out[f"{side_name}_plan"][:] = np.where(feas, labels[grp], "")
        out[f"{side_name}_batch"][:] = np.where(feas, sd.batch[grp] * dps[grp], 0)
        out[f"{side_name}_batch_limit"][:] = np.where(feas, np.array(LIMITS, dtype=object)[sd.limit[grp]], "")
        tps = np.where(feas, sd.tps[grp], 0.0)
        out[f"{side_name}_tokens_per_s"][:] = tps
        out[f"{side_name}_tokens_per_s_per_gpu"][:] = tps / gpus
        out[f"{side_name}_tpot_ms"][:] = np.where(feas, sd.time[grp] * 1e3, np.nan)
        out[f"{side_name}_tpot_p99_ms"][:] = np.where(feas, sd.p99[grp] * 1e3, np.nan)
        reasons = np.full(sd.feasible.size, "", dtype=object)
        for g in np.flatnonzero(~sd.feasible).tolist():
            i = int(first[g])
            reasons[g] = _infeasible_reason(res, g, _side_model(side_name, i, models, m, dq_dense, dq, values, qc,
                                                                attentions, at, qv),
                                            clusters[c[i]], precisions[pr[i]], int(ctx[i]),
                                            None if np.isnan(slo[i]) else float(slo[i]), int(fixed[i]))
        out[f"{side_name}_reason"][:] = reasons[grp]
    return Evaluation(n=n, columns=out, values=values, codes=codes, moe=moe, dense=dense, moe_group=mg,
                      dense_group=dg, dense_models=dq_dense, dense_model_group=dq, q_value=qv[dq], refined=refined,
                      dense_ffn=ffn)


def shape_label(att: Any, layers: int, hidden: int, ffn: int) -> str:
    """A dense model's shape in one token: layers, hidden size, attention and
    KV heads (MLA: latent rank), FFN width, e.g. ``L80 d8192 gqa-kv8 ffn28672``."""
    kv = f"mla-r{att.kv_lora_rank}" if att.kind == "mla" else f"{att.kind}-kv{att.num_kv_heads}"
    return f"L{layers} d{hidden} {kv} ffn{ffn}"


def _deployed(pr: np.ndarray, precisions: list[Any], m: np.ndarray, models: list[Model]
              ) -> tuple[np.ndarray, list[Any]]:
    """Precision codes with ``None`` (the default) replaced by the MoE's
    deployed precision (:func:`qsengine.default_precision`), which both sides
    then use."""
    unset = [i for i, p in enumerate(precisions) if p is None]
    if not unset:
        return pr, precisions
    from qsengine.specs.loaders import default_precision

    out = list(precisions)
    pr = pr.copy()
    lanes = np.flatnonzero(np.isin(pr, unset))
    for mc in np.unique(m[lanes]).tolist():
        p = default_precision(models[mc])
        k = next((j for j, q in enumerate(out) if q == p), None)
        if k is None:
            k = len(out)
            out.append(p)
        pr[lanes[m[lanes] == mc]] = k
    return pr, out


def _side_model(side: str, i: int, models: list[Model], m: np.ndarray, dq_dense: list[Model | None],
                dq: np.ndarray, values: dict[str, list[Value]], qc: np.ndarray, attentions: list[str],
                at: np.ndarray, qv: np.ndarray) -> tuple[tuple, Any]:
    """(identity, builder) of lane i's model of ``side`` (built only for reasons not yet cached)."""
    if side == "moe":
        return ("moe", models[m[i]]), lambda: models[m[i]]
    explicit = dq_dense[dq[i]]
    if explicit is not None:
        return ("dense", explicit), lambda: explicit
    q = float(qv[dq[i]])
    return ("twin", models[m[i]], q, attentions[at[i]]), \
        lambda: models[m[i]].dense_twin(q, attention=attentions[at[i]])


def _infeasible_reason(res: _SideSet, k: int, who: tuple[tuple, Any], cluster: Cluster, precision: Precision,
                       context: int, slo: float | None, fixed: int = 0) -> str:
    """The reason an infeasible side reports (the packer's own words for the
    plan that came closest to fitting)."""
    from qsengine.packing import pack

    ident, build = who
    fam = res.family_of(k)
    if not fam.plans:
        return f"no valid parallel plan for {build().id} on {cluster.label}"
    plan = fam.plans[int(res.side.why[k])]
    if res.side.why_kind[k] == 1:
        return f"even batch 1 misses the TPOT target {slo * 1e3:.3g} ms at p99 (plan {plan.label})"  # type: ignore[operator]
    if res.side.why_kind[k] == 2:
        return (f"batch {fixed} does not fit: the plan that admits the most ({plan.label}) holds "
                f"{int(res.side.why_adm[k])} sequences on the cluster (or cannot split {fixed} over its replicas)")
    # the packer's reason when the weights do not fit does not depend on the context
    key = (ident, cluster, precision, context if res.side.why_fit[k] else None, plan)
    got = _REASONS.get(key)
    if got is None:
        got = pack(build(), cluster, context, plan=plan, precision=precision).reason
        if len(_REASONS) > 100_000:
            _REASONS.clear()
        _REASONS[key] = got
    return got
