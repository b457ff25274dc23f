"""The closed-form fast path: many ``simulate(..., microbatches=0)`` points per call.

:func:`evaluate_columns` (points as columns of value codes, results as
columns; what sweeps call) and :func:`evaluate_closed_form` (a list of point
dicts, a list of records) return exactly the rows
``simulate(**point).to_record()`` would, by running the *same* step model
(:func:`qsengine.step.step_time`) over arrays of lanes instead of one point at
a time:

* per (model, cluster, precision, plan spec, options, routing) a **family** is
  built once and cached: its plan list, the per-plan packing constants
  (:func:`qsengine.packing.plan_memory`) and the per-plan step parameters
  (:class:`qsengine.step.StepParams`); the dense twins of one MoE
  (``twin_attention="same"``) form one family whose members differ only in
  their FFN width (solved for many q at once by
  :func:`qsengine.specs.twin.solve_widths`);
* a **side** (the MoE, or a dense twin) of many lanes (context, SLO[, width])
  is evaluated over lanes x plans at once (families sharing a routing law,
  e.g. all dense twins, in one call): admissible batch
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qsengine._groups import group as _group
from qsengine._groups import split as _split
from qsengine.packing import PlanMemory, admissible_batches, plan_memory
from qsengine.simulation import _verdict_text
from qsengine.specs import Cluster, Model, Plan, Precision
from qsengine.step import StepOptions, StepParams, step_params, step_time

__all__ = ["evaluate_closed_form", "evaluate_columns", "encode_points", "RECORD_COLUMNS"]

_TIE = 1e-3  # simulation._verdict's tie tolerance
_BLOCK = 1 << 14  # rows per step-model call: its ~150 temporaries stay in cache
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
    why_fit: np.ndarray  # that plan's weights fit (its packing fails on the KV cache)


def _side(fams: "_Family | Sequence[_Family]", context: np.ndarray, slo: np.ndarray,
          ffn_params: np.ndarray | None = None, family: np.ndarray | None = None) -> _Side:
    """Best plan and batch for many lanes (context, slo (nan = none)[, twin FFN
    params]): ``simulation.evaluate_side`` with ``microbatches=0``, over
    arrays. Lane i belongs to ``fams[family[i]]`` (one family: all lanes); the
    families must share their routing law (``pi``, experts and top-k: dense
    twins always do); the plan index returned is into the lane's family's
    plans."""
    if isinstance(fams, _Family):
        fams = [fams]
    n = context.shape[0]
    fam_of = np.zeros(n, np.int64) if family is None else np.asarray(family, dtype=np.int64)
    # infeasible lanes: plan -1, batch 0, time and p99 nan, throughput 0 (whatever else is stacked)
    out = _Side(np.zeros(n, bool), np.full(n, -1), np.zeros(n, np.int64), np.zeros(n, np.int8), np.full(n, np.nan),
                np.full(n, np.nan), np.zeros(n), np.full(n, -1), np.zeros(n, bool), np.zeros(n, bool))
    counts = np.array([len(f.plans) for f in fams], dtype=np.int64)
    if n == 0 or not counts.any():
        return out
    # lanes sorted by family: each family's rows (lane x its plans) are one slice
    order = np.argsort(fam_of, kind="stable")
    per_lane = counts[fam_of[order]]
    lane = order[np.repeat(np.arange(n), per_lane)]
    start = np.cumsum(per_lane) - per_lane
    pidx = np.arange(lane.size) - np.repeat(start, per_lane)  # plan index within the lane's family
    fam_row = fam_of[lane]
    ctx = context[lane]
    wb = np.array([f.precision.weight_bytes for f in fams], dtype=np.float64)
    ffn_bytes = None if ffn_params is None else ffn_params[lane] * wb[fam_row]
    adm = np.zeros(lane.size, np.int64)
    fit = np.zeros(lane.size, bool)
    fullest = np.zeros(lane.size)  # weight bytes on the row's fullest GPU
    bounds = np.searchsorted(fam_row, np.arange(len(fams) + 1)) if len(fams) > 1 else np.array([0, lane.size])
    for f, fam in enumerate(fams):
        sl = slice(bounds[f], bounds[f + 1])
        if sl.start < sl.stop:
            adm[sl], fit[sl], fullest[sl] = admissible_batches(
                fam.memory, pidx[sl], ctx[sl], None if ffn_bytes is None else ffn_bytes[sl], fullest=True)
    ok = adm >= 1  # pack(...).feasible: weights fit and one sequence fits
    rows = np.flatnonzero(ok)
    stack = _stacked(fams)
    gplan = stack.offset[fam_row[rows]] + pidx[rows]
    ffn_rows = None if ffn_params is None else ffn_params[lane[rows]].astype(np.float64)
    c = ctx[rows].astype(np.float64)
    s = slo[lane[rows]]
    pi = fams[0].pi
    if any(f.pi is not pi or (f.model.routed_experts, f.model.top_k) != (fams[0].model.routed_experts,
                                                                          fams[0].model.top_k) for f in fams):
        raise ValueError("_side: stacked families must share their routing law (pi, experts, top-k)")

    def step(sub: np.ndarray | None, b: np.ndarray) -> dict[str, np.ndarray]:
        """time and p99 of rows ``sub`` (None: all) at batches ``b``, in
        cache-sized blocks (the step model is elementwise over rows)."""
        idx = np.arange(rows.size) if sub is None else sub
        got = {"time": np.empty(idx.size), "p99": np.empty(idx.size)}
        for lo in range(0, idx.size, _BLOCK):
            blk = idx[lo:lo + _BLOCK]
            sp = stack.params.take(gplan[blk])
            if ffn_rows is not None:
                sp = sp.replace(ffn_params=ffn_rows[blk])
            r = step_time(sp, b[lo:lo + _BLOCK].astype(np.float64), c[blk], pi=pi, uniform=pi is None)
            got["time"][lo:lo + blk.size] = r["time"]
            got["p99"][lo:lo + blk.size] = r["p99"]
        return got

    K = rows.size
    batch = adm[rows]
    limit = np.zeros(K, np.int8)
    top = step(None, batch)
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
        thr = np.where(time > 0, batch / time, 0.0) * stack.dp[stack.offset[fam_row[rows]] + pidx[rows]]
    # in-order selection: a plan replaces the best only if better by 1e-12 (relative)
    P = int(counts.max())
    T = np.full((n, P), np.nan)
    T[lane[rows[valid]], pidx[rows[valid]]] = thr[valid]
    where = np.full((n, P), -1)
    where[lane[rows], pidx[rows]] = np.arange(K)
    best, arg = _in_order_best(T)
    feas = arg >= 0
    k = np.maximum(where[np.arange(n), np.maximum(arg, 0)], 0)
    # the reason evaluate_side gives when no plan is feasible: the first plan
    # that packs but misses the SLO at batch 1, else the packing-infeasible plan
    # with the least weight on its fullest GPU (first of equals)
    slo_fail = np.zeros((n, P), bool)
    slo_fail[lane[rows[~valid]], pidx[rows[~valid]]] = True
    out.why_slo = slo_fail.any(axis=1)
    out.why = np.argmax(slo_fail, axis=1)
    none_ok = (np.bincount(lane[rows], minlength=n) == 0) & ~out.why_slo & (counts[fam_of] > 0)
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


_STACKS: dict[tuple[int, ...], tuple[tuple[_Family, ...], _Stack]] = {}


def _stacked(fams: Sequence[_Family]) -> _Stack:
    key = tuple(id(f) for f in fams)
    got = _STACKS.get(key)
    if got is None:
        present = [f for f in fams if f.plans]
        counts = [len(f.plans) for f in fams]
        stack = _Stack(offset=np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64),
                       params=StepParams.stack([f.params for f in present]),
                       dp=np.concatenate([f.dp for f in present]))
        if len(_STACKS) > 4096:
            _STACKS.clear()
        got = _STACKS[key] = (tuple(fams), stack)  # keep the families alive: their ids stay unique
    return got[1]


def _in_order_best(T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``T`` (nan = no value): the value and column that a scan in
    column order keeps when a value replaces the best only if better by 1e-12
    (relative) -- evaluate_side's rule. Rows whose maximum beats every other
    value by more than that tolerance take the argmax; the few others are
    scanned."""
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
# break-even q*, vectorised over lanes
# ---------------------------------------------------------------------------


def _break_even(twins: list[tuple], twin_of: np.ndarray, context: np.ndarray, slo: np.ndarray, moe_tps: np.ndarray,
                sparsity: np.ndarray, rtol: float = 1e-3) -> np.ndarray:
    """``simulation._break_even_q`` for many lanes at once (nan = None).

    Lane i compares an MoE side of throughput ``moe_tps[i]`` with the twins of
    ``twins[twin_of[i]]`` = (model, cluster, precision, plan, options) at
    ``context[i]``, ``slo[i]`` (nan = none)."""
    n = twin_of.size

    fams = [_family(_twin_line(t[0])[0], t[1], t[2], t[3], t[4], "uniform") for t in twins]

    def ratio(idx: np.ndarray, q: np.ndarray) -> np.ndarray:
        """ratio(q) for lanes idx: nan = twin cannot be built, 0 = infeasible."""
        r = np.full(idx.size, np.nan)
        ok = np.zeros(idx.size, bool)
        ffn = np.zeros(idx.size)
        for t, sel in _split(twin_of[idx]):
            _, ok[sel], ffn[sel] = _twin_widths(twins[t][0], q[sel])
        lanes_ok = np.flatnonzero(ok)
        lanes = idx[lanes_ok]
        side = _side(fams, context[lanes], slo[lanes], ffn[lanes_ok], family=twin_of[lanes])
        r[lanes_ok] = np.where(side.feasible, side.tps / moe_tps[lanes], 0.0)
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
# lanes and groups
# ---------------------------------------------------------------------------


#: Columns of ``SimulationResult.to_record()`` in order, with their kind:
#: "str", "int", "float", "bool", or "bool?" (True/False/None).
RECORD_COLUMNS: tuple[tuple[str, str], ...] = (
    ("model", "str"), ("dense_model", "str"), ("cluster", "str"), ("gpus", "int"), ("context", "int"),
    ("s", "float"), ("q", "float"), ("qs", "float"), ("qs_verdict", "str"), ("ratio", "float"),
    ("verdict", "str"), ("agrees_with_qs", "bool?"), ("break_even_q", "float"),
    *((f"{side}_{name}", kind) for side in ("moe", "dense") for name, kind in (
        ("feasible", "bool"), ("reason", "str"), ("plan", "str"), ("batch", "int"), ("batch_limit", "str"),
        ("tokens_per_s", "float"), ("tokens_per_s_per_gpu", "float"), ("tpot_ms", "float"),
        ("tpot_p99_ms", "float"))),
)
_EMPTY = {"str": "", "int": 0, "float": math.nan, "bool": False, "bool?": None}


def _empty_columns(n: int) -> dict[str, np.ndarray]:
    dtypes = {"str": object, "int": np.int64, "float": np.float64, "bool": bool, "bool?": object}
    return {name: np.full(n, _EMPTY[kind], dtype=dtypes[kind]) for name, kind in RECORD_COLUMNS}


#: The point columns of :func:`evaluate_columns`: per field, (distinct values, code per lane).
Columns = Mapping[str, "tuple[Sequence[Any], np.ndarray]"]


def encode_points(points: Sequence[Mapping[str, Any]]) -> tuple[dict[str, tuple[list[Any], np.ndarray]], int]:
    """Point dicts as :data:`Columns` (missing fields take simulate's defaults)."""
    from qsengine.simulation import POINT_FIELDS

    n = len(points)
    cols: dict[str, tuple[list[Any], np.ndarray]] = {}
    for field, default in POINT_FIELDS.items():
        distinct: list[Any] = []
        index: dict[Any, int] = {}
        codes = np.empty(n, dtype=np.int64)
        for i, pt in enumerate(points):
            v = pt.get(field, default) if default is not ... else pt[field]
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
        cols[field] = (distinct, codes)
    return cols, n


def _columns_to_records(out: Mapping[str, np.ndarray], n: int) -> list[dict[str, Any]]:
    names = [name for name, _ in RECORD_COLUMNS]
    lists = [out[name].tolist() for name in names]
    return [dict(zip(names, vals)) for vals in zip(*lists)] if n else []


# ---------------------------------------------------------------------------
# the entry points
# ---------------------------------------------------------------------------


def _is_zero(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) and v == 0


def evaluate_closed_form(points: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``[simulate(**p).to_record() for p in points]`` for closed-form points
    (``microbatches=0``), vectorised. Each point is a dict of simulate's
    keyword arguments (``model``, ``cluster``, ``context``, ``q``, ``routing``,
    ``plan``, ``precision``, ``slo_tpot``, ``twin_attention``, ``break_even``,
    ``options``; names or specs). Points the fast path does not cover (an
    explicit ``dense`` model, ``twin_attention="gqa"``, ``microbatches != 0``,
    a dense ``model`` or an invalid value) are passed to simulate one by one.

    This is the list-of-dicts face of :func:`evaluate_columns` (which sweeps
    call directly, and which is several times faster on large batches)."""
    cols, n = encode_points(points)
    return _columns_to_records(evaluate_columns(cols, n), n)


def evaluate_columns(columns: Columns, n: int) -> dict[str, np.ndarray]:
    """The records of ``n`` points given column-wise, as columns.

    ``columns[field] = (values, codes)``: the distinct values of that
    simulate argument and, per point, the index of its value (every field of
    :data:`qsengine.simulation.POINT_FIELDS`; a missing field takes its
    default). Returns ``{name: array of n}`` for every column of
    ``SimulationResult.to_record()`` (:data:`RECORD_COLUMNS`): int64, float64
    and bool arrays, object arrays of str, and of True/False/None for
    ``agrees_with_qs``. Equal, element by element, to the records of
    ``simulate(**point)`` (which is called for points the fast path does not
    cover, and which raises the errors of bad points)."""
    from qsengine.simulation import POINT_FIELDS, simulate
    from qsengine.specs.loaders import as_model

    cols: dict[str, tuple[Sequence[Any], np.ndarray]] = {}
    for field, default in POINT_FIELDS.items():
        if field in columns:
            vals, codes = columns[field]
            codes = np.asarray(codes, dtype=np.int64)
            if codes.shape != (n,) or (n and (codes.min() < 0 or codes.max() >= len(vals))):
                raise ValueError(f"evaluate_columns: field {field!r}: codes must be {n} indices into its "
                                 f"{len(vals)} values")
            cols[field] = (list(vals), codes)
        elif default is ...:
            raise ValueError(f"evaluate_columns: required field {field!r} is missing")
        else:
            cols[field] = ([default], np.zeros(n, dtype=np.int64))
    out = _empty_columns(n)
    if n == 0:
        return out

    def per_value(field: str, fn) -> list[Any]:
        return [fn(v) for v in cols[field][0]]

    def lane(field: str, table: Sequence[Any], dtype: Any = None) -> np.ndarray:
        return np.asarray(table, dtype=dtype)[cols[field][1]]

    # ---- which lanes the fast path covers (checked per distinct value); the rest go to simulate
    models = per_value("model", as_model)
    good = lane("model", [m.is_moe for m in models], bool)
    good &= lane("microbatches", per_value("microbatches", _is_zero), bool)
    good &= lane("dense", per_value("dense", lambda v: v is None), bool)
    good &= lane("twin_attention", per_value("twin_attention", lambda v: isinstance(v, str) and v == "same"), bool)
    good &= lane("context", per_value("context", lambda v: isinstance(v, (int, np.integer))
                                      and not isinstance(v, (bool, np.bool_)) and v >= 1), bool)
    good &= lane("slo_tpot", per_value("slo_tpot", lambda v: v is None or (
        isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
        and math.isfinite(v) and v > 0)), bool)
    scalar = np.flatnonzero(~good)
    fast = np.flatnonzero(good)
    if fast.size:
        _evaluate_fast(cols, fast, models, out)
    for i in scalar.tolist():  # simulate computes (or raises for) what the fast path does not cover
        rec = simulate(**{f: cols[f][0][cols[f][1][i]] for f in cols}).to_record()
        for name, value in rec.items():
            out[name][i] = value
    return out


def _evaluate_fast(cols, lanes: np.ndarray, models: list[Model], out: dict[str, np.ndarray]) -> None:
    """Fill ``out`` at ``lanes`` (all covered by the fast path)."""
    from qsengine.specs.loaders import as_cluster, as_precision
    from qsengine.specs.twin import qs as qs_record
    from qsengine.specs.twin import resolve_q

    n = lanes.size
    code = {f: c[lanes] for f, (_, c) in cols.items()}
    clusters = [as_cluster(v) for v in cols["cluster"][0]]
    precisions = [as_precision(v) for v in cols["precision"][0]]
    options = [v or _DEFAULT_OPTIONS for v in cols["options"][0]]
    plans = cols["plan"][0]
    routings = cols["routing"][0]
    contexts = np.array([int(v) for v in cols["context"][0]], dtype=np.int64)
    slos = np.array([np.nan if v is None else float(v) for v in cols["slo_tpot"][0]])
    breaks = np.array([bool(v) for v in cols["break_even"][0]])
    ctx, slo = contexts[code["context"]], slos[code["slo_tpot"]]
    m, c, pr, pl, op, rt = (code[f] for f in ("model", "cluster", "precision", "plan", "options", "routing"))

    def spec(i: int) -> tuple:  # (model, cluster, precision, plan, options) of lane i
        return models[m[i]], clusters[c[i]], precisions[pr[i]], plans[pl[i]], options[op[i]]

    # ---- (model, q) pairs: the twin's q, qs record and id (resolve_q raises for a bad q, as simulate does)
    mq, mq_first = _group(n, m, code["q"])
    qv = np.empty(mq_first.size)
    mq_rec = []
    for g, i in enumerate(mq_first.tolist()):
        model, q = models[m[i]], cols["q"][0][code["q"][i]]
        q_value = "sqrt" if q is None else q
        qv[g] = resolve_q(model, q_value)
        rec = qs_record(model, q_value)
        mq_rec.append((rec, f"{model.id}-dense-q{qv[g]:.2f}", q_value))

    # ---- the MoE side: once per distinct (specs, routing, context, slo); families with
    # the same routing law (all uniform ones) in one stacked call
    mg, m_first = _group(n, m, c, pr, pl, op, rt, code["context"], code["slo_tpot"])
    moe = _Sides.empty(m_first.size)
    fg, f_first = _group(m_first.size, m[m_first], c[m_first], pr[m_first], pl[m_first], op[m_first], rt[m_first])
    fams = []
    for i in m_first[f_first].tolist():
        model, cluster, precision, plan, opts = spec(i)
        fams.append(_family(model, cluster, precision, plan, opts, routings[rt[i]]))
    laws: dict[tuple, list[int]] = {}  # the closed-form straggler takes one routing law per call
    for f, fam in enumerate(fams):
        laws.setdefault((id(fam.pi), fam.model.routed_experts, fam.model.top_k), []).append(f)
    for fs in laws.values():
        local = np.full(len(fams), -1, np.int64)
        local[fs] = np.arange(len(fs))
        members = np.flatnonzero(local[fg] >= 0)
        lanes_f = m_first[members]
        stacked = [fams[f] for f in fs]
        moe.fill(members, _side(stacked, ctx[lanes_f], slo[lanes_f], family=local[fg[members]]), stacked,
                 local[fg[members]])

    # ---- the dense twin: once per distinct (specs, q, context, slo); one family per MoE
    # spec, all in one stacked call
    dg, d_first = _group(n, m, c, pr, pl, op, code["q"], code["context"], code["slo_tpot"])
    dense = _Sides.empty(d_first.size)
    tg, t_first = _group(d_first.size, m[d_first], c[d_first], pr[d_first], pl[d_first], op[d_first])
    ffn = np.empty(d_first.size)
    for t, members in _split(tg):
        i = d_first[t_first[t]]
        model, cluster, precision, plan, opts = spec(i)
        lanes_t = d_first[members]
        _, ok, ffn[members] = _twin_widths(model, qv[mq[lanes_t]])
        if not ok.all():  # simulate builds the twin before anything else: same error
            model.dense_twin(mq_rec[mq[lanes_t[~ok][0]]][2])
    twin_fams = []
    for i in d_first[t_first].tolist():
        model, cluster, precision, plan, opts = spec(i)
        twin_fams.append(_family(_twin_line(model)[0], cluster, precision, plan, opts, "uniform"))
    dense.fill(np.arange(d_first.size), _side(twin_fams, ctx[d_first], slo[d_first], ffn, family=tg), twin_fams, tg)

    # ---- break-even q*: once per distinct MoE side that is feasible and asked for it
    be = breaks[code["break_even"]]
    want = np.zeros(m_first.size, bool)
    want[mg[be]] = True
    want &= moe.feasible
    be_groups = np.flatnonzero(want)
    q_star = np.full(m_first.size, np.nan)
    if be_groups.size:
        be_lanes = m_first[be_groups]
        tw, tw_first = _group(be_lanes.size, *(x[be_lanes] for x in (m, c, pr, pl, op)))
        q_star[be_groups] = _break_even([spec(be_lanes[i]) for i in tw_first.tolist()], tw, ctx[be_lanes],
                                        slo[be_lanes], moe.tps[be_groups],
                                        np.array([models[k].sparsity for k in m[be_lanes]]))

    # ---- columns
    def set_(name: str, values: Any) -> None:
        out[name][lanes] = values

    set_("model", np.array([x.id for x in models], dtype=object)[m])
    set_("dense_model", np.array([r[1] for r in mq_rec], dtype=object)[mq])
    set_("cluster", np.array([x.label for x in clusters], dtype=object)[c])
    gpus = np.array([x.num_gpus for x in clusters], dtype=np.int64)[c]
    set_("gpus", gpus)
    set_("context", ctx)
    set_("s", np.array([r[0].s for r in mq_rec])[mq])
    set_("q", np.array([r[0].q for r in mq_rec])[mq])
    qs_val = np.array([r[0].qs for r in mq_rec])[mq]
    set_("qs", qs_val)
    set_("qs_verdict", np.array([_verdict_text(r[0].verdict) for r in mq_rec], dtype=object)[mq])
    mf, df = moe.feasible[mg], dense.feasible[dg]
    both = mf & df
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(both, dense.tps[dg] / moe.tps[mg], np.nan)
    tie = both & (np.abs(ratio - 1.0) <= _TIE)
    verdict = np.select([~mf & ~df, ~mf, ~df, tie, ratio > 1], ["neither", "dense-only", "moe-only", "tie", "dense"],
                        "moe").astype(object)
    set_("ratio", ratio)
    set_("verdict", verdict)
    agrees = np.full(n, None, dtype=object)
    decided = both & ~tie
    agrees[decided] = ((ratio > 1) == (qs_val < 1.0))[decided]
    set_("agrees_with_qs", agrees)
    set_("break_even_q", np.where(be & mf, q_star[mg], np.nan))
    for side, res, grp in (("moe", moe, mg), ("dense", dense, dg)):
        feas = res.feasible[grp]
        set_(f"{side}_feasible", feas)
        labels, dps = res.plan_columns()
        set_(f"{side}_plan", np.where(feas, labels[grp], ""))
        set_(f"{side}_batch", np.where(feas, res.batch[grp] * dps[grp], 0))
        set_(f"{side}_batch_limit", np.where(feas, np.where(res.limit[grp] == 1, "slo", "hbm"), "").astype(object))
        tps = np.where(feas, res.tps[grp], 0.0)
        set_(f"{side}_tokens_per_s", tps)
        set_(f"{side}_tokens_per_s_per_gpu", tps / gpus)
        set_(f"{side}_tpot_ms", np.where(feas, res.time[grp] * 1e3, np.nan))
        set_(f"{side}_tpot_p99_ms", np.where(feas, res.p99[grp] * 1e3, np.nan))
        reasons = np.full(res.feasible.size, "", dtype=object)
        first = m_first if side == "moe" else d_first
        for g in np.flatnonzero(~res.feasible).tolist():
            i = first[g]
            model, cluster, precision, _, _ = spec(i)
            reasons[g] = _infeasible_reason(side, res, g, model, cluster, precision, int(ctx[i]),
                                            mq_rec[mq[i]][2], None if np.isnan(slo[i]) else float(slo[i]))
        set_(f"{side}_reason", reasons[grp])


def _infeasible_reason(side: str, res: "_Sides", k: int, model: Model, cluster: Cluster, precision: Precision,
                       context: int, q_value: Any, slo: float | None) -> str:
    """evaluate_side's reason for an infeasible side (the packer's own words)."""
    from qsengine.packing import pack

    plans = res.plans_of(k)
    if not plans:
        m = model if side == "moe" else model.dense_twin(q_value)
        return f"no valid parallel plan for {m.id} on {cluster.label}"
    plan = plans[int(res.why[k])]
    if res.why_slo[k]:
        return f"even batch 1 misses the TPOT target {slo * 1e3:.3g} ms (plan {plan.label})"
    # the packer's reason when the weights do not fit does not depend on the context
    key = (side, model, q_value if side == "dense" else None, cluster, precision,
           context if res.why_fit[k] else None, plan)
    got = _REASONS.get(key)
    if got is None:
        m = model if side == "moe" else model.dense_twin(q_value)
        got = pack(m, cluster, context, plan=plan, precision=precision).reason
        if len(_REASONS) > 100_000:
            _REASONS.clear()
        _REASONS[key] = got
    return got


@dataclass
class _Sides:
    """Side results of many groups, each group filled from one family's _side."""

    feasible: np.ndarray
    plan: np.ndarray
    batch: np.ndarray
    limit: np.ndarray
    time: np.ndarray
    p99: np.ndarray
    tps: np.ndarray
    why: np.ndarray
    why_slo: np.ndarray
    why_fit: np.ndarray
    family: np.ndarray  # index into families
    families: list[tuple[Plan, ...]]  # the plan list of each family filled in

    @classmethod
    def empty(cls, n: int) -> "_Sides":
        return cls(np.zeros(n, bool), np.full(n, -1), np.zeros(n, np.int64), np.zeros(n, np.int8), np.zeros(n),
                   np.zeros(n), np.zeros(n), np.full(n, -1), np.zeros(n, bool), np.zeros(n, bool),
                   np.zeros(n, np.int64), [])

    def fill(self, idx: np.ndarray, side: _Side, fams: Sequence[_Family], family: np.ndarray) -> None:
        """Groups ``idx`` take ``side``'s lanes; lane j is of ``fams[family[j]]``."""
        for name in ("feasible", "plan", "batch", "limit", "time", "p99", "tps", "why", "why_slo", "why_fit"):
            getattr(self, name)[idx] = getattr(side, name)
        self.family[idx] = len(self.families) + family
        self.families.extend(f.plans for f in fams)

    def plans_of(self, k: int) -> tuple[Plan, ...]:
        return self.families[int(self.family[k])]

    def plan_columns(self) -> tuple[np.ndarray, np.ndarray]:
        """(label, dp) of each group's chosen plan (meaningless where infeasible)."""
        labels = np.array([""] + [p.label for ps in self.families for p in ps], dtype=object)
        dps = np.array([1] + [p.dp for ps in self.families for p in ps], dtype=np.int64)
        offset = np.cumsum([1] + [len(ps) for ps in self.families])[:-1]
        at = np.where(self.feasible, offset[self.family] + self.plan, 0) if self.families else \
            np.zeros(self.feasible.size, dtype=np.int64)
        return labels[at], dps[at]
