"""Why: the ratio as a product of factors (headroom, weights, attention/KV,
communication, other), from the step pieces at both operating points."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from qsengine.decode.montecarlo import Refined
from qsengine.decode.sides import _SideSet, _stacked
from qsengine.decode.step import step_time

__all__ = ["WHY", "explain"]

#: The factors of :func:`explain`, in order: their product is the ratio.
WHY = ("headroom", "weights", "attention", "communication", "other")
#: Which step pieces each time factor of :data:`WHY` swaps (the rest: "other").
_CATEGORY = {"attention": "attention", "attention (local)": "attention", "dense ffn": "weights",
             "router + shared experts": "weights", "routed experts (straggler)": "weights",
             "lm head": "other", "mtp projection": "weights"}  # draft passes ("draft: <piece>") as their piece

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
                key = "communication" if pa.link else _CATEGORY[pa.name.removeprefix("draft: ")]
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
