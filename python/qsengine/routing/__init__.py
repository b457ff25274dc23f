"""Token-to-expert routing Monte Carlo: models, placement, :func:`route`, :class:`RoutingStats`.

Per microbatch of ``batch`` tokens and per MoE layer, each token picks ``top_k``
distinct experts out of ``experts`` (exact Plackett-Luce: sequential draws
without replacement proportional to the weights). The C++ core streams exact
integer histograms, so memory does not depend on ``microbatches``.

Example::

    >>> import qsengine
    >>> s = qsengine.route(256, 8, 64, 2000, routing="powerlaw:1.0",
    ...                    placement=qsengine.Placement.contiguous(8), seed=1)
    >>> 8 <= s.unique.mean <= 256
    True
"""

from qsengine.routing.engine import route, sample_routing
from qsengine.routing.laws import (
    Dirichlet,
    GroupLimited,
    Popularity,
    PowerLaw,
    RoutingModel,
    Sticky,
    Trace,
    Uniform,
    independent_popularity,
    parse_routing,
    proxy_popularity,
)
from qsengine.routing.placement import LayerCost, Placement
from qsengine.routing.stats import (
    Distribution,
    RoutingConfig,
    RoutingPrecision,
    RoutingStats,
    expected_unique,
    unique_variance,
)

__all__ = [
    "Uniform",
    "PowerLaw",
    "Popularity",
    "Dirichlet",
    "GroupLimited",
    "Sticky",
    "Trace",
    "RoutingModel",
    "Placement",
    "LayerCost",
    "Distribution",
    "RoutingConfig",
    "RoutingStats",
    "RoutingPrecision",
    "route",
    "sample_routing",
    "parse_routing",
    "expected_unique",
    "unique_variance",
    "independent_popularity",
    "proxy_popularity",
]

