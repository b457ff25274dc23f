"""HBM packing: weights, expert replicas and KV caches onto the cluster's GPUs.

The specs (:class:`~qsengine.Model`, :class:`~qsengine.Precision`,
:class:`~qsengine.Accelerator`, :class:`~qsengine.Plan`) are flattened here
into a numeric memory description (:func:`memory_description`); the C++ core
(``cpp/core/packing.h``) does all the arithmetic. Every formula is written
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

from qsengine.packing.api import min_gpus, pack, plans, rank_plans, search_plans, weights_shortfall
from qsengine.packing.cli import add_parser
from qsengine.packing.memory import (
    COMPONENTS,
    STACK_COLUMNS,
    PlanMemory,
    a2a_buffer_bytes_per_token,
    admissible_batches,
    memory_description,
    plan_memory,
)
from qsengine.packing.result import Packing, PagedStats, ReplicaStats

__all__ = [
    "COMPONENTS",
    "Packing",
    "PagedStats",
    "PlanMemory",
    "ReplicaStats",
    "STACK_COLUMNS",
    "add_parser",
    "a2a_buffer_bytes_per_token",
    "admissible_batches",
    "memory_description",
    "min_gpus",
    "pack",
    "plan_memory",
    "plans",
    "rank_plans",
    "search_plans",
    "weights_shortfall",
]
