"""The routing Monte Carlo at a side's chosen operating point: it replaces the
closed-form straggler there (plans were ranked with the routing law's
independent proxy) and steps the batch down while the latency target is
missed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from qsengine.decode.params import StepOptions, step_params
from qsengine.decode.step import step_time
from qsengine.specs import Cluster, Model, Plan, Precision

__all__ = ["AUTO_MAX_MICROBATCHES", "Refined"]

#: ``microbatches="auto"``: the Monte Carlo runs until the relative standard
#: errors of the mean and p99 routed-straggler step time reach the point's
#: ``rtol`` (:func:`qsengine.route` with ``rtol``: checkpoints on a fixed block
#: schedule, so the stop is the same for any thread count), at most this many
#: microbatches.
AUTO_MAX_MICROBATCHES = 100_000


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


def _refine(model: Model, precision: Precision, cluster: Cluster, plan: Plan, context: float, batch: int,
            limit: int, slo_tpot: float | None, routing: Any, microbatches: int | str,
            seed: np.random.SeedSequence | None, threads: int | None, options: StepOptions,
            rtol: float = 1e-3, stall: float = 0.0) -> Refined:
    """The step time at ``batch`` with the routed-expert straggler from the
    routing Monte Carlo; if the Monte Carlo TPOT misses the target, the batch
    steps down (in admission units) and the Monte Carlo runs again (the
    target holds on the p99). ``stall``: colocated prefill's stall per
    running sequence and step (t_pf / O, seconds): the TPOT (mean and p99,
    ``Refined.time``/``p99``) is the step's plus ``batch · stall``; ``tps``
    stays the decode throughput."""
    from qsengine.decode.straggler import moe_layer_shape
    from qsengine.routing import Placement, route

    acc = cluster.accelerator
    placement = Placement.contiguous(plan.ep)
    if plan.redundant > 0:  # the plan's redundant slots, EPLB-placed from the law's (proxy) popularity
        from qsengine.decode.slots import slot_placement
        from qsengine.decode.straggler import _inclusion_probabilities
        from qsengine.routing import proxy_popularity

        pop = proxy_popularity(routing, model.routed_experts)
        pi = None if pop is None else _inclusion_probabilities(pop, model.top_k)
        placement = slot_placement(model.routed_experts, model.top_k, plan.ep, plan.redundant, pi)
    unit = plan.tp if plan.attn_dp else 1
    p = step_params(model, precision, acc, plan, options)
    # the closed form's per-GPU layer cost max(a·u_g, b·n_g) (+ the fixed term step_time adds)
    a, bcoef = float(p.moe_a[0]), float(p.moe_b[0])
    # speculative decoding: the verify pass routes the d drafts + 1 of every sequence; the d draft passes'
    # routed experts take the closed form under the law's independent proxy (docs/model.md)
    rows = 1 + options.draft_tokens
    pi = None
    if options.draft_tokens:
        from qsengine.decode.sides import _law

        pi = _law(model, routing, closed_form=False)[1]
    while True:
        shape = moe_layer_shape(model, plan, batch)
        # two-batch overlap: each microbatch routes half the tokens, and step_time takes its straggler
        tokens = max(1, int(round(shape.tokens * rows / (2 if options.overlap == "tbo" else 1))))
        auto = microbatches == "auto"
        n = AUTO_MAX_MICROBATCHES if auto else int(microbatches)
        stats = route(model.routed_experts, model.top_k, tokens, n, routing=routing,
                      placement=placement, seed=seed, threads=threads,
                      layers=model.decode_moe_layers, cost=(a, bcoef), rtol=rtol if auto else None)
        dist = stats.step_time
        mean, p99 = dist.mean, dist.quantile(0.99)
        # times are log-binned (ratio 1.001): a quantile is known to its bin, and within that bin it is no
        # lower than the exact mean (a near-constant straggler put the p99 at the bin centre, below the mean)
        if p99 < mean <= p99 * math.sqrt(1.001):
            p99 = mean
        mst = (mean, dist.quantile(0.5), p99)
        r = step_time(p, np.array([float(batch)]), np.array([float(context)]), pi=pi, uniform=pi is None,
                      moe_step_time=tuple(np.array([v]) for v in mst))  # type: ignore[arg-type]
        t_step = float(r.time[0])
        t, t99 = t_step + batch * stall, float(r.p99[0]) + batch * stall
        if slo_tpot is None or t99 <= slo_tpot or batch <= unit:
            return Refined(batch, limit, mst, t, t99, batch / t_step * plan.dp if t_step > 0 else 0.0, stats)
        batch = max(unit, int(batch * slo_tpot / t99) // unit * unit)
        limit = 1
