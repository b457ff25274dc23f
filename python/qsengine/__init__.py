"""qsengine: does a Mixture-of-Experts model or its quality-matched dense twin
serve LLM decode traffic better on a given GPU cluster, by how much, and why?

The public API is re-exported here; the compiled core ``qsengine._core`` is
private.
"""

from __future__ import annotations

from qsengine._core import __version__
from qsengine.errors import QsengineWarning, ResourceLimitError, SpecError
from qsengine.specs import Accelerator, Attention, Cluster, Model, Plan, Precision, Workload
from qsengine.specs import (
    PRECISIONS,
    QsResult,
    Verdict,
    accelerators,
    as_accelerator,
    as_cluster,
    as_model,
    as_precision,
    clusters,
    dense_twin,
    load_accelerator,
    load_cluster,
    load_model,
    models,
    precisions,
    qs,
)
from qsengine.packing import Packing, min_gpus, pack, plans, rank_plans

__all__ = [
    "__version__",
    "Accelerator",
    "Attention",
    "Cluster",
    "Model",
    "Plan",
    "Precision",
    "Workload",
    "QsengineWarning",
    "ResourceLimitError",
    "SpecError",
    # specs layer: presets, loaders, dense twin, qs inequality
    "PRECISIONS",
    "QsResult",
    "Verdict",
    "accelerators",
    "as_accelerator",
    "as_cluster",
    "as_model",
    "as_precision",
    "clusters",
    "dense_twin",
    "load_accelerator",
    "load_cluster",
    "load_model",
    "models",
    "precisions",
    "qs",
    "Packing",
    "pack",
    "min_gpus",
    "plans",
    "rank_plans",
]
