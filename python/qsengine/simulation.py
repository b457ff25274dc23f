"""qsengine.simulation: MoE against its quality-matched dense twin on one cluster.

Pipeline for each side (MoE, dense twin):

1. packing: every valid parallel plan is packed onto the cluster; the
   admissible batch per replica is the largest that fits in HBM;
2. best batch: the largest admissible batch whose mean per-token latency
   (TPOT) meets ``slo_tpot`` (throughput B/TPOT grows with B in this model,
   so the largest allowed batch is the best);
3. plan "auto": the plan with the highest closed-form throughput at its best
   batch wins;
4. routing Monte Carlo (MoE side): the routed-expert straggler time at the
   chosen batch and plan, summed over the MoE layers, gives the step-time
   distribution (mean, p50, p99); ``microbatches=0`` uses the closed form;
5. comparison: ratio = dense tokens/s ÷ MoE tokens/s, the qs verdict and
   whether the two agree, and the break-even q* where the ratio is 1.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from qsengine._seed import SeedLike, as_seed_sequence, seed_record
from qsengine.specs import Cluster, Model, Plan, Precision
from qsengine.step import StepBreakdown, StepOptions, decode_step, moe_cost_coefficients, moe_layer_shape

__all__ = ["SideResult", "SimulationResult", "simulate", "evaluate_side"]

#: ``microbatches="auto"``: enough microbatches for a routing budget of about
#: ``_AUTO_ASSIGNMENTS`` token-expert assignments, clamped to [_AUTO_MIN, _AUTO_MAX].
_AUTO_ASSIGNMENTS = 1e8
_AUTO_MIN = 200
_AUTO_MAX = 20_000
_DEFAULT_MICROBATCHES = "auto"

#: The point fields of :func:`simulate` (its keyword arguments that define a
#: result, without ``seed``/``threads``) and their defaults (``...`` =
#: required). Sweeps and the closed-form fast path take points in this shape.
POINT_FIELDS: dict[str, Any] = {
    "model": ...,
    "cluster": ...,
    "context": ...,
    "q": None,
    "dense": None,
    "routing": "uniform",
    "plan": "auto",
    "precision": None,
    "microbatches": _DEFAULT_MICROBATCHES,
    "slo_tpot": None,
    "twin_attention": "same",
    "break_even": True,
    "options": None,
}


def auto_microbatches(tokens: int, top_k: int, layers: int) -> int:
    """Microbatches the ``"auto"`` setting runs for a routing problem of this size."""
    per = max(1, tokens * top_k * max(layers, 1))
    return int(min(_AUTO_MAX, max(_AUTO_MIN, _AUTO_ASSIGNMENTS // per)))


@dataclass(frozen=True)
class SideResult:
    """One side of the comparison (the MoE or the dense model) at its best
    batch and plan. ``feasible=False`` carries the ``reason`` and no numbers."""

    model: Model
    feasible: bool
    reason: str = ""
    plan: Plan | None = None
    batch: int = 0
    replicas: int = 0
    admissible_batch: int = 0
    batch_limit: str = ""
    step: StepBreakdown | None = None
    packing: Any = None
    routing: Any = None

    @property
    def cluster_batch(self) -> int:
        """Concurrent sequences over the whole cluster."""
        return self.batch * self.replicas

    @property
    def tpot(self) -> float:
        """Mean per-token latency (s)."""
        return self.step.time if self.step else math.inf

    @property
    def tokens_per_second(self) -> float:
        """Decode tokens/s of the whole cluster."""
        return self.step.tokens_per_second * self.replicas if self.step else 0.0

    @property
    def tokens_per_second_per_user(self) -> float:
        return 1.0 / self.tpot if self.step else 0.0

    def tokens_per_second_per_gpu(self, gpus: int) -> float:
        return self.tokens_per_second / gpus

    def to_dict(self, gpus: int) -> dict[str, Any]:
        d: dict[str, Any] = {
            "model": self.model.id,
            "feasible": self.feasible,
            "reason": self.reason,
            "plan": self.plan.label if self.plan else None,
            "batch_per_replica": self.batch,
            "replicas": self.replicas,
            "cluster_batch": self.cluster_batch,
            "admissible_batch": self.admissible_batch,
            "batch_limit": self.batch_limit,
            "total_params": self.model.total_params,
            "active_params": self.model.active_params,
        }
        if self.step is not None:
            d.update(
                tpot_mean_s=self.step.time,
                tpot_p50_s=self.step.time_p50,
                tpot_p99_s=self.step.time_p99,
                tokens_per_s=self.tokens_per_second,
                tokens_per_s_per_gpu=self.tokens_per_second_per_gpu(gpus),
                tokens_per_s_per_user=self.tokens_per_second_per_user,
                step_pieces=self.step.as_rows(),
            )
        return d


@dataclass(frozen=True)
class SimulationResult:
    """MoE vs its quality-matched dense twin on one cluster at one context.

    Attributes:
        moe, dense: the two sides.
        ratio: dense tokens/s ÷ MoE tokens/s, or None when a side is infeasible
            (see ``outcome``).
        qs: the :class:`qsengine.QsResult` record (s, q, qs, verdict, 1/qs).
        verdict: which side serves better ("dense", "moe", "tie",
            "dense-only" when only the dense model fits, "moe-only",
            "neither").
        agrees_with_qs: whether the simulated winner is the one the qs
            inequality predicts (None when not comparable).
        break_even_q: q* at which the ratio is 1 (None if not bracketed).
        inputs: everything the result came from, including the seed record.
    """

    moe: SideResult
    dense: SideResult
    cluster: Cluster
    context: int
    ratio: float | None
    qs: Any
    verdict: str
    agrees_with_qs: bool | None
    break_even_q: float | None
    inputs: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------ export
    def to_dict(self) -> dict[str, Any]:
        g = self.cluster.num_gpus
        return {
            "format": "qsengine.SimulationResult",
            "version": 1,
            "cluster": self.cluster.label,
            "gpus": g,
            "context": self.context,
            "ratio": self.ratio,
            "verdict": self.verdict,
            "agrees_with_qs": self.agrees_with_qs,
            "break_even_q": self.break_even_q,
            "s": self.qs.s,
            "q": self.qs.q,
            "qs": self.qs.qs,
            "qs_verdict": _verdict_text(self.qs.verdict),
            "moe": self.moe.to_dict(g),
            "dense": self.dense.to_dict(g),
            "inputs": self.inputs,
        }

    def to_record(self) -> dict[str, Any]:
        """One flat row (scalars only) for tables and sweeps."""
        g = self.cluster.num_gpus
        row: dict[str, Any] = {
            "model": self.moe.model.id,
            "dense_model": self.dense.model.id,
            "cluster": self.cluster.label,
            "gpus": g,
            "context": self.context,
            "s": self.qs.s,
            "q": self.qs.q,
            "qs": self.qs.qs,
            "qs_verdict": _verdict_text(self.qs.verdict),
            "ratio": self.ratio if self.ratio is not None else math.nan,
            "verdict": self.verdict,
            "agrees_with_qs": self.agrees_with_qs,
            "break_even_q": self.break_even_q if self.break_even_q is not None else math.nan,
        }
        for side, r in (("moe", self.moe), ("dense", self.dense)):
            row[f"{side}_feasible"] = r.feasible
            row[f"{side}_reason"] = r.reason
            row[f"{side}_plan"] = r.plan.label if r.plan else ""
            row[f"{side}_batch"] = r.cluster_batch
            row[f"{side}_batch_limit"] = r.batch_limit
            row[f"{side}_tokens_per_s"] = r.tokens_per_second
            row[f"{side}_tokens_per_s_per_gpu"] = r.tokens_per_second_per_gpu(g)
            row[f"{side}_tpot_ms"] = r.tpot * 1e3 if r.step else math.nan
            row[f"{side}_tpot_p99_ms"] = r.step.time_p99 * 1e3 if r.step else math.nan
        return row

    def to_pandas(self):  # -> pandas.DataFrame
        """Step-time breakdown of both sides as a long table."""
        import pandas as pd

        rows = []
        for side, r in (("moe", self.moe), ("dense", self.dense)):
            if r.step is None:
                rows.append({"side": side, "piece": "(infeasible)", "time_s": math.nan, "reason": r.reason})
                continue
            for row in r.step.as_rows():
                rows.append({"side": side, **row})
        return pd.DataFrame(rows)

    def summary(self) -> str:
        """A readable table of both sides and the verdict."""
        lines = [
            f"{self.moe.model.name} vs dense twin ({self.dense.model.id}) on {self.cluster.label}, "
            f"context {self.context:,} tokens",
            f"  s = {self.qs.s:.4f}, q = {self.qs.q:.3f}, qs = {self.qs.qs:.3f} -> {_verdict_text(self.qs.verdict)}",
        ]
        hdr = f"  {'':8s}{'plan':>22s}{'batch':>9s}{'TPOT ms':>10s}{'p99 ms':>9s}{'tok/s':>12s}{'tok/s/GPU':>11s}  limit"
        lines.append(hdr)
        for side, r in (("MoE", self.moe), ("dense", self.dense)):
            if not r.feasible:
                lines.append(f"  {side:8s} infeasible: {r.reason}")
                continue
            assert r.step is not None and r.plan is not None
            lines.append(
                f"  {side:8s}{r.plan.label:>22s}{r.cluster_batch:>9,d}{r.tpot * 1e3:>10.2f}"
                f"{r.step.time_p99 * 1e3:>9.2f}{r.tokens_per_second:>12,.0f}"
                f"{r.tokens_per_second_per_gpu(self.cluster.num_gpus):>11,.0f}  {r.batch_limit}"
            )
        if self.ratio is not None:
            lines.append(f"  ratio dense/MoE = {self.ratio:.3f} -> {self.verdict} "
                         f"({'agrees' if self.agrees_with_qs else 'disagrees'} with the qs verdict)")
        else:
            lines.append(f"  verdict: {self.verdict}")
        if self.break_even_q is not None:
            lines.append(f"  break-even q* = {self.break_even_q:.3f}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        r = f"{self.ratio:.3f}" if self.ratio is not None else "n/a"
        return (f"SimulationResult({self.moe.model.id} on {self.cluster.label} @ {self.context}: "
                f"ratio={r}, verdict={self.verdict!r})")

    def plot(self, ax=None):
        """Bar chart of the step-time breakdown of both sides (matplotlib Axes)."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(7, 4))
        names: list[str] = []
        for r in (self.moe, self.dense):
            if r.step:
                for p in r.step.pieces:
                    if p.name not in names:
                        names.append(p.name)
        bottoms = np.zeros(2)
        cmap = plt.get_cmap("tab10")
        for i, name in enumerate(names):
            vals = []
            for r in (self.moe, self.dense):
                t = 0.0
                if r.step:
                    t = sum(p.time for p in r.step.pieces if p.name == name) * 1e3
                vals.append(t)
            ax.bar(["MoE", "dense twin"], vals, bottom=bottoms, label=name, color=cmap(i % 10))
            bottoms += np.array(vals)
        ax.set_ylabel("time per decode step (ms)")
        ax.set_title(f"{self.moe.model.id} on {self.cluster.label}, context {self.context}")
        ax.legend(fontsize=7)
        return ax


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


def _best_batch(model: Model, precision: Precision, cluster: Cluster, plan: Plan, context: int, admissible: int,
                slo_tpot: float | None, popularity, options: StepOptions) -> tuple[int, str, StepBreakdown | None]:
    """Largest batch ≤ ``admissible`` whose closed-form mean TPOT meets the SLO."""
    acc = cluster.accelerator

    def step(b: int) -> StepBreakdown:
        return decode_step(model, precision, acc, plan, b, context, popularity=popularity, options=options)

    top = step(admissible)
    if slo_tpot is None or top.time <= slo_tpot:
        return admissible, "hbm", top
    first = step(1)
    if first.time > slo_tpot:
        return 0, "slo", None
    lo, hi = 1, admissible  # step(lo) meets, step(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if step(mid).time <= slo_tpot:
            lo = mid
        else:
            hi = mid
    return lo, "slo", step(lo)


def evaluate_side(
    model: Model,
    cluster: Cluster,
    context: int,
    *,
    plan: Plan | str = "auto",
    precision: Precision,
    routing: Any = "uniform",
    microbatches: int | str = _DEFAULT_MICROBATCHES,
    slo_tpot: float | None = None,
    seed: np.random.SeedSequence | None = None,
    threads: int | None = None,
    options: StepOptions | None = None,
) -> SideResult:
    """Best plan, batch and step time of one model on a cluster.

    Plans are ranked by closed-form throughput at their best batch; the
    routing Monte Carlo (``microbatches > 0``, MoE only) then refines the
    chosen point's step-time distribution.
    """
    from qsengine.packing import pack, plans as enumerate_plans
    from qsengine.routing import independent_popularity, proxy_popularity

    options = options or StepOptions()
    popularity = None
    if model.is_moe:
        # Without a Monte Carlo the closed form is the answer and must be exact
        # for the routing model; with one, a proxy only ranks the plans.
        popularity = (independent_popularity(routing, model.routed_experts) if microbatches == 0
                      else proxy_popularity(routing, model.routed_experts))
    if isinstance(plan, Plan) and not model.is_moe and (plan.ep > 1 or plan.etp is not None):
        plan = dataclasses.replace(plan, ep=1, etp=None)  # a shared plan's expert degrees mean nothing here
    candidates: Iterable[Plan] = enumerate_plans(model, cluster) if isinstance(plan, str) else [plan]
    best: tuple[float, Plan, Any, int, str, StepBreakdown] | None = None
    closest: tuple[float, str] | None = None  # (weights on the fullest GPU, reason) of infeasible plans
    for p in candidates:
        pk = pack(model, cluster, context, plan=p, precision=precision)
        if not pk.feasible:
            need = float(np.max(pk.weight_bytes))
            if closest is None or need < closest[0]:
                closest = (need, pk.reason)
            continue
        b, limit, st = _best_batch(model, precision, cluster, p, context, int(pk.admissible_batch), slo_tpot,
                                   popularity, options)
        if st is None:
            if closest is None or closest[0] > 0:
                closest = (0.0, f"even batch 1 misses the TPOT target {slo_tpot * 1e3:.3g} ms (plan {p.label})")
            continue
        thr = st.tokens_per_second * p.dp
        if best is None or thr > best[0] * (1 + 1e-12):
            best = (thr, p, pk, b, limit, st)
    if best is None:
        reason = closest[1] if closest else f"no valid parallel plan for {model.id} on {cluster.label}"
        return SideResult(model=model, feasible=False, reason=reason)
    _, p, pk, b, limit, st = best

    stats = None
    if model.is_moe and microbatches != 0:
        st, stats, b, limit = _monte_carlo(model, precision, cluster, p, context, b, limit, slo_tpot, routing,
                                           microbatches, seed, threads, options)
    return SideResult(model=model, feasible=True, plan=p, batch=b, replicas=p.dp,
                      admissible_batch=int(pk.admissible_batch), batch_limit=limit, step=st, packing=pk,
                      routing=stats)


def _monte_carlo(model: Model, precision: Precision, cluster: Cluster, plan: Plan, context: int, batch: int,
                 limit: str, slo_tpot: float | None, routing: Any, microbatches: int | str,
                 seed: np.random.SeedSequence | None, threads: int | None, options: StepOptions):
    """Step time at ``batch`` with the routed-expert straggler from the routing
    Monte Carlo; if the Monte Carlo TPOT misses the SLO, step the batch down."""
    from qsengine.routing import Placement, route

    acc = cluster.accelerator
    a, bcoef = moe_cost_coefficients(model, precision, acc, plan)
    while True:
        shape = moe_layer_shape(model, plan, batch)
        tokens = max(1, int(round(shape.tokens)))
        n = auto_microbatches(tokens, model.top_k, model.decode_moe_layers) if microbatches == "auto" \
            else int(microbatches)
        stats = route(model.routed_experts, model.top_k, tokens, n, routing=routing,
                      placement=Placement.contiguous(shape.gpus), seed=seed, threads=threads,
                      layers=model.decode_moe_layers, cost=(a, bcoef))
        dist = stats.step_time
        st = decode_step(model, precision, acc, plan, batch, context,
                         moe_step_time=(dist.mean, dist.quantile(0.5), dist.quantile(0.99)), options=options)
        if slo_tpot is None or st.time <= slo_tpot or batch <= 1:
            return st, stats, batch, limit
        batch = max(1, int(batch * slo_tpot / st.time))
        limit = "slo"


def _verdict(moe: SideResult, dense: SideResult, ratio: float | None, tie: float = 1e-3) -> str:
    if not moe.feasible and not dense.feasible:
        return "neither"
    if not moe.feasible:
        return "dense-only"
    if not dense.feasible:
        return "moe-only"
    assert ratio is not None
    if abs(ratio - 1.0) <= tie:
        return "tie"
    return "dense" if ratio > 1 else "moe"


def _break_even_q(model: Model, cluster: Cluster, context: int, moe_tps: float, *, precision: Precision,
                  plan: Plan | str, slo_tpot: float | None, options: StepOptions, attention: str,
                  rtol: float = 1e-3) -> float | None:
    """q* with dense(q*) tokens/s == MoE tokens/s, by bisection on q.

    The dense side is deterministic, so each probe is a closed-form
    evaluation; dense throughput falls as q grows. The bracket runs from the
    smallest constructible twin (q ≥ 1) to 1/s (the twin as large as the
    MoE's total parameters), widened up to 16/s when the dense twin still wins
    there; None if the ratio does not cross 1 in it."""

    def ratio(q: float) -> float | None:
        try:
            twin = model.dense_twin(q, attention=attention)
        except ValueError:
            return None
        side = evaluate_side(twin, cluster, context, plan=plan, precision=precision, microbatches=0,
                             slo_tpot=slo_tpot, options=options)
        return side.tokens_per_second / moe_tps if side.feasible else 0.0

    lo, hi = 1.0, 1.0 / model.sparsity
    r_lo, r_hi = ratio(lo), ratio(hi)
    while r_lo is None and lo < hi:  # smallest twin that can be built
        lo *= 1.5
        r_lo = ratio(lo)
    for _ in range(4):  # the dense side may still win at the MoE's full size
        if r_hi is None or r_hi < 1.0:
            break
        hi *= 2.0
        r_hi = ratio(hi)
    if r_lo is None or r_hi is None or r_lo < 1.0 or r_hi >= 1.0:
        return None
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


def simulate(
    model: Model | str,
    cluster: Cluster | str,
    context: int,
    q: float | str | None = None,
    dense: Model | str | None = None,
    routing: Any = "uniform",
    plan: Plan | str = "auto",
    precision: Precision | str | None = None,
    microbatches: int | str = _DEFAULT_MICROBATCHES,
    slo_tpot: float | None = None,
    seed: SeedLike = None,
    threads: int | None = None,
    *,
    twin_attention: str = "same",
    break_even: bool = True,
    options: StepOptions | None = None,
) -> SimulationResult:
    """Decode throughput of an MoE model and its quality-matched dense twin.

    Args:
        model: the MoE model (spec or shipped name, e.g. ``"deepseek-v3"``).
        cluster: e.g. ``"8xH200"`` or a :class:`qsengine.Cluster`.
        context: tokens in each sequence's KV cache.
        q: quality multiplier: the dense twin has ``q × active`` parameters;
            ``"sqrt"`` (the default when ``q`` and ``dense`` are None) uses
            q = 1/sqrt(s).
        dense: an explicit dense model instead of a twin built from ``q``.
        routing: routing model for the Monte Carlo ("uniform", or a
            :mod:`qsengine.routing` object).
        plan: ``"auto"`` (best plan per side by throughput) or a Plan used
            for both sides (the dense side ignores its expert degrees).
        precision: numeric formats (preset name or :class:`Precision`);
            default bf16.
        microbatches: Monte Carlo microbatches at the chosen batch (each
            passes through every MoE layer); ``"auto"`` sizes it to a fixed
            routing budget (see :func:`auto_microbatches`); 0 uses the closed
            form for independent routing only.
        slo_tpot: optional per-token latency target (seconds) capping the batch.
        seed: None, int or SeedSequence; recorded in ``result.inputs``.
        threads: C++ threads for the Monte Carlo (None = all cores).
        twin_attention: "same" (twin keeps the MoE's attention and depth) or
            "gqa" (a conventional dense shape).
        break_even: compute q* (a few dozen closed-form dense evaluations).
    """
    from qsengine.specs.loaders import as_cluster, as_model, as_precision
    from qsengine.specs.twin import qs as qs_record

    model = as_model(model)
    cluster = as_cluster(cluster)
    precision = as_precision(precision)
    options = options or StepOptions()
    if isinstance(context, bool) or not isinstance(context, (int, np.integer)):
        raise TypeError(f"context={context!r}: must be an int number of tokens")
    context = int(context)
    if context < 1:
        raise ValueError(f"context={context}: must be >= 1 token")
    if microbatches != "auto" and (isinstance(microbatches, bool) or not isinstance(microbatches, (int, np.integer))
                                   or microbatches < 0):
        raise ValueError(f"microbatches={microbatches!r}: must be 'auto' or an int >= 0")
    if slo_tpot is not None and not (isinstance(slo_tpot, (int, float)) and math.isfinite(slo_tpot)
                                     and slo_tpot > 0):
        raise ValueError(f"slo_tpot={slo_tpot!r}: must be a positive number of seconds or None")
    if not model.is_moe:
        raise ValueError(f"model={model.id!r}: is dense; simulate compares an MoE model with a dense one")
    seq = as_seed_sequence(seed)

    if dense is not None:
        if q is not None:
            raise ValueError("give either q or dense, not both")
        dense_model = as_model(dense)
        q_value: float | str = dense_model.total_params / model.active_params
    else:
        q_value = "sqrt" if q is None else q
        dense_model = model.dense_twin(q_value, attention=twin_attention)
    rec = qs_record(model, q_value if dense is None else dense_model.total_params / model.active_params)

    moe_seed, _ = seq.spawn(2)
    moe_side = evaluate_side(model, cluster, context, plan=plan, precision=precision, routing=routing,
                             microbatches=microbatches, slo_tpot=slo_tpot, seed=moe_seed, threads=threads,
                             options=options)
    dense_side = evaluate_side(dense_model, cluster, context, plan=plan, precision=precision, microbatches=0,
                               slo_tpot=slo_tpot, options=options)
    ratio = None
    if moe_side.feasible and dense_side.feasible:
        ratio = dense_side.tokens_per_second / moe_side.tokens_per_second
    verdict = _verdict(moe_side, dense_side, ratio)
    agrees = None
    if ratio is not None and verdict != "tie":
        agrees = (verdict == "dense") == (rec.qs < 1.0)
    q_star = None
    if break_even and moe_side.feasible and dense is None:
        q_star = _break_even_q(model, cluster, context, moe_side.tokens_per_second, precision=precision, plan=plan,
                               slo_tpot=slo_tpot, options=options, attention=twin_attention)
    inputs = {
        "model": model.id,
        "dense": dense_model.id,
        "cluster": cluster.label,
        "context": context,
        "q": rec.q,
        "routing": repr(routing),
        "plan": plan if isinstance(plan, str) else plan.label,
        "precision": dataclasses.asdict(precision),
        "microbatches": microbatches if microbatches == "auto" else int(microbatches),
        "slo_tpot": slo_tpot,
        "seed": seed_record(seq),
        "twin_attention": twin_attention,
        "options": dataclasses.asdict(options),
    }
    return SimulationResult(moe=moe_side, dense=dense_side, cluster=cluster, context=context, ratio=ratio,
                            qs=rec, verdict=verdict, agrees_with_qs=agrees, break_even_q=q_star, inputs=inputs)


def _verdict_text(v: Any) -> str:
    return str(getattr(v, "value", v))
