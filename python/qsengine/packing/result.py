"""What :func:`pack` returns: :class:`Packing` (per-GPU map, summary, plot, HTML view) with
its replica and paged-KV statistics."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from qsengine._core import FORMAT_VERSION
from qsengine.specs import Cluster, Model, Plan, Precision

if TYPE_CHECKING:  # pragma: no cover
    import matplotlib.axes

from qsengine.packing.memory import COMPONENTS, STACK_COLUMNS, BindingConstraint


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
            ("a2a", m["a2a"].to_numpy()),
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
    # the core counts each sequence's EP all-to-all buffer share with its KV: shown apart
    data["kv"] = r.kv_bytes - r.a2a_bytes
    data["a2a"] = r.a2a_bytes
    data["reserve"] = r.reserve
    data["unusable"] = r.unusable
    data["free"] = r.free
    data["overflow"] = r.overflow
    data["capacity"] = np.full(n, r.capacity)
    data["kv_per_sequence"] = r.kv_per_sequence - r.a2a_per_sequence
    data["a2a_per_sequence"] = r.a2a_per_sequence
    data["replica_count"] = r.replica_count
    return pd.DataFrame(data)
