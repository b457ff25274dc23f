"""One side's latency-throughput Pareto frontier, and its throughput at a
given TPOT: the comparison at equal latency."""

from __future__ import annotations

import math

import numpy as np

from qsengine.decode.prefill import PREFILL_MODES, admission_context, prefill_ctx_flops, prefill_time
from qsengine.decode.sides import Family, capped_units
from qsengine.decode.step import step_time
from qsengine.packing import admissible_batches

__all__ = ["FRONTIER_COLUMNS", "frontier", "throughput_at"]


# ---------------------------------------------------------------------------
# the latency-throughput frontier of one side
# ---------------------------------------------------------------------------

#: Columns of :func:`frontier`.
FRONTIER_COLUMNS = ("side", "plan", "batch", "tpot", "tpot_p99", "tokens_per_s_per_gpu", "tokens_per_s_per_user",
                    "request_tokens_per_s_per_gpu")


def frontier(fam: Family, context: int, ffn_params: float | None = None, *, side: str = "",
             points: int = 40, read_context: float | None = None, prompt: float = 0.0, output: float = 0.0,
             prefill: str = "none", pool: float = math.nan, spread: float = 0.0, prefill_seconds=None,
             cap: int = 0):
    """The Pareto frontier of one side: output tokens/s per GPU of the
    cluster against tokens/s per user (1/TPOT), over every feasible plan of
    ``fam`` and, per plan, ``points`` batches spaced geometrically from one
    sequence per admission unit to the admissible maximum (the step model at
    each; the closed-form straggler of the family's routing law, so for a
    Monte Carlo point its independent proxy). A point is kept when no other
    point has both a lower (or equal) mean TPOT and a higher throughput per
    GPU. Returns a DataFrame with :data:`FRONTIER_COLUMNS` (``batch``:
    concurrent sequences on the cluster; ``tpot``/``tpot_p99`` in seconds),
    sorted by TPOT. ``read_context``: the cached tokens a step reads, when
    they differ from the admission ``context`` (a request workload: the
    running mean).

    Whole requests (``prefill`` "colocated" or "disaggregated", ``prompt`` = I
    and ``output`` = O tokens per request; docs/model.md "Whole requests"):
    ``request_tokens_per_s_per_gpu`` is the end-to-end output tokens/s per
    GPU and the Pareto set is taken on it. Colocated: each plan's prefill of
    one request stalls its replica t_pf, so ``tpot``/``tpot_p99`` add
    B·t_pf/O and the end-to-end rate is B·dp/TPOT (per GPU); disaggregated:
    the harmonic combination with the prefill pool's ``pool`` prompt tokens/s
    per GPU. Without prefill the column is nan and ``tokens_per_s_per_gpu``
    (decode) is the basis. Length distributions: ``spread`` (> 0) is the sd
    of a slot's cache, each plan admits at
    :func:`~qsengine.decode.prefill.admission_context` (``context`` is then
    the mean cache, rounded up), and ``prefill_seconds(params, ctx_flops)``
    gives E[t_pf(I)] per row (default: :func:`prefill_time` at ``prompt``).
    ``cap``: the serving engine's sequences per scheduler (0 = none;
    :func:`qsengine.decode.sides.capped_units`)."""
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
    if spread > 0:  # a length distribution: the mean cache plus its margin over the plan's pool
        ok = adm >= 1
        adm_ctx = admission_context(np.full(P, float(context if read_context is None else read_context)),
                                    np.full(P, spread), adm)
        adm = np.where(ok, admissible_batches(fam.memory, idx, adm_ctx, fb)[0], 0)
    if cap:
        adm = capped_units(adm, np.full(P, int(cap)), fam.params.attn_dp, fam.params.tp, fam.unit)
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
    r = step_time(sp, batch, np.full(plan_idx.size, float(context if read_context is None else read_context)),
                  pi=fam.pi, uniform=fam.pi is None)
    mode = PREFILL_MODES.index(prefill)
    dp = fam.dp[plan_idx]
    gpus = fam.cluster.num_gpus
    tpot, tpot99 = r.time, r.p99
    if mode == 1:  # colocated: B/O prompts of t_pf each stall every decode step of the replica
        fl = np.full(plan_idx.size, prefill_ctx_flops(fam.model))
        t_pf = prefill_time(sp, np.full(plan_idx.size, float(prompt)), fl, pi=fam.pi, uniform=fam.pi is None) \
            if prefill_seconds is None else prefill_seconds(sp, fl)
        tpot, tpot99 = r.time + batch * t_pf / output, r.p99 + batch * t_pf / output
    with np.errstate(divide="ignore", invalid="ignore"):
        per_gpu = batch * dp / r.time / gpus
        per_user = 1.0 / tpot
        if mode == 1:
            e2e = batch * dp / tpot / gpus
        elif mode == 2:
            e2e = 1.0 / (1.0 / per_gpu + (prompt / output) / pool)
        else:
            e2e = np.full(plan_idx.size, math.nan)
    basis = per_gpu if mode == 0 else e2e
    order = np.lexsort((-basis, tpot))
    best = np.maximum.accumulate(basis[order])
    keep = order[np.concatenate([[True], basis[order][1:] > best[:-1]])]
    labels = np.array([fam.plans[i].label for i in range(P)], dtype=object)
    return pd.DataFrame({"side": side, "plan": labels[plan_idx[keep]], "batch": (batch * dp)[keep].astype(np.int64),
                         "tpot": tpot[keep], "tpot_p99": tpot99[keep], "tokens_per_s_per_gpu": per_gpu[keep],
                         "tokens_per_s_per_user": per_user[keep], "request_tokens_per_s_per_gpu": e2e[keep]}
                        ).reset_index(drop=True)


def throughput_at(front, tpot: float, column: str = "tpot", value: str = "tokens_per_s_per_gpu") -> float:
    """Tokens/s per GPU a side reaches at a TPOT of ``tpot`` seconds on its
    frontier: linear interpolation in TPOT between the frontier points around
    it; below the fastest point nan (the side cannot serve that fast), above
    the slowest its maximum throughput. ``column``: "tpot" (mean) or
    "tpot_p99"; ``value``: "tokens_per_s_per_gpu" (decode) or
    "request_tokens_per_s_per_gpu" (end to end)."""
    if len(front) == 0:
        return math.nan
    t = front[column].to_numpy()
    g = front[value].to_numpy()
    order = np.argsort(t, kind="stable")
    t, g = t[order], np.maximum.accumulate(g[order])
    if tpot < t[0]:
        return math.nan
    return float(np.interp(tpot, t, g))
