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
from qsengine.decode.step import StepOptions, StepParams, step_params, step_time
from qsengine.packing import PlanMemory, admissible_batches, plan_memory
from qsengine.specs import Cluster, Model, Plan, Precision

__all__ = ["Family", "family", "Side", "LIMITS", "in_order_best"]

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
    elif not model.is_moe and (plan.ep > 1 or plan.etp is not None or plan.redundant > 0):
        plan_list = [dataclasses.replace(plan, ep=1, etp=None, redundant=0)]
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
