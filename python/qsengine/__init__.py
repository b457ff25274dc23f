"""qsengine: does a Mixture-of-Experts model or its quality-matched dense twin
serve LLM decode traffic better on a given GPU cluster, by how much, and why?

The public API is re-exported here; the compiled core ``qsengine._core`` is
private. Modules: ``specs`` (models, hardware, plans), ``routing`` (routing
Monte Carlo), ``packing`` (HBM packing), ``decode`` (points, the step model,
the evaluation pipeline and :func:`simulate`), ``sweeps`` (:func:`sweep`),
``study``.
"""

from __future__ import annotations

from qsengine import specs as _specs
from qsengine._core import __version__
from qsengine._fingerprint import code_fingerprint
from qsengine._limits import get_memory_limit, get_work_limit, set_memory_limit, set_work_limit
from qsengine.errors import QsengineWarning, ResourceLimitError, SpecError
from qsengine.packing import Packing, min_gpus, pack, plans, rank_plans
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
from qsengine.decode import ContextWarning, Point, SideResult, SimulationResult, StepBreakdown, StepOptions, simulate
from qsengine.specs import *  # noqa: F403 - the specs layer's own __all__
from qsengine.sweeps import load_results, sweep

__all__ = [
    "__version__",
    "code_fingerprint",
    "QsengineWarning",
    "ResourceLimitError",
    "SpecError",
    *_specs.__all__,
    # packing
    "Packing",
    "pack",
    "min_gpus",
    "plans",
    "rank_plans",
    # routing
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
    "get_work_limit",
    "route",
    "set_memory_limit",
    "set_work_limit",
    "unique_variance",
    # decode model and comparison
    "ContextWarning",
    "Point",
    "SideResult",
    "SimulationResult",
    "StepBreakdown",
    "StepOptions",
    "simulate",
    # sweeps
    "sweep",
    "load_results",
]
