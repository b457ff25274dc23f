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
from qsengine._limits import get_memory_limit, set_memory_limit
from qsengine.sweep import load_results, sweep
from qsengine.routing import (
    Dirichlet,
    Distribution,
    GroupLimited,
    LayerCost,
    Placement,
    Popularity,
    PowerLaw,
    RoutingConfig,
    RoutingStats,
    Sticky,
    Trace,
    Uniform,
    expected_unique,
    route,
    unique_variance,
)

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
    # routing (qsengine.routing)
    "Dirichlet",
    "Distribution",
    "GroupLimited",
    "LayerCost",
    "Placement",
    "Popularity",
    "PowerLaw",
    "RoutingConfig",
    "RoutingStats",
    "Sticky",
    "Trace",
    "Uniform",
    "expected_unique",
    "get_memory_limit",
    "route",
    "set_memory_limit",
    "unique_variance",
    # sweeps (qsengine.sweep; the function shadows the module attribute, import the
    # module itself with importlib or `from qsengine.sweep import ...`)
    "sweep",
    "load_results",
]
