"""HBM packing: weights, expert replicas and KV caches onto the cluster's GPUs.

The specs (:class:`~qsengine.Model`, :class:`~qsengine.Precision`,
:class:`~qsengine.Accelerator`, :class:`~qsengine.Plan`) are flattened here
into a numeric memory description (:func:`memory_description`); the C++ core
(``cpp/core/packing.cc``) does all the arithmetic. Every formula is written
out in ``docs/packing.md``.

Entry points:

* :func:`pack` — the per-GPU memory map of a model on a cluster under a plan,
  the admissible batch at a context length, feasibility and why; optionally
  expert replicas (EPLB-style) and mixed-length paged KV packing.
* :func:`min_gpus` — the smallest number of an accelerator on which the model
  is feasible at a context length.
* :func:`plans`, :func:`rank_plans`, :func:`search_plans` — plan enumeration
  and ranking by admissible batch.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from qsengine import _core
from qsengine._core import FORMAT_VERSION
from qsengine._limits import get_memory_limit
from qsengine.errors import ResourceLimitError
from qsengine._seed import SeedLike, as_seed_sequence, philox_key, seed_record
from qsengine.specs import Accelerator, Cluster, Model, Plan, Precision, Workload
from qsengine.specs import PRECISIONS
from qsengine.specs.loaders import as_accelerator, as_cluster, as_model, as_precision, default_precision

if TYPE_CHECKING:  # pragma: no cover
    import matplotlib.axes

__all__ = [
    "COMPONENTS",
    "Packing",
    "PagedStats",
    "ReplicaStats",
    "memory_description",
    "min_gpus",
    "pack",
    "plans",
    "rank_plans",
    "search_plans",
]

#: Weight components of the per-GPU map, in order (as in ``Model.params_by_component``).
COMPONENTS: tuple[str, ...] = tuple(_core.COMPONENTS)

#: Per-GPU map columns that stack to the GPU's HBM capacity (in this order).
STACK_COLUMNS: tuple[str, ...] = COMPONENTS + ("replicas", "kv", "reserve", "unusable", "free")

BindingConstraint = Literal["weights", "kv", ""]


# --------------------------------------------------------------------- inputs
def _as_accelerator(accelerator: Accelerator | Cluster | str) -> Accelerator:
    if isinstance(accelerator, Cluster):
        return accelerator.accelerator
    return as_accelerator(accelerator)


def _as_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r} (type {type(value).__name__}): must be an integer")
    v = int(value)
    if v < minimum:
        raise ValueError(f"{name}={v}: must be >= {minimum}")
    if v > _MAX_INT:
        raise ValueError(f"{name}={v}: must be <= 2^53")
    return v


_MAX_INT = 2**53  # as the spec fields (specs._validate.MAX_SPEC_INT): exact in float64, no int64 overflow


def _as_context(context: int | Workload) -> int:
    if isinstance(context, Workload):
        context = context.context
    if isinstance(context, (bool, np.bool_)) or not isinstance(context, numbers.Integral):
        raise TypeError(f"context={context!r} (type {type(context).__name__}): must be an integer number of tokens")
    if int(context) <= 0:
        raise ValueError(f"context={int(context)}: must be a positive number of tokens")
    if int(context) > _MAX_INT:
        raise ValueError(f"context={int(context)}: must be <= 2^53 tokens")
    return int(context)


def _decode_local_mask(decode_layers: int, local_layers: int) -> list[int]:
    """Which decode layers are local: spread evenly (layer j is local when
    floor((j+1)·n_local/n_decode) > floor(j·n_local/n_decode))."""
    return [int((j + 1) * local_layers // decode_layers - j * local_layers // decode_layers) for j in range(decode_layers)]


def memory_description(
    model: Model, precision: Precision | str | None = None, accelerator: Accelerator | None = None
) -> _core.MemoryDesc:
    """Flatten model x precision x accelerator into the core's numeric description.

    Layer order conventions (docs/packing.md): encoder layers first, dense-FFN
    layers before MoE layers (DeepSeek's ``first_k_dense_replace``), local
    (sliding/chunked) layers spread evenly over the decode layers.
    """
    model = as_model(model)
    prec = as_precision(precision)
    L = model.num_layers
    if model.dense_layers + model.moe_layers != L:
        raise ValueError(
            f"model {model.id!r}: dense_layers={model.dense_layers} + moe_layers={model.moe_layers} must equal "
            f"num_layers={L} (the packer places every layer's FFN)"
        )
    if not 0 <= model.encoder_layers < L:
        raise ValueError(f"model {model.id!r}: encoder_layers={model.encoder_layers} must be in [0, num_layers={L})")
    att = model.attention
    wb, eb = prec.weight_bytes, prec.expert_bytes
    d = _core.MemoryDesc()
    d.attention_bytes = model.attention_params * wb
    d.dense_ffn_bytes = model.dense_ffn_params * wb
    d.expert_bytes = model.expert_params * eb
    d.shared_expert_bytes = model.shared_experts * model.shared_expert_params * eb
    d.router_bytes = model.router_params * wb
    d.norm_bytes_per_layer = 2 * model.hidden_size * wb
    d.final_norm_bytes = model.hidden_size * wb
    d.embedding_bytes = model.embedding_params * wb
    d.lm_head_bytes = model.lm_head_params * wb
    d.tie_embeddings = bool(model.tie_embeddings)
    d.layer_is_moe = [int(i >= model.dense_layers) for i in range(L)]
    d.layer_has_kv = [int(i >= model.encoder_layers) for i in range(L)]
    local = att.local_layers
    if local < 0 or local > model.decode_layers:
        raise ValueError(
            f"attention.local_layers={local}: must be in [0, decode_layers={model.decode_layers}]"
        )
    d.layer_is_local = [0] * model.encoder_layers + _decode_local_mask(model.decode_layers, local)
    d.routed_experts = model.routed_experts if model.is_moe else 0
    d.moe_intermediate = model.moe_intermediate
    d.num_heads = att.num_heads
    d.num_kv_heads = att.num_kv_heads
    d.mla = att.kind == "mla"
    d.kv_bytes_per_token_per_layer = model.kv_bytes_per_token_per_layer(prec.kv_bytes)
    d.local_window = int(att.local_window or 0) if local else 0
    if accelerator is not None:
        d.hbm_bytes = float(accelerator.hbm_bytes)
        d.usable_fraction = float(accelerator.usable_hbm_fraction)
        d.reserve_bytes = float(accelerator.runtime_reserve_bytes)
        d.validate()
    return d


def _plan_desc(plan: Plan) -> _core.PlanDesc:
    if not isinstance(plan, Plan):
        raise TypeError(f"plan={plan!r} (type {type(plan).__name__}): must be 'auto' or a qsengine.Plan")
    return plan.core_desc()  # the Plan validated its fields on construction


def _plan_from(tp: int, pp: int, dp: int, ep: int, etp: int, attn_dp: bool) -> Plan:
    default_etp = tp if ep == 1 else 1
    return Plan(
        tp=int(tp), pp=int(pp), dp=int(dp), ep=int(ep),
        etp=None if int(etp) in (0, default_etp) else int(etp), attn_dp=bool(attn_dp),
    )


def _plan_from_desc(p: _core.PlanDesc) -> Plan:
    return _plan_from(p.tp, p.pp, p.dp, p.ep, p.etp, p.attn_dp)


def _threads(threads: int | None) -> int:
    return 0 if threads is None else _as_int(threads, "threads", 1)


# --------------------------------------------------------------------- results
@dataclass(frozen=True)
class ReplicaStats:
    """Expert replication (EPLB-style greedy LPT) within each EP group.

    Attributes:
        replicas: extra expert copies per EP group (each copy spans every MoE
            layer of its pipeline stage).
        expert_copies: copies of each expert in one EP group (1 + replicas of it).
        placement: one row per replica: ``expert``, ``ep_rank``.
        load_before / load_after: expected token share per EP rank.
        imbalance_before / imbalance_after: max / mean expected EP-rank load.
        cluster_batch_without_replicas / batch_cost: admissible cluster batch
            without replicas, and how much the replicas cost.
    """

    replicas: int
    expert_copies: np.ndarray
    placement: pd.DataFrame
    load_before: np.ndarray
    load_after: np.ndarray
    imbalance_before: float
    imbalance_after: float
    cluster_batch_without_replicas: int
    batch_cost: int


@dataclass(frozen=True)
class PagedStats:
    """Mixed-length packing with paged KV blocks.

    Sequences arrive in order; each goes to the serving replica whose fullest
    GPU is least full among those it fits; a sequence that fits nowhere is
    rejected (the cluster is full for that length).

    Attributes:
        block_size: tokens per KV block.
        offered / placed / rejected: sequences offered, admitted, refused.
        first_rejected: index of the first refused sequence (-1 if none).
        tokens: context tokens of the admitted sequences.
        kv_bytes: KV bytes placed (blocks, padding included), whole cluster.
        fragmentation_bytes: of which padding in partly filled last blocks.
        replica_sequences: admitted sequences per serving replica.
    """

    block_size: int
    offered: int
    placed: int
    rejected: int
    first_rejected: int
    tokens: int
    kv_bytes: float
    fragmentation_bytes: float
    replica_sequences: np.ndarray

    @property
    def fragmentation_fraction(self) -> float:
        """Share of the placed KV bytes lost to partly filled blocks."""
        return self.fragmentation_bytes / self.kv_bytes if self.kv_bytes > 0 else 0.0

    @property
    def concurrency(self) -> int:
        """Concurrent sequences reached (= placed)."""
        return self.placed


@dataclass(frozen=True)
class Packing:
    """What sits on each GPU's HBM, and how many sequences fit.

    Attributes:
        model, cluster, precision, plan, context: the inputs (plan resolved
            when ``plan="auto"``).
        feasible: at least one sequence of ``context`` tokens fits on every
            serving replica.
        reason: why it is infeasible, or what fills the binding GPU.
        binding_constraint: ``"weights"`` (weights/replicas exceed usable HBM),
            ``"kv"`` (the KV cache fills the fullest GPU), or ``""``.
        binding_gpu: the GPU that binds (None if none).
        admissible_batch: sequences per serving replica (the smallest replica).
        replica_batches: admissible sequences of each serving replica (dp
            replicas, or dp·tp attention replicas with ``attn_dp``).
        cluster_batch: sum over serving replicas.
        gpu_map: per-GPU DataFrame (bytes): identity columns ``gpu``,
            ``replica``, ``stage``, ``dp_rank``, ``tp_rank``, ``ep_rank``, the
            weight components, ``replicas``, ``kv``, ``reserve``, ``unusable``
            (hbm·(1-usable fraction)), ``free``, ``overflow`` (bytes the
            weights exceed usable HBM by; 0 when they fit), ``capacity``,
            ``kv_per_sequence``, ``replica_count``.
        replication: :class:`ReplicaStats` when popularity/replicas were given.
        paged: :class:`PagedStats` when lengths were given.
    """

    model: Model
    cluster: Cluster
    precision: Precision
    plan: Plan
    context: int
    feasible: bool
    reason: str
    binding_constraint: BindingConstraint
    binding_gpu: int | None
    admissible_batch: int
    replica_batches: np.ndarray
    cluster_batch: int
    gpu_map: pd.DataFrame = field(repr=False)
    replication: ReplicaStats | None = field(default=None, repr=False)
    paged: PagedStats | None = field(default=None, repr=False)
    seed: dict[str, Any] | None = field(default=None, repr=False)

    # ------------------------------------------------------------ accessors
    @property
    def num_gpus(self) -> int:
        return self.cluster.num_gpus

    @property
    def imbalance_before(self) -> float | None:
        """Expected EP-rank load max/mean without replicas (None without popularity)."""
        return None if self.replication is None else self.replication.imbalance_before

    @property
    def imbalance_after(self) -> float | None:
        """Expected EP-rank load max/mean with the replicas."""
        return None if self.replication is None else self.replication.imbalance_after

    @property
    def weight_bytes(self) -> np.ndarray:
        """Weight bytes per GPU (all components, replicas excluded)."""
        return self.gpu_map[list(COMPONENTS)].sum(axis=1).to_numpy()

    def column(self, name: str) -> np.ndarray:
        """One per-GPU column as a numpy array (e.g. ``"kv"``, ``"free"``)."""
        if name not in self.gpu_map.columns:
            raise ValueError(f"column={name!r}: not a per-GPU map column ({', '.join(self.gpu_map.columns)})")
        return self.gpu_map[name].to_numpy()

    def to_pandas(self) -> pd.DataFrame:
        """The per-GPU map (a copy)."""
        return self.gpu_map.copy()

    # ------------------------------------------------------------ reporting
    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly record of the inputs and the result."""
        out: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "kind": "packing",
            "model": self.model.id,
            "cluster": self.cluster.label,
            "accelerator": self.cluster.accelerator.id,
            "num_gpus": self.num_gpus,
            "precision": self.precision.name,
            "plan": {
                "tp": self.plan.tp, "pp": self.plan.pp, "dp": self.plan.dp, "ep": self.plan.ep,
                "etp": self.plan.etp, "attn_dp": self.plan.attn_dp, "label": self.plan.label,
            },
            "context": self.context,
            "feasible": self.feasible,
            "reason": self.reason,
            "binding_constraint": self.binding_constraint,
            "binding_gpu": self.binding_gpu,
            "admissible_batch": self.admissible_batch,
            "replica_batches": [int(x) for x in self.replica_batches],
            "cluster_batch": self.cluster_batch,
            "gpu_map": {c: self.gpu_map[c].tolist() for c in self.gpu_map.columns},
        }
        if self.replication is not None:
            r = self.replication
            out["replication"] = {
                "replicas": r.replicas,
                "expert_copies": r.expert_copies.tolist(),
                "placement": r.placement.to_dict(orient="list"),
                "load_before": r.load_before.tolist(),
                "load_after": r.load_after.tolist(),
                "imbalance_before": r.imbalance_before,
                "imbalance_after": r.imbalance_after,
                "cluster_batch_without_replicas": r.cluster_batch_without_replicas,
                "batch_cost": r.batch_cost,
            }
        if self.paged is not None:
            p = self.paged
            out["paged"] = {
                "block_size": p.block_size, "offered": p.offered, "placed": p.placed, "rejected": p.rejected,
                "first_rejected": p.first_rejected, "tokens": p.tokens, "kv_bytes": p.kv_bytes,
                "fragmentation_bytes": p.fragmentation_bytes, "fragmentation_fraction": p.fragmentation_fraction,
                "replica_sequences": p.replica_sequences.tolist(),
            }
        if self.seed is not None:
            out["seed"] = self.seed
        return out

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def summary(self) -> str:
        """A readable report: the verdict, then the HBM map in GB, GPUs with
        identical maps collapsed into one row."""
        acc = self.cluster.accelerator
        lines = [
            f"{self.model.name or self.model.id} on {self.cluster.label} ({acc.name or acc.id}), "
            f"precision {self.precision.name}, context {self.context:,} tokens",
            f"plan {self.plan.label}: {'FEASIBLE' if self.feasible else 'INFEASIBLE'}",
            f"  {self.reason}" if self.reason else "",
            f"  admissible batch: {self.admissible_batch:,} per replica x {len(self.replica_batches)} "
            f"replicas = {self.cluster_batch:,} sequences (binding: {self.binding_constraint or '-'}"
            + (f", GPU {self.binding_gpu})" if self.binding_gpu is not None else ")"),
            f"  HBM per GPU {acc.hbm_bytes / 1e9:.1f} GB: usable {acc.usable_hbm_fraction:.0%} "
            f"minus {acc.runtime_reserve_bytes / 1e9:.1f} GB runtime reserve = {acc.usable_bytes / 1e9:.1f} GB",
        ]
        if self.replication is not None:
            r = self.replication
            lines.append(
                f"  expert replicas: {r.replicas} per EP group, imbalance (max/mean load) "
                f"{r.imbalance_before:.3f} -> {r.imbalance_after:.3f}, cost {r.batch_cost:,} sequences"
            )
        if self.paged is not None:
            p = self.paged
            lines.append(
                f"  paged KV (block {p.block_size}): {p.placed:,} of {p.offered:,} sequences placed, "
                f"{p.rejected:,} rejected; fragmentation {p.fragmentation_bytes / 1e9:.2f} GB "
                f"({p.fragmentation_fraction:.2%} of KV)"
            )
        lines.append("  per-GPU HBM (GB):")
        lines.append("\n".join("    " + ln for ln in self.hbm_table().to_string(index=False).splitlines()))
        return "\n".join(ln for ln in lines if ln)

    def hbm_table(self) -> pd.DataFrame:
        """HBM use per GPU in GB (non-zero columns), consecutive GPUs with
        identical maps collapsed into one row (``gpus`` = "0-7")."""
        cols = [c for c in STACK_COLUMNS if c not in ("unusable",) and (self.gpu_map[c] != 0).any()]
        if (self.gpu_map["overflow"] > 0).any():
            cols.append("overflow")
        gb = (self.gpu_map[cols] / 1e9).round(2)
        key = gb.astype(str).agg("|".join, axis=1)
        rows = []
        start = 0
        gpus = self.gpu_map["gpu"].to_numpy()
        for i in range(1, len(key) + 1):
            if i == len(key) or key.iloc[i] != key.iloc[start]:
                label = f"{gpus[start]}" if i - 1 == start else f"{gpus[start]}-{gpus[i - 1]}"
                rows.append([label, int(self.gpu_map["stage"].iloc[start])] + gb.iloc[start].tolist())
                start = i
        return pd.DataFrame(rows, columns=["gpus", "stage"] + cols)

    def _repr_html_(self) -> str:
        """Notebook view: the verdict lines, the per-GPU HBM table and the plot."""
        from qsengine._html import packing_html

        return packing_html(self)

    def __str__(self) -> str:
        return self.summary()

    def plot(self, ax: "matplotlib.axes.Axes | None" = None) -> "matplotlib.axes.Axes":
        """Stacked bar of HBM use per GPU (GB): weights by component, replicas,
        KV, reserve (runtime reserve and the unusable fraction), free; weights
        beyond capacity are drawn hatched above the capacity line."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(max(6.0, min(18.0, 0.25 * self.num_gpus + 4)), 4.5))
        m = self.gpu_map
        x = m["gpu"].to_numpy()
        bottom = np.zeros(len(m))
        series = [(c, m[c].to_numpy()) for c in COMPONENTS] + [
            ("replicas", m["replicas"].to_numpy()),
            ("kv", m["kv"].to_numpy()),
            ("reserve", (m["reserve"] + m["unusable"]).to_numpy()),
            ("free", m["free"].to_numpy()),
        ]
        colors = plt.get_cmap("tab20").colors
        for i, (name, val) in enumerate(series):
            if not (val > 0).any():
                continue
            color = "#dddddd" if name == "free" else colors[i % len(colors)]
            ax.bar(x, val / 1e9, bottom=bottom / 1e9, label=name, color=color, width=0.85)
            bottom += val
        over = m["overflow"].to_numpy()
        if (over > 0).any():
            # weights beyond capacity: the stack above already counts them, show the excess hatched
            ax.bar(x, over / 1e9, bottom=(bottom - over) / 1e9, fill=False, hatch="//", edgecolor="red",
                   width=0.85, label="over capacity")
        ax.axhline(self.cluster.accelerator.hbm_bytes / 1e9, color="black", lw=0.8, ls="--")
        ax.set_xlabel("GPU")
        ax.set_ylabel("HBM (GB)")
        ax.set_title(
            f"{self.model.id} on {self.cluster.label}, {self.plan.label}, T={self.context:,}: "
            f"batch {self.cluster_batch:,}" + ("" if self.feasible else " (infeasible)"),
            fontsize=9,
        )
        ax.legend(fontsize=7, ncol=2, loc="upper right", framealpha=0.8)
        return ax


def _gpu_map(r: Any) -> pd.DataFrame:
    n = r.num_gpus
    data: dict[str, Any] = {
        "gpu": np.arange(n, dtype=np.int64),
        "replica": r.unit,
        "stage": r.stage,
        "dp_rank": r.dp_rank,
        "tp_rank": r.tp_rank,
        "ep_rank": r.ep_rank,
    }
    for i, c in enumerate(COMPONENTS):
        data[c] = r.weights(i)
    data["replicas"] = r.replica_bytes
    data["kv"] = r.kv_bytes
    data["reserve"] = r.reserve
    data["unusable"] = r.unusable
    data["free"] = r.free
    data["overflow"] = r.overflow
    data["capacity"] = np.full(n, r.capacity)
    data["kv_per_sequence"] = r.kv_per_sequence
    data["replica_count"] = r.replica_count
    return pd.DataFrame(data)


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
                          bool(t.attn_dp[idx]))


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
            memory taken from the KV cache.
        popularity: expected token share of each routed expert (E values, any
            positive scale; default uniform). Needed to judge replication.
        block_size: tokens per paged KV block (default 16) for ``lengths``.
        lengths: context lengths of arriving sequences (array), or a Workload
            with a length distribution to draw ``num_sequences`` from with ``seed``.
        num_sequences: draws from a Workload distribution (default 100 000).
        seed: None | int | numpy SeedSequence for the draws (recorded).
        threads: worker threads (None = all hardware threads); results do not
            depend on it.

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
    desc = memory_description(model, prec, cluster.accelerator)
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


# --------------------------------------------------------------------- CLI
def _parse_plan(text: str) -> Plan | Literal["auto"]:
    """``--plan``: ``auto`` or a plan label (:meth:`Plan.from_label`)."""
    return "auto" if text == "auto" else Plan.from_label(text)


def _cmd_pack(args: Any) -> int:
    cluster = as_cluster(args.cluster)
    plan = _parse_plan(args.plan)
    from qsengine.study import parse_tokens

    p = pack(args.model, cluster, parse_tokens(args.context), plan=plan, precision=args.precision,
             replicas=args.replicas)
    if args.json:
        print(p.to_json(indent=2))
    else:
        print(p.summary())
        if plan == "auto":
            print("  plan 'auto' here = the largest admissible cluster batch (qsengine simulate's 'auto' picks "
                  "the highest throughput, which can be another plan)")
    return 0 if p.feasible else 1


def _cmd_min_gpus(args: Any) -> int:
    from qsengine.study import parse_tokens

    model = as_model(args.model)
    acc = _as_accelerator(args.accelerator)
    prec = _precision(model, args.precision)
    context = parse_tokens(args.context)
    g = min_gpus(model, acc, context, precision=prec, max_gpus=args.max_gpus)
    head = f"{model.id} on {acc.id} at {prec.name}, context {context:,} tokens"
    if g is None:
        print(f"{head}: no cluster of up to {args.max_gpus:,} GPUs fits one sequence")
        return 1
    best = rank_plans(model, Cluster(acc, g), context, precision=prec).iloc[0]
    print(f"{head}: {g} GPUs (plan {best['plan']}, {int(best['cluster_batch']):,} sequences at most; "
          f"plan = the largest admissible cluster batch)")
    return 0


def add_parser(sub: Any) -> None:
    """Register ``qsengine pack``."""
    ps = sub.add_parser("pack", help="pack a model onto a cluster's HBM: per-GPU map and admissible batch")
    ps.add_argument("--model", required=True, help="model: shipped name, TOML file or Hugging Face config.json")
    ps.add_argument("--cluster", required=True, help="cluster: shipped name, 'NxGPU' such as 8xH200, or TOML file")
    ps.add_argument("--context", required=True, help="context length: 32768 or 32K")
    ps.add_argument("--precision", default=None,
                    help=f"precision preset ({', '.join(sorted(PRECISIONS))}); default: the model's deployed precision")
    ps.add_argument("--plan", default="auto", help="'auto' or a label like tp8-pp1-dp1-ep8")
    ps.add_argument("--replicas", type=int, default=0, help="extra expert replicas per EP group")
    ps.add_argument("--json", action="store_true", help="print the full record as JSON")
    ps.set_defaults(handler=_cmd_pack)

    mg = sub.add_parser("min-gpus", help="smallest number of GPUs of one accelerator that fits a model",
                        description="The smallest cluster of ACCELERATOR GPUs on which one sequence of CONTEXT "
                                    "tokens fits under some valid plan (weights + KV in usable HBM).")
    mg.add_argument("--model", required=True, help="model: shipped name, TOML file or Hugging Face config.json")
    mg.add_argument("--accelerator", required=True, help="accelerator: shipped name or alias (H200, MI300X), or TOML")
    mg.add_argument("--context", required=True, help="context length: 32768 or 32K")
    mg.add_argument("--precision", default=None,
                    help=f"precision preset ({', '.join(sorted(PRECISIONS))}); default: the model's deployed precision")
    mg.add_argument("--max-gpus", type=int, default=4096, help="largest cluster tried (default %(default)s)")
    mg.set_defaults(handler=_cmd_min_gpus)


# ------------------------------------------------------------- batched admission
@dataclass(frozen=True)
class PlanMemory:
    """Per-plan constants of one model × precision × cluster from which
    :func:`admissible_batches` derives the admissible batch of any (plan,
    context) exactly as :func:`pack` does: per pipeline stage (rows padded to
    ``max_pp``), the weight bytes on one GPU by component and in total, the KV
    bytes per token per layer, and the full/local KV layers.

    Arrays have shape (plans, max_pp); padding stages carry no KV and no weights
    (``weight_total`` = -inf). ``table`` is the core's ``AdmissionTable`` of the
    same plans (the same stages), on which :func:`admissible_batches` runs."""

    plans: tuple[Plan, ...]
    usable: float
    local_window: int
    shard: np.ndarray  # (plans,) 1 with attn_dp else tp
    weights: np.ndarray  # (plans, max_pp, components)
    weight_total: np.ndarray
    kv_per_token_layer: np.ndarray
    kv_full_layers: np.ndarray
    kv_local_layers: np.ndarray
    dense_layers: np.ndarray
    table: _core.AdmissionTable = field(repr=False, compare=False)


def plan_memory(model: Model, cluster: Cluster, precision: Precision, plan_list: Sequence[Plan] | None = None
                ) -> PlanMemory:
    """The :class:`PlanMemory` of ``plan_list`` (default: every valid plan, in
    :func:`plans` order)."""
    desc = memory_description(model, precision, cluster.accelerator)
    g = int(cluster.num_gpus)
    if plan_list is None:
        pdescs = list(_core.enumerate_plans(desc, g))
        plan_list = [_plan_from_desc(p) for p in pdescs]
    else:
        pdescs = [_plan_desc(p) for p in plan_list]
    table = _core.AdmissionTable(desc, pdescs, g)
    t = table.stage_table()
    n = len(plan_list)
    max_pp = max([p.pp for p in plan_list], default=1)
    shape = (n, max_pp)
    idx = (t["plan"], t["stage"])
    weights = np.zeros(shape + (len(COMPONENTS),))
    weights[idx] = t["weights"]
    total = np.full(shape, -np.inf)
    total[idx] = t["weight_total"]
    kv = np.zeros(shape)
    kv[idx] = t["kv_per_token_layer"]
    full = np.zeros(shape, dtype=np.int64)
    full[idx] = t["kv_full_layers"]
    local = np.zeros(shape, dtype=np.int64)
    local[idx] = t["kv_local_layers"]
    dense = np.zeros(shape, dtype=np.int64)
    dense[idx] = t["dense_layers"]
    shard = np.array([1.0 if p.attn_dp else float(p.tp) for p in plan_list])
    return PlanMemory(plans=tuple(plan_list), usable=float(desc.usable_bytes), local_window=int(desc.local_window),
                      shard=shard, weights=weights, weight_total=total, kv_per_token_layer=kv, kv_full_layers=full,
                      kv_local_layers=local, dense_layers=dense, table=table)


def admissible_batches(pm: PlanMemory, plan_index: np.ndarray, context: np.ndarray,
                       dense_ffn_bytes: np.ndarray | None = None, *, fullest: bool = False
                       ) -> tuple[np.ndarray, ...]:
    """Admissible batch per replica (and whether the weights fit) for many
    (plan, context) lanes: ``pack(model, cluster, context, plan,
    precision).admissible_batch`` exactly, from the per-plan constants.

    ``dense_ffn_bytes`` (per lane) replaces the model's dense FFN block bytes:
    the dense twins of one MoE differ only there, so one :class:`PlanMemory`
    of any of them serves all.

    Runs in the C++ core (``_core.admissible_batches`` on ``pm.table``): the
    same per-stage code as the core's plan evaluation, over lanes in parallel
    with the GIL released (the result does not depend on the thread count).
    Returns (batch int64, fit bool), one entry per lane; with ``fullest``
    also the weight bytes on each lane's fullest GPU (``max(pack(...).weight_bytes)``).
    Raises ValueError
    naming the first bad lane (plan index out of range, context outside
    [1, 2^53], dense FFN bytes negative or not finite) or the argument whose
    length differs from ``plan_index``'s.
    """
    batch, fit, weight_max = _core.admissible_batches(pm.table, plan_index, context, dense_ffn_bytes)
    return (batch, fit, weight_max) if fullest else (batch, fit)


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
