"""The packing entry points: :func:`pack`, :func:`plans`, :func:`rank_plans`,
:func:`search_plans`, :func:`min_gpus`, and the binding shortfall of an infeasible model."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from qsengine import _core
from qsengine._limits import get_memory_limit
from qsengine.errors import ResourceLimitError
from qsengine._seed import SeedLike, as_seed_sequence, philox_key, seed_record
from qsengine.specs import Accelerator, Cluster, Model, Plan, Precision, Workload
from qsengine.specs.loaders import as_cluster, as_model, as_precision, default_precision

if TYPE_CHECKING:  # pragma: no cover
    pass

from qsengine.packing.memory import (
    _as_accelerator,
    _as_context,
    _as_int,
    _plan_desc,
    _plan_from_desc,
    _threads,
    memory_description,
)
from qsengine.packing.result import Packing, PagedStats, ReplicaStats, _gpu_map


# --------------------------------------------------------------------- API
def _resolve_lengths(
    lengths: Sequence[int] | np.ndarray | Workload | None, num_sequences: int | None, seed: SeedLike, threads: int
) -> tuple[np.ndarray | None, dict[str, Any] | None]:
    if lengths is None:
        return None, None
    if isinstance(lengths, Workload):
        if not lengths.is_distribution:
            raise ValueError("lengths: the Workload has no length distribution (use Workload.distribution(...))")
        n = _as_int(num_sequences if num_sequences is not None else 100_000, "num_sequences", 1)
        _check_paged_memory(n, "num_sequences")
        seq = as_seed_sequence(seed)
        k0, k1 = philox_key(seq)
        values = np.asarray(lengths.lengths, dtype=np.int64)
        weights = np.asarray(lengths.weights, dtype=np.float64)
        return _core.sample_lengths(values, weights, n, k0, k1, threads), seed_record(seq)
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise ValueError(f"lengths: must be a 1-d array of context lengths (got shape {arr.shape})")
    if arr.size == 0:
        raise ValueError("lengths: empty (the length distribution has no mass)")
    if not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise ValueError("lengths: must be integer token counts (found non-integer or NaN values)")
    bad = np.flatnonzero(arr < 1)
    if bad.size:
        raise ValueError(f"lengths[{bad[0]}]={arr[bad[0]]}: every context length must be >= 1 token")
    _check_paged_memory(int(arr.size), "lengths")
    return np.ascontiguousarray(arr, dtype=np.int64), None


#: Bytes the paged packer holds per offered sequence: the drawn length, the
#: core's copy of it and its per-sequence bookkeeping (estimate, rounded up).
PAGED_BYTES_PER_SEQUENCE = 32


def _check_paged_memory(n: int, name: str) -> None:
    """Refuse a paged packing whose per-sequence arrays would exceed the memory
    limit (:func:`qsengine.set_memory_limit`), before anything is allocated."""
    need = n * PAGED_BYTES_PER_SEQUENCE
    limit = get_memory_limit()
    if need > limit:
        raise ResourceLimitError(
            f"{name}: {n} sequences need about {need} bytes for paged packing, above the memory limit of {limit} "
            "bytes; pack fewer sequences or raise it with qsengine.set_memory_limit / QSENGINE_MAX_MEMORY")


def _auto_plan(desc: _core.MemoryDesc, num_gpus: int, context: int, want_ep: bool, threads: int) -> _core.PlanDesc:
    t = _core.search_plans(desc, num_gpus, num_gpus, context, threads)
    if len(t) == 0:
        raise ValueError(f"cluster.num_gpus={num_gpus}: no valid parallel plan for this model on {num_gpus} GPUs")
    idx = 0
    if want_ep:
        ep_rows = np.flatnonzero(t.ep > 1)
        if ep_rows.size:
            idx = int(ep_rows[0])
    return _core.PlanDesc(int(t.tp[idx]), int(t.pp[idx]), int(t.dp[idx]), int(t.ep[idx]), int(t.etp[idx]),
                          bool(t.attn_dp[idx]), int(t.redundant[idx]))


def _precision(model: Model, precision: Precision | str | None) -> Precision:
    """``precision``, or the model's deployed precision when None (the one
    default of every entry point: :func:`qsengine.specs.default_precision`)."""
    return default_precision(model) if precision is None else as_precision(precision)


def pack(
    model: Model | str,
    cluster: Cluster | str,
    context: int | Workload,
    plan: Plan | Literal["auto"] = "auto",
    precision: Precision | str | None = None,
    replicas: int = 0,
    popularity: Sequence[float] | np.ndarray | None = None,
    block_size: int | None = None,
    lengths: Sequence[int] | np.ndarray | Workload | None = None,
    num_sequences: int | None = None,
    seed: SeedLike = None,
    threads: int | None = None,
    draft_module: bool = False,
    draft_tokens: int = 0,
) -> Packing:
    """Pack ``model`` onto ``cluster`` under ``plan`` at ``context`` tokens.

    Args:
        model: a :class:`~qsengine.Model` (or a preset name when the loaders exist).
        cluster: a :class:`~qsengine.Cluster` (or a name like ``"8xH200"``).
        context: tokens per sequence (or a Workload: its ``context``).
        plan: a :class:`~qsengine.Plan`, or ``"auto"``: the valid plan with
            the largest admissible cluster batch (ties: smaller tp·pp, then
            smaller ep); with replicas/popularity the best plan with ep > 1.
        precision: a :class:`~qsengine.Precision` or a preset name; None: the
            model's deployed precision (:func:`qsengine.default_precision`).
        replicas: extra expert copies per EP group (EPLB-style greedy LPT),
            memory taken from the KV cache. Must be 0 for a plan with
            ``redundant`` slots: those are its replicas, their bytes counted in
            the routed experts ((E + redundant)/ep slots per GPU).
        popularity: expected token share of each routed expert (E values, any
            positive scale; default uniform). Needed to judge replication; for
            a plan with ``redundant`` slots it places them (EPLB-style,
            ``_core.place_slots``) and ``replication`` reports that placement
            (``batch_cost``: the batch the slots' bytes take).
        block_size: tokens per paged KV block (default 16) for ``lengths``.
        lengths: context lengths of arriving sequences (array), or a Workload
            with a length distribution to draw ``num_sequences`` from with ``seed``.
        num_sequences: draws from a Workload distribution (default 100 000).
        seed: None | int | numpy SeedSequence for the draws (recorded).
        threads: worker threads (None = all hardware threads); results do not
            depend on it.
        draft_module: the speculative-decoding draft (MTP) module is resident:
            one more decoder layer of the model's kind with its KV cache, plus
            its 2d×d projection (docs/model.md, "Speculative decoding").
        draft_tokens: draft tokens per step (speculative decoding): a MoE's
            EP all-to-all buffers hold 1 + draft_tokens token rows per
            sequence (docs/packing.md, "All-to-all buffers").

    Returns:
        A :class:`Packing`. Infeasible packings are returned, not raised
        (``.feasible`` is False, ``.reason`` says why); bad inputs raise
        ValueError/TypeError naming the field.
    """
    model = as_model(model)
    cluster = as_cluster(cluster)
    prec = _precision(model, precision)
    ctx = _as_context(context)
    replicas = _as_int(replicas, "replicas", 0)
    nthreads = _threads(threads)
    if not isinstance(draft_module, (bool, np.bool_)):
        raise TypeError(f"draft_module={draft_module!r}: must be True or False")
    draft_tokens = _as_int(draft_tokens, "draft_tokens", 0)
    desc = memory_description(model, prec, cluster.accelerator, bool(draft_module), draft_tokens)
    num_gpus = _as_int(cluster.num_gpus, "cluster.num_gpus", 1)

    pop = None
    if popularity is not None or replicas > 0:
        if not model.is_moe:
            raise ValueError(
                f"replicas={replicas}/popularity: expert replication needs a MoE model ({model.id!r} has no routed experts)"
            )
        if popularity is None:
            pop = np.ones(model.routed_experts)
        else:
            try:
                pop = np.asarray(popularity, dtype=np.float64)
            except (TypeError, ValueError):
                raise TypeError(f"popularity={popularity!r}: must be a sequence of {model.routed_experts} "
                                "non-negative numbers (one per routed expert)") from None
            if pop.ndim != 1 or pop.size != model.routed_experts:
                raise ValueError(
                    f"popularity: has shape {pop.shape}; must have one value per routed expert ({model.routed_experts})"
                )
    if block_size is not None and lengths is None:
        raise ValueError("block_size: paged KV packing needs lengths (an array or a Workload distribution)")
    bs = 16 if block_size is None else _as_int(block_size, "block_size", 1)
    lens, seed_rec = _resolve_lengths(lengths, num_sequences, seed, nthreads)

    if isinstance(plan, str):
        if plan != "auto":
            raise ValueError(f"plan={plan!r}: must be 'auto' or a qsengine.Plan")
        pdesc = _auto_plan(desc, num_gpus, ctx, pop is not None, nthreads)
    else:
        pdesc = _plan_desc(plan)
        plan.check_desc(desc, num_gpus, f"Plan {plan.label} for {model.id} on {cluster.label}")

    r = _core.pack(desc, pdesc, num_gpus, ctx, pop, replicas, lens, bs)
    gpu_map = _gpu_map(r)
    replication = None
    if r.has_replicas:
        replication = ReplicaStats(
            replicas=int(r.replicas),
            expert_copies=r.expert_copies,
            placement=pd.DataFrame({"expert": r.replica_expert, "ep_rank": r.replica_rank}),
            load_before=r.load_before,
            load_after=r.load_after,
            imbalance_before=float(r.imbalance_before),
            imbalance_after=float(r.imbalance_after),
            cluster_batch_without_replicas=int(r.cluster_batch_without_replicas),
            batch_cost=int(r.cluster_batch_without_replicas - r.cluster_batch),
        )
    paged = None
    if r.has_paged:
        paged = PagedStats(
            block_size=int(r.block_size), offered=int(r.offered), placed=int(r.placed), rejected=int(r.rejected),
            first_rejected=int(r.first_rejected), tokens=int(r.tokens_placed), kv_bytes=float(r.kv_placed_bytes),
            fragmentation_bytes=float(r.fragmentation_bytes), replica_sequences=r.unit_sequences,
        )
    return Packing(
        model=model,
        cluster=cluster,
        precision=prec,
        plan=_plan_from_desc(r.plan),
        context=ctx,
        feasible=bool(r.feasible),
        reason=_reason(model, cluster, prec, bool(r.feasible), str(r.reason)),
        binding_constraint=r.binding,  # type: ignore[arg-type]
        binding_gpu=None if r.binding_gpu < 0 else int(r.binding_gpu),
        admissible_batch=int(r.admissible_batch),
        replica_batches=r.unit_batch,
        cluster_batch=int(r.cluster_batch),
        gpu_map=gpu_map,
        replication=replication,
        paged=paged,
        seed=seed_rec,
    )


def _reason(model: Model, cluster: Cluster, prec: Precision, feasible: bool, reason: str) -> str:
    """An infeasible packing's reason, the binding shortfall first (total
    weights against total usable HBM) when that is what rules every plan out."""
    if feasible:
        return reason
    total = weights_shortfall(model, cluster, prec)
    return f"{total}; this plan: {reason}" if total else reason


def plans(model: Model | str, cluster: Cluster | str | int) -> list[Plan]:
    """Every valid parallel plan for the model on the cluster (or on an int
    number of GPUs), in canonical order (tp, pp, ep, etp, attn_dp)."""
    model = as_model(model)
    g = _as_int(cluster, "num_gpus", 1) if isinstance(cluster, numbers.Integral) else as_cluster(cluster).num_gpus
    return [_plan_from_desc(p) for p in _core.enumerate_plans(memory_description(model), g)]


def _table(t: Any) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "num_gpus": t.num_gpus,
            "plan": t.label,  # same rule as Plan.label (etp shown only when not the default)
            "tp": t.tp,
            "pp": t.pp,
            "dp": t.dp,
            "ep": t.ep,
            "etp": t.etp,
            "attn_dp": t.attn_dp,
            "replicas": t.units,
            "replica_batch": t.unit_batch,
            "cluster_batch": t.cluster_batch,
            "feasible": t.feasible,
            "weights_fit": t.weights_fit,
            "max_weight_bytes": t.weight_bytes_max,
            "binding_stage": t.binding_stage,
        }
    )


def rank_plans(
    model: Model | str,
    cluster: Cluster | str,
    context: int | Workload,
    precision: Precision | str | None = None,
    threads: int | None = None,
) -> pd.DataFrame:
    """Every valid plan for the cluster, best first: admissible cluster batch
    (desc), infeasible plans last (least overfull first), ties to smaller
    tp·pp, then smaller ep. One row per plan."""
    model = as_model(model)
    cluster = as_cluster(cluster)
    desc = memory_description(model, _precision(model, precision), cluster.accelerator)
    g = cluster.num_gpus
    return _table(_core.search_plans(desc, g, g, _as_context(context), _threads(threads)))


def search_plans(
    model: Model | str,
    accelerator: Accelerator | Cluster | str,
    context: int | Workload,
    max_gpus: int,
    min_gpus: int = 1,
    precision: Precision | str | None = None,
    threads: int | None = None,
) -> pd.DataFrame:
    """Every valid plan for every cluster size in [min_gpus, max_gpus], each
    size's plans ranked as in :func:`rank_plans`. Multithreaded, deterministic."""
    model = as_model(model)
    acc = _as_accelerator(accelerator)
    desc = memory_description(model, _precision(model, precision), acc)
    lo = _as_int(min_gpus, "min_gpus", 1)
    hi = _as_int(max_gpus, "max_gpus", lo)
    return _table(_core.search_plans(desc, lo, hi, _as_context(context), _threads(threads)))


def min_gpus(
    model: Model | str,
    accelerator: Accelerator | Cluster | str,
    context: int | Workload,
    precision: Precision | str | None = None,
    max_gpus: int = 4096,
) -> int | None:
    """The smallest number of ``accelerator`` GPUs on which ``model`` is
    feasible (at least one sequence of ``context`` tokens fits) under some
    valid plan; None if no cluster of up to ``max_gpus`` GPUs works."""
    model = as_model(model)
    acc = _as_accelerator(accelerator)
    desc = memory_description(model, _precision(model, precision), acc)
    g, _ = _core.min_gpus(desc, _as_context(context), _as_int(max_gpus, "max_gpus", 1))
    return int(g) if g > 0 else None


# ------------------------------------------------------------- infeasible reasons
def weights_shortfall(model: Model | str, cluster: Cluster | str, precision: Precision | str | None = None) -> str:
    """The binding shortfall when a model's weights cannot fit on a cluster
    under *any* plan: total weight bytes against total usable HBM (every GPU's
    ``usable_bytes``), e.g. ``"weights 3,146 GB in total exceed the 544 GB
    usable on 8xh100 (8 x 68.0 GB)"``; ``""`` when the total fits (then a
    plan's own distribution is what binds). Infeasible reasons start with it
    (:func:`pack`; the simulation pipeline can call it for its sides)."""
    model = as_model(model)
    cluster = as_cluster(cluster)
    prec = _precision(model, precision)
    total = model.weight_bytes(prec)
    usable = cluster.num_gpus * cluster.accelerator.usable_bytes
    if total <= usable:
        return ""
    return (f"weights {total / 1e9:,.0f} GB in total exceed the {usable / 1e9:,.0f} GB usable on "
            f"{cluster.label} ({cluster.num_gpus} x {cluster.accelerator.usable_bytes / 1e9:.1f} GB) at "
            f"{prec.name}")
