"""qsengine: does a Mixture-of-Experts model or its quality-matched dense twin
serve LLM decode traffic better on a given GPU cluster, by how much, and why?

The public API is re-exported here; the compiled core ``qsengine._core`` is
private.
"""

from __future__ import annotations

from qsengine._core import __version__
from qsengine.errors import QsengineWarning, ResourceLimitError, SpecError
from qsengine._limits import get_memory_limit, set_memory_limit
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
    "QsengineWarning",
    "ResourceLimitError",
    "SpecError",
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
]
