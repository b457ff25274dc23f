"""The entry points: :func:`route` (the Monte Carlo in the C++ core) and
:func:`sample_routing` (raw selections for tests)."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from qsengine import _core
from qsengine._core import ResourceLimitError
from qsengine._limits import get_memory_limit, get_work_limit
from qsengine._seed import SeedLike, as_seed_sequence, philox_key, seed_record
from qsengine.routing._checks import _int
from qsengine.routing.laws import (
    Dirichlet,
    GroupLimited,
    Popularity,
    PowerLaw,
    RoutingModel,
    Sticky,
    Trace,
    Uniform,
    parse_routing,
)
from qsengine.routing.placement import LayerCost, Placement
from qsengine.routing.stats import RoutingConfig, RoutingPrecision, RoutingStats


# ---------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------


#: Bytes per expert of the placement lists (a Python list of GPU ids, then the
#: core's vector of them): an over-estimate used to refuse huge expert counts.
_PLACEMENT_BYTES_PER_EXPERT = 128


def _prepare(experts: object, top_k: object, batch: object, microbatches: object, routing: object,
             placement: object, threads: object, layers: object,
             cost: object) -> tuple[_core.RouteRequest, RoutingConfig, int]:
    """Checks the arguments and builds the core's request, the run's config and the thread count."""
    E = _int("experts", experts)
    k = _int("top_k", top_k)
    B = _int("batch", batch)
    L = _int("layers", layers)
    model = parse_routing(routing)  # type: ignore[arg-type]
    if microbatches is None:
        if not isinstance(model, Trace):
            raise TypeError("microbatches=None: only allowed with a Trace (it then means steps // layers)")
        mb = model.expert_ids.shape[0] // L
        if mb < 1:
            raise ValueError(f"layers={L}: the trace has only {model.expert_ids.shape[0]} steps")
    else:
        mb = _int("microbatches", microbatches)
    if threads is None:
        nthreads = 0
    else:
        nthreads = _int("threads", threads)
    if placement is None:
        placement = Placement.contiguous(1)
    if isinstance(placement, (int, np.integer)) and not isinstance(placement, bool):
        placement = Placement.contiguous(int(placement))
    if not isinstance(placement, Placement):
        raise TypeError(f"placement={placement!r}: must be a qsengine.Placement, an int (contiguous GPUs) or None")
    if k > E:
        raise ValueError(f"top_k={k}: must be <= experts={E} (each token picks top_k distinct experts)")
    # The core's own bounds, checked here first: Python ints are exact, while
    # the core's message for batch*top_k overflowed int64 (UBSan) and the
    # placement below is built before the core sees experts.
    if E > 1 << 24:
        raise ValueError(f"experts={E}: must be between 1 and 16777216")
    if B * k >= 1 << 31:
        raise ValueError(f"batch={B}: batch*top_k={B * k} must be < 2^31")
    # The per-expert placement lists are built here, in Python, before the
    # core's own estimate runs: refuse a huge expert count before building them.
    need = E * _PLACEMENT_BYTES_PER_EXPERT
    if need > get_memory_limit():
        from qsengine.errors import ResourceLimitError

        raise ResourceLimitError(
            f"experts={E}: the expert placement alone would need about {need} bytes, above the memory limit of "
            f"{get_memory_limit()} bytes (qsengine.set_memory_limit or QSENGINE_MAX_MEMORY)")
    expert_gpus = placement.expert_gpus(E)
    cost_a = cost_b = None
    if cost is not None:
        if isinstance(cost, tuple) and len(cost) == 2:
            cost = LayerCost(*cost)
        if not isinstance(cost, LayerCost):
            raise TypeError(f"cost={cost!r}: must be a qsengine.LayerCost(a, b), an (a, b) tuple or None")
        cost_a, cost_b = cost.per_gpu(placement.gpus)

    req = _core.RouteRequest()
    req.experts, req.top_k, req.batch, req.microbatches, req.layers = E, k, B, mb, L
    req.placement.gpus = placement.gpus
    req.placement.expert_gpus = expert_gpus
    if cost_a is not None and cost_b is not None:
        req.cost.a, req.cost.b = cost_a, cost_b
        req.cost.enabled = True
    req.memory_limit = get_memory_limit()
    spec = req.model
    base: RoutingModel = model
    if isinstance(model, GroupLimited):
        spec.kind = _core.ModelKind.GroupLimited
        spec.groups, spec.top_groups = model.groups, model.top_groups
        base = model.base
    elif isinstance(model, Sticky):
        spec.kind = _core.ModelKind.Sticky
        spec.rho = model.rho
        base = model.base
    elif isinstance(model, Trace):
        spec.kind = _core.ModelKind.Trace
        spec.trace = model.expert_ids
        base = Uniform()
    else:
        spec.kind = _core.ModelKind.Independent
    w = spec.base
    if isinstance(base, PowerLaw):
        w.kind = _core.WeightKind.PowerLaw
        w.alpha = base.alpha
        w.ranks = _core.RankOrder.PerLayer if base.ranks == "per_layer" else _core.RankOrder.Fixed
    elif isinstance(base, Popularity):
        w.kind = _core.WeightKind.Popularity
        w.weights = np.asarray(base.weights, dtype=np.float64)
    elif isinstance(base, Dirichlet):
        w.kind = _core.WeightKind.Dirichlet
        w.concentration = np.atleast_1d(np.asarray(base.concentration, dtype=np.float64))
    else:
        w.kind = _core.WeightKind.Uniform
    config = RoutingConfig(E, k, B, L, model.to_dict(), placement.to_dict(),
                           None if cost is None else cost.to_dict())  # type: ignore[union-attr]
    return req, config, nthreads


def _rtol(value: object) -> float:
    """The precision target as the core takes it (0.0: off)."""
    if value is None:
        return 0.0
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"rtol={value!r} (type {type(value).__name__}): must be a real number in (0, 1) or None")
    v = float(value)
    if not (0.0 < v < 1.0):  # also refuses nan
        raise ValueError(f"rtol={v}: must be in (0, 1) (a relative standard error), or None to run all microbatches")
    return v


def route(experts: int, top_k: int, batch: int, microbatches: int | None, routing: RoutingModel | str = "uniform",
          placement: Placement | int | None = None, seed: SeedLike = None, threads: int | None = None,
          layers: int = 1, cost: LayerCost | tuple[Any, Any] | None = None, *,
          rtol: float | None = None) -> RoutingStats:
    """Simulate routing of ``microbatches`` decode microbatches through ``layers`` MoE layers.

    Args:
        experts: routed experts E per layer.
        top_k: experts per token k (distinct, exact Plackett-Luce).
        batch: tokens B per microbatch.
        microbatches: number of microbatches (None only for a Trace); with
            ``rtol``, the maximum.
        routing: a model (:class:`Uniform`, :class:`PowerLaw`, ...) or a string
            (see :func:`parse_routing`).
        placement: a :class:`Placement`, an int (contiguous over that many
            GPUs) or None (one GPU).
        seed: None, a non-negative int or a numpy SeedSequence; the entropy
            used is recorded in ``stats.seed``.
        threads: worker threads (None: all hardware threads). Results do not
            depend on it.
        layers: MoE layers each microbatch passes through.
        cost: optional :class:`LayerCost` for straggler layer/step times.
        rtol: optional precision target in (0, 1). The run stops at the first
            checkpoint where the relative standard errors of both the mean and
            the p99 of the *precision statistic* are <= rtol: the step time when
            ``cost`` is given, else the straggler assignment count
            ``gpu_assign_max`` (max over GPUs of n_g, per microbatch-layer).
            Standard errors by sectioning over whole work blocks (batch means
            for the mean; Asmussen & Glynn, *Stochastic Simulation*, 2007,
            III.5a), honest when routing is correlated within a block (Sticky).
            Checkpoints fall on a fixed schedule of whole blocks and the
            statistics are reduced in block order, so where the run stops does
            not depend on ``threads``. See :attr:`RoutingStats.precision`.
            Not available with a :class:`Trace`.

    Returns:
        :class:`RoutingStats`. Raises ValueError/TypeError naming a bad
        argument, :class:`qsengine.ResourceLimitError` above the memory limit
        or above the work limit (:func:`qsengine.set_work_limit`: at most
        1e12 token-expert assignments per call by default), KeyboardInterrupt
        on Ctrl-C.
    """
    target = _rtol(rtol)
    req, config, nthreads = _prepare(experts, top_k, batch, microbatches, routing, placement, threads, layers, cost)
    work = req.microbatches * req.layers * req.batch * req.top_k
    if work > get_work_limit():
        raise ResourceLimitError(
            f"microbatches={req.microbatches}: {work:.3g} token-expert assignments "
            f"(microbatches x layers x batch x top_k) exceed the work limit {get_work_limit():.3g}; "
            "use fewer microbatches or raise it with qsengine.set_work_limit / QSENGINE_MAX_ASSIGNMENTS")
    seq = as_seed_sequence(seed)
    req.key = philox_key(seq)
    req.rtol = target
    raw = _core.route(req, nthreads)
    stats = RoutingStats._from_core(config, seed_record(seq), raw)
    if target > 0.0:
        stats.precision = RoutingPrecision(
            rtol=target, statistic="step_time" if cost is not None else "gpu_assign_max",
            max_microbatches=int(req.microbatches), target_reached=bool(raw.target_reached),
            rse_mean=float(raw.rse_mean), rse_p99=float(raw.rse_p99), sections=int(raw.precision_sections),
            checkpoints=int(raw.checkpoints))
    return stats


def sample_routing(experts: int, top_k: int, batch: int, microbatches: int | None,
                   routing: RoutingModel | str = "uniform", seed: SeedLike = None, layers: int = 1,
                   threads: int | None = None) -> np.ndarray:
    """The raw selections of the same engine and streams as :func:`route`:
    an int32 array [microbatches, layers, batch, top_k]. For tests and small
    runs (bounded by the memory limit)."""
    req, _, nthreads = _prepare(experts, top_k, batch, microbatches, routing, None, threads, layers, None)
    seq = as_seed_sequence(seed)
    req.key = philox_key(seq)
    req.record = True
    raw = _core.route(req, nthreads)
    return np.asarray(raw.selections)
