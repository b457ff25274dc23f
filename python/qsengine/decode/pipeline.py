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
   (:class:`qsengine.decode.params.StepParams`), built once and cached;
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
from qsengine.decode.montecarlo import Refined, _refine
from qsengine.decode.point import FIELDS, Validator, Value
from qsengine.decode.prefill import PREFILL_MODES, Requests, end_to_end
from qsengine.decode.sides import LIMITS, Family, _side, _SideSet, family
from qsengine.decode.why import WHY, _category_times, explain
from qsengine.specs import Cluster, Model, Precision

__all__ = ["evaluate_columns", "evaluate", "Evaluation", "encode_points", "compare", "RECORD_COLUMNS",
           "TIE_TOLERANCE"]

#: |ratio - 1| within which the verdict is a tie.
TIE_TOLERANCE = 1e-3
_REASONS: dict[tuple, str] = {}


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
                moe_tps: np.ndarray, fixed: np.ndarray | None = None, rtol: float = 1e-3,
                requests: Requests | None = None, cap: np.ndarray | None = None) -> np.ndarray:
    """q* per lane (nan = not bracketed): the twin size multiplier at which
    dense tokens/s equals ``moe_tps``, by bisection on q.

    Lane i compares with the twins of ``specs[spec_of[i]]`` = (model,
    cluster, precision, plan, options, twin attention) at ``context[i]``,
    ``slo[i]`` (and fixed batch ``fixed[i]``, 0 = none). Dense throughput falls as q grows. The bracket runs from the
    smallest constructible twin (q ≥ 1, grown by 1.5x) to 1/s (the twin as
    large as the MoE's total parameters), widened up to 16/s while the twin
    still wins there. With ``requests`` (``context`` is then the admission
    context) the ratio is the end-to-end one (``moe_tps`` end-to-end too).
    ``cap``: the serving engine's sequences per scheduler per lane (0 = none)."""
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
        req = None if requests is None else requests.take(lanes)
        side = _side(fams, context[lanes], slo[lanes], ffn[lanes_ok], family=fam_of[lanes_ok],
                     fixed=None if fixed is None else fixed[lanes], requests=req,
                     cap=None if cap is None else cap[lanes])
        tps = side.tps if req is None else end_to_end(side.tps, side.pf, req)
        r[lanes_ok] = np.where(side.feasible, tps / moe_tps[lanes], 0.0)
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
# columns in, evaluation out
# ---------------------------------------------------------------------------


#: Columns of ``SimulationResult.to_record()`` in order, with their kind:
#: "str", "int", "float", "bool", or "bool?" (True/False/None).
RECORD_COLUMNS: tuple[tuple[str, str], ...] = (
    ("model", "str"), ("dense_model", "str"), ("dense_shape", "str"), ("moe_kv_bytes_per_token", "float"),
    ("dense_kv_bytes_per_token", "float"), ("cluster", "str"), ("gpus", "int"), ("context", "int"),
    ("s", "float"), ("q", "float"), ("qs", "float"), ("qs_verdict", "str"), ("ratio", "float"),
    ("verdict", "str"), ("agrees_with_qs", "bool?"), ("break_even_q", "float"), ("ratio_max_throughput", "float"),
    *((f"{side}_{name}", kind) for side in ("moe", "dense") for name, kind in (
        ("feasible", "bool"), ("reason", "str"), ("plan", "str"), ("batch", "int"), ("batch_limit", "str"),
        ("tokens_per_s", "float"), ("tokens_per_s_per_gpu", "float"), ("tpot_ms", "float"),
        ("tpot_p99_ms", "float"), ("idle_gpus", "int"), ("max_plan", "str"), ("max_batch", "int"),
        ("max_tokens_per_s_per_gpu", "float"), ("max_tpot_ms", "float"))),
    *((f"why_{name}", "float") for name in ("headroom", "weights", "attention", "communication", "other")),
    ("mc_microbatches", "int"), ("mc_rse_mean", "float"), ("mc_rse_p99", "float"),
    # whole requests (docs/model.md "Whole requests"): `ratio` is end-to-end when ratio_basis says so
    ("output", "int"), ("prefill", "str"), ("ratio_basis", "str"), ("ratio_decode", "float"), ("why_prefill", "float"),
    *((f"{side}_{name}", "float") for side in ("moe", "dense") for name in (
        "prefill_tokens_per_s_per_gpu", "request_tokens_per_s_per_gpu")),
    # length distributions (docs/model.md "Length distributions"): the laws, the mean cached tokens a step reads,
    # and the tokens admitted per sequence at each side's chosen plan
    ("context_dist", "str"), ("output_dist", "str"), ("read_context", "float"), ("moe_admit_context", "int"),
    ("dense_admit_context", "int"),
)
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
    requests: Requests | None = None  # per lane: the request workload (read context, prompt, output, mode)


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
    # whole requests: admission at the peak cache, steps read the running mean (prefill.Requests)
    outputs = np.array([v.obj for v in values["output"]], dtype=np.int64)
    modes = np.array([PREFILL_MODES.index(v.obj) for v in values["prefill"]], dtype=np.int8)
    # length laws: the distinct laws of both fields in one list, each lane's I and O law an index into it
    length_laws = objs("context_dist") + objs("output_dist")
    adm_ctx, req = Requests.make(contexts[codes["context"]], outputs[codes["output"]], modes[codes["prefill"]],
                                 length_laws, codes["context_dist"], codes["output_dist"] + len(values["context_dist"]))
    pr, precisions = _deployed(pr, precisions, m, models)
    c, clusters, cap = _served(c, clusters, codes["serving"], objs("serving"))
    op, options = _speculative(n, op, options, codes["draft_tokens"], objs("draft_tokens"), codes["acceptance"],
                               objs("acceptance"))
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
                         codes["batch"], mb, codes["rtol"], codes["output"], codes["prefill"], codes["context_dist"],
                         codes["output_dist"])
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
        moe.fill(members, _side(stacked, adm_ctx[lanes_f], slo[lanes_f], family=local[fg[members]],
                                fixed=fixed[lanes_f], requests=req.take(lanes_f), cap=cap[lanes_f]), stacked,
                  local[fg[members]])

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
        r = _refine(models[m[i]], precisions[pr[i]], clusters[c[i]], plan, float(req.read[i]), int(moe.side.batch[g]),
                    int(moe.side.limit[g]), None if np.isnan(slo[i]) or fixed[i] > 0 else float(slo[i]),
                    routings[rt[i]], mbs[mb[i]], seeds[i], threads, options[op[i]], rtols[codes["rtol"][i]],
                    stall=float(moe.side.stall[g]))
        refined[g] = r
        mc_n[g] = r.stats.microbatches
        if r.stats.precision is not None:
            mc_rse[g] = (r.stats.rse_mean, r.stats.rse_p99)
        moe.side.batch[g], moe.side.limit[g] = r.batch, r.limit
        moe.side.time[g], moe.side.p99[g], moe.side.tps[g] = r.time, r.p99, r.tps
    # ... and of its maximum-throughput point, where that is another point (the target binds)
    for g in np.flatnonzero(~closed[m_first] & (moe.side.max_plan >= 0)).tolist():
        i = int(m_first[g])
        sd = moe.side
        r = refined.get(g)
        if r is None or sd.max_plan[g] != sd.plan[g] or sd.max_batch[g] != sd.batch[g] or r.limit == 1:
            if seeds is None:
                raise ValueError("evaluate: Monte Carlo points (microbatches != 0) need seeds")
            plan = moe.family_of(g).plans[int(sd.max_plan[g])]
            r = _refine(models[m[i]], precisions[pr[i]], clusters[c[i]], plan, float(req.read[i]),
                        int(sd.max_batch[g]), 0, None, routings[rt[i]], mbs[mb[i]], seeds[i], threads,
                        options[op[i]], rtols[codes["rtol"][i]], stall=float(sd.max_stall[g]))
        sd.max_time[g], sd.max_p99[g], sd.max_tps[g] = r.time, r.p99, r.tps

    # ---- the dense side: once per distinct (specs, dense identity, context, slo), in one stacked call
    dg, d_first = _group(n, m, c, pr, pl, op, dq, codes["context"], codes["slo_tpot"], codes["batch"], codes["output"],
                         codes["prefill"], codes["context_dist"], codes["output_dist"])
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
            dkv[members] = explicit.kv_bytes_per_token(precision.kv_bytes, precision.kv_layout)
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
            dkv[members[lsel]] = line.base.kv_bytes_per_token(precision.kv_bytes, precision.kv_layout)
    dense.fill(np.arange(d_first.size), _side(dfams, adm_ctx[d_first], slo[d_first], ffn, family=dfam_of,
                                              fixed=fixed[d_first], requests=req.take(d_first), cap=cap[d_first]),
               dfams, dfam_of)

    # ---- comparison
    qs_val = np.array([r[0].qs for r in dq_rec])[dq]
    # end-to-end throughput (the decode throughput itself without prefill): the headline ratio
    moe_e2e = end_to_end(moe.side.tps, moe.side.pf, req.take(m_first))
    dense_e2e = end_to_end(dense.side.tps, dense.side.pf, req.take(d_first))
    ratio, verdict, agrees = compare(moe.side.feasible[mg], dense.side.feasible[dg], moe_e2e[mg],
                                     dense_e2e[dg], qs_val)
    ratio_decode = compare(moe.side.feasible[mg], dense.side.feasible[dg], moe.side.tps[mg], dense.side.tps[dg],
                           qs_val)[0]

    # ---- why: the ratio as a product of factors, for lanes where both sides fit
    both = np.flatnonzero(moe.side.feasible[mg] & dense.side.feasible[dg])
    if both.size:
        bm, bm_first = _group(both.size, mg[both], dg[both])
        lanes_w = both[bm_first]
        um, um_inv = np.unique(mg[lanes_w], return_inverse=True)
        ud, ud_inv = np.unique(dg[lanes_w], return_inverse=True)
        cm, tm = _category_times(moe, um, req.read[m_first[um]], None, refined)
        cd, td = _category_times(dense, ud, req.read[d_first[ud]], ffn[ud])
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
        q_star_b[want] = _break_even(specs, sg, adm_ctx[lanes_b], slo[lanes_b], moe_e2e[mg[lanes_b]],
                                     fixed[lanes_b], requests=req.take(lanes_b), cap=cap[lanes_b])

    # ---- columns
    out["model"][:] = np.array([x.id for x in models], dtype=object)[m]
    out["dense_model"][:] = np.array([r[1] for r in dq_rec], dtype=object)[dq]
    out["dense_shape"][:] = dshape[dg]
    out["dense_kv_bytes_per_token"][:] = dkv[dg]
    out["moe_kv_bytes_per_token"][:] = np.array([mm.kv_bytes_per_token(pp.kv_bytes, pp.kv_layout) if pp is not None
                                                 else np.nan
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
    # on the ratio's basis (end to end with a prefill mode)
    mboth = (moe.side.max_plan[mg] >= 0) & (dense.side.max_plan[dg] >= 0)
    moe_max = end_to_end(moe.side.max_tps, moe.side.max_pf, req.take(m_first))
    dense_max = end_to_end(dense.side.max_tps, dense.side.max_pf, req.take(d_first))
    with np.errstate(divide="ignore", invalid="ignore"):
        out["ratio_max_throughput"][:] = np.where(mboth, dense_max[dg] / moe_max[mg], np.nan)
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
        out[f"{side_name}_idle_gpus"][:] = np.where(feas, gpus - res.plan_gpus()[grp], 0)
        mfeas = sd.max_plan[grp] >= 0
        mlabels, mdps = res.plan_columns(sd.max_plan)
        out[f"{side_name}_max_plan"][:] = np.where(mfeas, mlabels[grp], "")
        out[f"{side_name}_max_batch"][:] = np.where(mfeas, sd.max_batch[grp] * mdps[grp], 0)
        out[f"{side_name}_max_tokens_per_s_per_gpu"][:] = np.where(mfeas, sd.max_tps[grp], 0.0) / gpus
        out[f"{side_name}_max_tpot_ms"][:] = np.where(mfeas, sd.max_time[grp] * 1e3, np.nan)
        reasons = np.full(sd.feasible.size, "", dtype=object)
        for g in np.flatnonzero(~sd.feasible).tolist():
            i = int(first[g])
            reasons[g] = _infeasible_reason(res, g, _side_model(side_name, i, models, m, dq_dense, dq, values, qc,
                                                                attentions, at, qv),
                                            clusters[c[i]], precisions[pr[i]], int(adm_ctx[i]),
                                            None if np.isnan(slo[i]) else float(slo[i]), int(fixed[i]),
                                            options[op[i]].draft_tokens)
        out[f"{side_name}_reason"][:] = reasons[grp]
        with_pf = feas & (req.mode > 0)
        out[f"{side_name}_prefill_tokens_per_s_per_gpu"][:] = np.where(with_pf, sd.pf[grp] / gpus, np.nan)
        e2e = moe_e2e if side_name == "moe" else dense_e2e
        out[f"{side_name}_request_tokens_per_s_per_gpu"][:] = np.where(with_pf, e2e[grp] / gpus, np.nan)
    out["output"][:] = req.output.astype(np.int64)
    out["context_dist"][:] = np.array([v.display for v in values["context_dist"]], dtype=object)[codes["context_dist"]]
    out["output_dist"][:] = np.array([v.display for v in values["output_dist"]], dtype=object)[codes["output_dist"]]
    out["read_context"][:] = req.read
    out["moe_admit_context"][:] = np.where(moe.side.feasible[mg], moe.side.admit[mg], 0)
    out["dense_admit_context"][:] = np.where(dense.side.feasible[dg], dense.side.admit[dg], 0)
    out["prefill"][:] = np.array(PREFILL_MODES, dtype=object)[req.mode]
    out["ratio_basis"][:] = np.where(req.mode > 0, "end-to-end", "decode").astype(object)
    out["ratio_decode"][:] = ratio_decode
    with np.errstate(divide="ignore", invalid="ignore"):
        out["why_prefill"][:] = np.where(np.isnan(out["why_headroom"]), np.nan, ratio / ratio_decode)
    return Evaluation(n=n, columns=out, values=values, codes=codes, moe=moe, dense=dense, moe_group=mg,
                      dense_group=dg, dense_models=dq_dense, dense_model_group=dq, q_value=qv[dq], refined=refined,
                      dense_ffn=ffn, requests=req)


def shape_label(att: Any, layers: int, hidden: int, ffn: int) -> str:
    """A dense model's shape in one token: layers, hidden size, attention and
    KV heads (MLA: latent rank), FFN width, e.g. ``L80 d8192 gqa-kv8 ffn28672``."""
    kv = f"mla-r{att.kv_lora_rank}" if att.kind == "mla" else f"{att.kind}-kv{att.num_kv_heads}"
    return f"L{layers} d{hidden} {kv} ffn{ffn}"


def _served(c: np.ndarray, clusters: list[Any], sc: np.ndarray, policies: list[Any]
            ) -> tuple[np.ndarray, list[Any], np.ndarray]:
    """Cluster codes and values with each lane's serving policy applied to the
    accelerator (a derived cluster per distinct (cluster, policy); the default
    policy keeps the cluster itself), and each lane's cap on sequences per
    scheduler (0 = none)."""
    cap = np.zeros(c.shape[0], np.int64)
    if all(p.name == "qsengine" for p in policies):
        return c, clusters, cap
    out = list(clusters)
    c = c.copy()
    pairs, first = _group(c.shape[0], c, sc)
    for g, i in enumerate(first.tolist()):
        lanes = pairs == g
        cl, pol = clusters[int(c[i])], policies[int(sc[i])]
        cap[lanes] = pol.max_sequences(cl.accelerator)
        if pol.name == "qsengine":
            continue
        out.append(dataclasses.replace(cl, accelerator=pol.accelerator(cl.accelerator)))
        c[lanes] = len(out) - 1
    return c, out, cap


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


def _speculative(n: int, op: np.ndarray, options: list[Any], dc: np.ndarray, drafts: list[int], ac: np.ndarray,
                 accepts: list[float]) -> tuple[np.ndarray, list[Any]]:
    """Options codes and values with each lane's speculative decoding (point
    fields ``draft_tokens``, ``acceptance``) folded into its StepOptions
    (:func:`qsengine.decode.point.with_speculation`), which the families, the
    step model and the packing (the draft module's weights and KV) read: one
    option per distinct (options, draft_tokens, acceptance). Unchanged (the
    same codes and objects) when no lane speculates."""
    from qsengine.decode.point import with_speculation

    if not any(drafts):
        return op, options
    g, first = _group(n, op, dc, ac)
    return g, [with_speculation(options[op[i]], drafts[dc[i]], accepts[ac[i]]) for i in first.tolist()]


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
                       context: int, slo: float | None, fixed: int = 0, draft: int = 0) -> str:
    """The reason an infeasible side reports (the packer's own words for the
    plan that came closest to fitting; ``draft``: draft tokens per step, the
    speculative draft module resident if > 0)."""
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
    key = (ident, cluster, precision, context if res.side.why_fit[k] else None, plan, draft)
    got = _REASONS.get(key)
    if got is None:
        used = cluster if plan.num_gpus == cluster.num_gpus else Cluster(cluster.accelerator, plan.num_gpus)
        got = pack(build(), used, context, plan=plan, precision=precision, draft_module=draft > 0,
                   draft_tokens=draft).reason
        if len(_REASONS) > 100_000:
            _REASONS.clear()
        _REASONS[key] = got
    return got
