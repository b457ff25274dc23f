""":func:`simulate`: one comparison point through the pipeline (n = 1).

Nothing is computed here that the pipeline does not compute for a sweep:
the point is validated (:class:`qsengine.decode.point.Point`), evaluated by
:func:`qsengine.decode.pipeline.evaluate` on one lane, and its sides are
dressed as typed results: the step breakdown at the chosen operating point
(one lane of the same step model), the packing of the chosen plan, and the
routing statistics of the Monte Carlo refinement.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from qsengine._seed import SeedLike, as_seed_sequence, seed_record
from qsengine.decode.frontier import frontier
from qsengine.decode.pipeline import Evaluation, evaluate
from qsengine.decode.sides import LIMITS, _SideSet
from qsengine.decode.point import DEFAULT_MICROBATCHES, DEFAULT_SLO_TPOT, Point
from qsengine.decode.result import SideResult, SimulationResult
from qsengine.decode.params import StepOptions
from qsengine.decode.step import decode_step
from qsengine.specs import Cluster, Model, Plan, Precision

__all__ = ["simulate"]


def _side_result(ev: Evaluation, sides: _SideSet, g: int, model: Model, point: Point, refined: Any) -> SideResult:
    from qsengine.packing import pack
    from qsengine.routing import independent_popularity, proxy_popularity

    sd = sides.side
    if not sd.feasible[g]:
        reason = ev.columns["moe_reason" if model.is_moe else "dense_reason"][0]
        return SideResult(model=model, feasible=False, reason=str(reason))
    plan = sides.plan_of(g)
    assert plan is not None
    batch = int(sd.batch[g])
    options = point.options
    cluster = sides.family_of(g).cluster  # the point's cluster under its serving policy's memory budget
    acc = cluster.accelerator
    read = float(ev.requests.read[0])  # the mean cached tokens a step reads (the context without a workload)
    pop = None
    if model.is_moe:
        closed = point.microbatches == 0
        pop = (independent_popularity if closed else proxy_popularity)(point.routing, model.routed_experts)
    if refined is not None:  # the law's proxy serves only the draft passes' routed experts (speculative decoding)
        step = decode_step(model, point.precision, acc, plan, batch, read, moe_step_time=refined.moe_step_time,
                           popularity=pop if options.draft_tokens else None, options=options)
    else:
        step = decode_step(model, point.precision, acc, plan, batch, read, popularity=pop, options=options)
    used = cluster if plan.num_gpus == cluster.num_gpus else Cluster(acc, plan.num_gpus)
    pk = pack(model, used, int(sd.admit[g]), plan=plan, precision=point.precision,
              draft_module=options.draft_tokens > 0, draft_tokens=options.draft_tokens)
    return SideResult(model=model, feasible=True, plan=plan, batch=batch, replicas=plan.dp,
                      admissible_batch=int(pk.admissible_batch), batch_limit=LIMITS[int(sd.limit[g])],
                      step=step, packing=pk, routing=None if refined is None else refined.stats,
                      idle_gpus=point.cluster.num_gpus - plan.num_gpus, prefill_stall=batch * float(sd.stall[g]))


def simulate(
    model: Model | str,
    cluster: Cluster | str,
    context: int,
    q: float | str | None = None,
    dense: Model | str | None = None,
    routing: Any = "uniform",
    plan: Plan | str = "auto",
    precision: Precision | str | None = None,
    microbatches: int | str = DEFAULT_MICROBATCHES,
    slo_tpot: float | None = DEFAULT_SLO_TPOT,
    seed: SeedLike = None,
    threads: int | None = None,
    *,
    rtol: float = 1e-3,
    batch: int | None = None,
    twin_attention: str = "same",
    break_even: bool = True,
    options: StepOptions | None = None,
    output: int = 0,
    prefill: str = "none",
    draft_tokens: int = 0,
    acceptance: float = 0.0,
    context_dist: str = "fixed",
    output_dist: str = "fixed",
    serving: str = "qsengine",
    strict: bool = False,
) -> SimulationResult:
    """Decode throughput of an MoE model and its quality-matched dense twin.

    Args:
        model: the MoE model (spec or shipped name, e.g. ``"deepseek-v3"``).
        cluster: e.g. ``"8xH200"`` or a :class:`qsengine.Cluster`.
        context: tokens in each sequence's KV cache.
        q: quality multiplier: the dense twin has ``q × active`` parameters;
            ``"sqrt"`` (the default when ``q`` and ``dense`` are None) uses
            q = 1/sqrt(s).
        dense: an explicit dense model instead of a twin built from ``q``
            (then q = dense active ÷ MoE active parameters, as in :func:`qs`).
        routing: routing model for the Monte Carlo ("uniform", or a
            :mod:`qsengine.routing` object).
        plan: ``"auto"`` (best plan per side by throughput) or a Plan used
            for both sides (the dense side ignores its expert degrees).
        precision: numeric formats (preset name or :class:`Precision`);
            default: the MoE's deployed precision
            (:func:`qsengine.default_precision`), for both sides.
        microbatches: Monte Carlo microbatches at the chosen batch (each
            passes through every MoE layer); ``"auto"`` runs until the relative
            standard errors of the mean and p99 routed step time reach
            ``rtol`` (at most :data:`qsengine.decode.montecarlo.AUTO_MAX_MICROBATCHES`;
            ``result.moe.routing.precision`` says what was reached); 0 uses
            the closed form (independent routing only).
        slo_tpot: the per-token latency target (seconds) at which both
            sides are compared: each side runs at the plan and batch with the
            most throughput whose p99 step time meets it. Default
            :data:`~qsengine.decode.point.DEFAULT_SLO_TPOT` (50 ms); ``None``
            compares each side at the largest batch its HBM holds. The
            maximum-throughput ratio (no target) is reported beside the
            headline either way (``result.ratio_max_throughput``).
        batch: evaluate both sides at this fixed number of concurrent
            sequences on the cluster instead of their best batch, on the plan
            with the highest throughput among those that hold it and split it
            evenly over their replicas (for comparisons with measurements and
            other tools); the default latency target does not apply to it
            (an explicit other ``slo_tpot`` is refused).
        seed: None, int or SeedSequence; recorded in ``result.inputs``.
        rtol: the precision ``microbatches="auto"`` runs to (default 1e-3).
        threads: C++ threads for the Monte Carlo (None = all cores).
        twin_attention: "same" (twin keeps the MoE's attention and depth) or
            "gqa" (a conventional dense shape).
        break_even: compute q* (a few dozen closed-form dense evaluations).
        options: :class:`StepOptions` of the step model.
        output: generated tokens per request, O (0, the default: decode
            only, every sequence at ``context`` cached tokens). With O >= 1
            ``context`` is the prompt length I: sequences are admitted at
            I + O tokens and decode steps read I + (O+1)/2 on average.
        prefill: ``"none"`` (decode only), ``"colocated"`` (prefill on the
            decode GPUs) or ``"disaggregated"`` (a separate prefill pool);
            with a prefill mode ``ratio`` is the end-to-end ratio (output
            tokens/s per GPU including prefill), ``record["ratio_decode"]``
            the decode-only one. See docs/model.md, "Whole requests".
        draft_tokens: speculative decoding on both sides: d draft tokens
            per step from a draft (MTP) module of one decoder block of each
            side's own kind, verified in one pass of d + 1 rows per sequence
            (0, the default: off; docs/model.md, "Speculative decoding").
        acceptance: probability in [0, 1] that each draft token is accepted
            given the ones before it were (DeepSeek-V3 reports 85-90% for its
            second token, arXiv:2412.19437 §5.4.3); throughput counts the
            1 + a + ... + a^d accepted tokens per step.
        context_dist, output_dist: the laws of the prompt length I and the
            output length O of a request workload (output >= 1), of means
            ``context`` and ``output``, drawn independently: ``"fixed"`` (the
            default), ``"uniform:w"`` (half-width w of the mean, 0 < w <= 1),
            ``"exponential"`` or ``"lognormal:s"`` (sd s of the log), each
            over lengths >= 1 (:class:`qsengine.decode.prefill.LengthDist`).
            A slot sees requests length-biased by O: steps read
            E[O·(I + (O+1)/2)]/E[O] tokens, prefill costs E[t_pf(I)], and
            sequences are admitted at the mean cache plus a 99% margin
            (paged KV; fixed lengths keep the peak I + O). Records:
            ``read_context``, ``{moe,dense}_admit_context``. See
            docs/model.md, "Length distributions".
        serving: the serving engine whose memory policy and batch cap both
            sides run under: ``"qsengine"`` (default: the accelerator spec's
            usable HBM, no cap), ``"vllm"``, ``"sglang"`` or ``"trtllm"``
            (each engine's defaults, :mod:`qsengine.specs.serving`); a
            batch the cap limits reports ``batch_limit`` "cap".
        strict: a context beyond a model's maximum context is an error
            instead of a :class:`qsengine.decode.point.ContextWarning`.
    """
    point = Point.make(strict=strict, model=model, cluster=cluster, context=context, q=q, dense=dense,
                       routing=routing, plan=plan, precision=precision, microbatches=microbatches, rtol=rtol,
                       slo_tpot=slo_tpot, batch=batch, twin_attention=twin_attention, break_even=break_even,
                       options=options, output=output, prefill=prefill, draft_tokens=draft_tokens,
                       acceptance=acceptance, context_dist=context_dist, output_dist=output_dist,
                       serving=serving)
    seq = as_seed_sequence(seed)
    moe_seed, _ = seq.spawn(2)
    ev = evaluate(point.columns(), 1, seeds=[moe_seed], threads=threads, check_points=False)
    rec = {name: (v.item() if isinstance(v, np.generic) else v) for name, v in
           ((name, col[0]) for name, col in ev.columns.items())}
    mg, dg = int(ev.moe_group[0]), int(ev.dense_group[0])
    dense_model = ev.dense_models[int(ev.dense_model_group[0])]
    if dense_model is None:
        dense_model = point.model.dense_twin(float(ev.q_value[0]), attention=point.twin_attention)
    moe_side = _side_result(ev, ev.moe, mg, point.model, point, ev.refined.get(mg))
    dense_side = _side_result(ev, ev.dense, dg, dense_model, point, None)
    import pandas as pd

    req = ev.requests
    assert req is not None
    read, spread = float(req.read[0]), float(req.spread[0])
    # admission: the peak I + O of fixed lengths, the mean cache (plus the frontier's margin) of a distribution
    peak = point.context + point.output if spread == 0 else math.ceil(read)
    work: dict[str, Any] = dict(read_context=read, prompt=float(point.context), output=float(point.output),
                                prefill=point.prefill, spread=spread)
    gpus = point.cluster.num_gpus
    cap = point.serving.max_sequences(point.cluster.accelerator)

    def mean_prefill(fam: Any) -> Any:
        """E[t_pf(I)] per frontier row over the lane's prompt law (None: the fixed prompt)."""
        if req.pcode[0] < 0:
            return None
        from qsengine.decode.prefill import prefill_time

        def seconds(sp: Any, fl: np.ndarray) -> np.ndarray:
            return req.mean_prefill(np.zeros(fl.size, np.int64), lambda rows, prompts: prefill_time(
                sp.take(rows), prompts, fl[rows], pi=fam.pi, uniform=fam.pi is None))
        return seconds

    mfam, dfam = ev.moe.family_of(mg), ev.dense.family_of(dg)
    front = pd.concat([frontier(mfam, peak, side="moe", pool=float(ev.moe.side.pf[mg]) / gpus,
                                prefill_seconds=mean_prefill(mfam), cap=cap, **work),
                       frontier(dfam, peak, float(ev.dense_ffn[dg]), side="dense",
                                pool=float(ev.dense.side.pf[dg]) / gpus, prefill_seconds=mean_prefill(dfam), cap=cap,
                                **work)],
                      ignore_index=True)
    from qsengine.specs.twin import qs as qs_record

    qs_rec = qs_record(point.model, point.dense if point.dense is not None else
                       ("sqrt" if point.q is None else point.q))
    ratio = rec["ratio"]
    q_star = rec["break_even_q"]
    inputs = {
        "model": point.model.id,
        "dense": dense_model.id,
        "cluster": point.cluster.label,
        "context": point.context,
        "q": qs_rec.q,
        "routing": repr(routing),
        "plan": point.plan if isinstance(point.plan, str) else point.plan.label,
        "precision": dataclasses.asdict(point.precision),
        "microbatches": point.microbatches,
        "rtol": point.rtol,
        "slo_tpot": point.slo_tpot,
        "batch": point.batch,
        "seed": seed_record(seq),
        "twin_attention": point.twin_attention,
        "options": dataclasses.asdict(point.options),
        "output": point.output,
        "prefill": point.prefill,
        "draft_tokens": point.draft_tokens,
        "acceptance": point.acceptance,
        "context_dist": point.context_dist.label,
        "output_dist": point.output_dist.label,
        "serving": point.serving.name,
    }
    return SimulationResult(moe=moe_side, dense=dense_side, cluster=point.cluster, context=point.context,
                            ratio=None if math.isnan(ratio) else ratio, qs=qs_rec, verdict=rec["verdict"],
                            agrees_with_qs=rec["agrees_with_qs"],
                            break_even_q=None if math.isnan(q_star) else q_star, inputs=inputs, record=rec,
                            frontier=front)
