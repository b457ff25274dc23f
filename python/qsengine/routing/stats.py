"""Routing results: closed forms for uniform routing, streamed distributions and
:class:`RoutingStats` (merge, versioned dict, summary)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from qsengine import _core
from qsengine.routing._checks import _float
from qsengine.routing.laws import RoutingModel, _model_from_dict

FORMAT = "qsengine.RoutingStats"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------
# closed forms (uniform routing)
# ---------------------------------------------------------------------------


def expected_unique(experts: int, top_k: int, batch: int) -> float:
    """E[u] for uniform routing: E(1 - (1 - k/E)^B)."""
    E, k, B = experts, top_k, batch
    return E * (1.0 - (1.0 - k / E) ** B)


def unique_variance(experts: int, top_k: int, batch: int) -> float:
    """Exact Var[u] for uniform routing.

    u = sum of indicators I_e (expert e touched). With q1 = (1-k/E)^B (e
    untouched) and q2 = ((E-k)(E-k-1)/(E(E-1)))^B (two given experts both
    untouched): p1 = 1-q1, p2 = P(both touched) = 1 - 2 q1 + q2, and
    Var[u] = E p1 (1-p1) + E(E-1)(p2 - p1^2).
    """
    E, k, B = experts, top_k, batch
    q1 = (1.0 - k / E) ** B
    p1 = 1.0 - q1
    q2 = ((E - k) * (E - k - 1) / (E * (E - 1))) ** B if E > 1 else 0.0
    p2 = 1.0 - 2.0 * q1 + q2
    return max(0.0, E * p1 * (1.0 - p1) + E * (E - 1) * (p2 - p1 * p1))


# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------


class Distribution:
    """A streamed distribution: support ``values`` (ascending) with ``counts``.

    Integer quantities are exact histograms. Times are log-binned (bin ratio
    1.001, values at geometric bin centres, quantiles within 0.05%), with mean
    and std streamed exactly in block order.
    """

    __slots__ = ("values", "counts", "_mean", "_var")

    def __init__(self, values: np.ndarray, counts: np.ndarray, *, mean: float | None = None,
                 var: float | None = None) -> None:
        order = np.argsort(values, kind="stable")
        self.values = np.asarray(values, dtype=np.float64)[order]
        self.counts = np.asarray(counts, dtype=np.uint64)[order]
        self._mean = mean
        self._var = var

    @property
    def n(self) -> int:
        """Number of samples."""
        return int(self.counts.sum(dtype=np.uint64))

    @property
    def mean(self) -> float:
        if self._mean is not None:
            return self._mean
        n = self.n
        return float(np.dot(self.values, self.counts.astype(np.float64)) / n) if n else math.nan

    @property
    def var(self) -> float:
        """Sample variance (ddof=1)."""
        if self._var is not None:
            return self._var
        n = self.n
        if n < 2:
            return math.nan
        d = self.values - self.mean
        return float(np.dot(d * d, self.counts.astype(np.float64)) / (n - 1))

    @property
    def std(self) -> float:
        """Sample standard deviation (ddof=1)."""
        return math.sqrt(self.var) if self.var == self.var else math.nan

    @property
    def sem(self) -> float:
        """Standard error of the mean."""
        n = self.n
        return self.std / math.sqrt(n) if n > 1 else math.nan

    def quantile(self, q: float) -> float:
        """Smallest support value v with P(X <= v) >= q (0 <= q <= 1)."""
        q = _float("q", q)
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q={q}: must be in [0, 1]")
        n = self.n
        if n == 0:
            return math.nan
        cum = np.cumsum(self.counts, dtype=np.uint64)
        target = max(1, math.ceil(q * n))
        return float(self.values[int(np.searchsorted(cum, target, side="left"))])

    @property
    def p50(self) -> float:
        return self.quantile(0.5)

    @property
    def p90(self) -> float:
        return self.quantile(0.9)

    @property
    def p99(self) -> float:
        return self.quantile(0.99)

    @property
    def max(self) -> float:
        nz = np.flatnonzero(self.counts)
        return float(self.values[nz[-1]]) if nz.size else math.nan

    @property
    def histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """(values, counts), only the support points with nonzero counts."""
        nz = self.counts > 0
        return self.values[nz], self.counts[nz]

    def __repr__(self) -> str:
        return f"Distribution(n={self.n}, mean={self.mean:.6g}, std={self.std:.6g}, p50={self.p50:.6g}, p99={self.p99:.6g})"


@dataclass(frozen=True)
class RoutingConfig:
    """Every input of a routing run except the seed, microbatches and threads."""

    experts: int
    top_k: int
    batch: int
    layers: int
    routing: Mapping[str, Any]
    placement: Mapping[str, Any]
    cost: Mapping[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return {"experts": self.experts, "top_k": self.top_k, "batch": self.batch, "layers": self.layers,
                "routing": _plain(self.routing), "placement": _plain(self.placement),
                "cost": None if self.cost is None else _plain(self.cost)}

    def model(self) -> RoutingModel | dict[str, Any]:
        """The routing model object (Trace: only its fingerprint dict)."""
        return _model_from_dict(self.routing)


def _plain(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


class _TimeStats:
    __slots__ = ("n", "mean", "m2", "lo", "counts")

    def __init__(self, n: int, mean: float, m2: float, lo: float, counts: np.ndarray) -> None:
        self.n, self.mean, self.m2, self.lo = int(n), float(mean), float(m2), float(lo)
        self.counts = np.asarray(counts, dtype=np.uint64)

    def merged(self, o: "_TimeStats") -> "_TimeStats":
        if self.n == 0:
            return o
        if o.n == 0:
            return self
        n = self.n + o.n
        d = o.mean - self.mean
        mean = self.mean + d * (o.n / n)
        m2 = self.m2 + o.m2 + d * d * (self.n * o.n / n)
        return _TimeStats(n, mean, m2, self.lo, self.counts + o.counts)

    def distribution(self) -> Distribution:
        r = float(_core.LOG_BIN_RATIO)
        centres = self.lo * r ** (np.arange(self.counts.size) + 0.5)
        var = self.m2 / (self.n - 1) if self.n > 1 else math.nan
        return Distribution(centres, self.counts, mean=self.mean, var=var)

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "mean": self.mean, "m2": self.m2, "lo": self.lo, "counts": self.counts.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "_TimeStats":
        return cls(d["n"], d["mean"], d["m2"], d["lo"], np.asarray(d["counts"], dtype=np.uint64))


@dataclass(frozen=True)
class RoutingPrecision:
    """How a precision-targeted run (``route(..., rtol=...)``) ended.

    ``statistic``: ``"step_time"`` (a cost was given) or ``"gpu_assign_max"``
    (max over GPUs of the token-expert assignments n_g, per microbatch-layer).
    ``rse_mean`` / ``rse_p99``: relative standard errors of its mean and p99
    reached when the run stopped (sectioning over whole work blocks, see
    :func:`route`); ``target_reached``: both are <= ``rtol`` (else the run
    stopped at ``max_microbatches``); ``sections``: sections behind the
    estimates; ``checkpoints``: stopping checks made.
    """

    rtol: float
    statistic: str
    max_microbatches: int
    target_reached: bool
    rse_mean: float
    rse_p99: float
    sections: int
    checkpoints: int

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


_HISTS = ("unique_hist", "gpu_unique_max_hist", "gpu_assign_max_hist", "tokens_per_expert_hist",
          "gpu_unique_sum", "gpu_assign_sum")


class RoutingStats:
    """Streamed statistics of a routing run (mergeable with ``+``).

    Per-layer quantities have ``microbatches * layers`` samples; step times
    have ``microbatches``. Attributes: :attr:`unique`, :attr:`reuse`,
    :attr:`gpu_unique_max`, :attr:`gpu_assign_max`, :attr:`imbalance`,
    :attr:`gpu_unique_mean`, :attr:`gpu_assign_mean`,
    :attr:`tokens_per_expert`, :attr:`layer_time` / :attr:`step_time` (when a
    cost was given), :attr:`config`, :attr:`microbatches` (run), :attr:`seed`,
    :attr:`precision` (with ``rtol``; also :attr:`target_reached`,
    :attr:`rse_mean`, :attr:`rse_p99`).
    """

    def __init__(self, config: RoutingConfig, microbatches: int, seed: list[dict[str, Any]],
                 hists: Mapping[str, np.ndarray], layer_time: _TimeStats | None = None,
                 step_time: _TimeStats | None = None, layer_weights: np.ndarray | None = None) -> None:
        self.config = config
        self.microbatches = int(microbatches)
        self.seed = seed
        self._h = {k: np.asarray(hists[k], dtype=np.uint64) for k in _HISTS}
        self._layer_time = layer_time
        self._step_time = step_time
        self.layer_weights = layer_weights
        #: How a precision-targeted run ended (None unless ``route(..., rtol=...)``
        #: made this object; a sum of runs has none).
        self.precision: RoutingPrecision | None = None

    # -- construction -----------------------------------------------------
    @classmethod
    def _from_core(cls, config: RoutingConfig, seed: dict[str, Any], r: Any) -> "RoutingStats":
        hists = {k: getattr(r, k) for k in _HISTS}
        lt = st = None
        if r.has_cost:
            lt = _TimeStats(r.layer_time.n, r.layer_time.mean, r.layer_time.m2, r.layer_time_lo, r.layer_time_hist)
            st = _TimeStats(r.step_time.n, r.step_time.mean, r.step_time.m2, r.step_time_lo, r.step_time_hist)
        w = r.layer_weights
        return cls(config, r.microbatches, [seed], hists, lt, st, w if w.size else None)

    # -- derived distributions ------------------------------------------
    @property
    def samples(self) -> int:
        """Microbatch-layer samples: microbatches * layers."""
        return self.microbatches * self.config.layers

    @property
    def gpus(self) -> int:
        return int(self.config.placement["gpus"])

    @property
    def unique(self) -> Distribution:
        """u: distinct experts touched per microbatch-layer."""
        h = self._h["unique_hist"]
        return Distribution(np.arange(h.size, dtype=np.float64), h)

    @property
    def reuse(self) -> Distribution:
        """B*k/u: token-expert assignments per touched expert."""
        h = self._h["unique_hist"]
        u = np.arange(1, h.size, dtype=np.float64)
        return Distribution(self.config.batch * self.config.top_k / u, h[1:])

    @property
    def gpu_unique_max(self) -> Distribution:
        """max over GPUs of u_g (experts touched on the straggler GPU)."""
        h = self._h["gpu_unique_max_hist"]
        return Distribution(np.arange(h.size, dtype=np.float64), h)

    @property
    def gpu_assign_max(self) -> Distribution:
        """max over GPUs of n_g (token-expert assignments on the straggler GPU)."""
        h = self._h["gpu_assign_max_hist"]
        return Distribution(np.arange(h.size, dtype=np.float64), h)

    @property
    def imbalance(self) -> Distribution:
        """max_g n_g / mean_g n_g (1 = perfectly balanced)."""
        h = self._h["gpu_assign_max_hist"]
        bk = self.config.batch * self.config.top_k
        return Distribution(np.arange(h.size, dtype=np.float64) * self.gpus / bk, h)

    @property
    def gpu_unique_mean(self) -> np.ndarray:
        """Mean u_g per GPU."""
        return self._h["gpu_unique_sum"].astype(np.float64) / self.samples

    @property
    def gpu_assign_mean(self) -> np.ndarray:
        """Mean n_g per GPU."""
        return self._h["gpu_assign_sum"].astype(np.float64) / self.samples

    @property
    def tokens_per_expert(self) -> Distribution:
        """Tokens routed to an expert in a microbatch-layer (over all experts, including 0)."""
        h = self._h["tokens_per_expert_hist"]
        return Distribution(np.arange(h.size, dtype=np.float64), h)

    @property
    def layer_time(self) -> Distribution | None:
        """Straggler layer time max_g max(a_g u_g, b_g n_g) (None without a cost)."""
        return None if self._layer_time is None else self._layer_time.distribution()

    @property
    def step_time(self) -> Distribution | None:
        """Sum of the ``layers`` layer times of one microbatch (None without a cost)."""
        return None if self._step_time is None else self._step_time.distribution()

    @property
    def target_reached(self) -> bool | None:
        """Whether ``rtol`` was reached (None for a run without ``rtol``)."""
        return None if self.precision is None else self.precision.target_reached

    @property
    def rse_mean(self) -> float | None:
        """Relative standard error of the precision statistic's mean (None without ``rtol``)."""
        return None if self.precision is None else self.precision.rse_mean

    @property
    def rse_p99(self) -> float | None:
        """Relative standard error of the precision statistic's p99 (None without ``rtol``)."""
        return None if self.precision is None else self.precision.rse_p99

    def histogram(self, name: str) -> np.ndarray:
        """A raw exact histogram (one of ``unique_hist``, ``gpu_unique_max_hist``,
        ``gpu_assign_max_hist``, ``tokens_per_expert_hist``) or per-GPU sum."""
        if name not in self._h:
            raise ValueError(f"name={name!r}: must be one of {list(self._h)}")
        return self._h[name].copy()

    # -- merging and serialisation ---------------------------------------
    def __add__(self, other: object) -> "RoutingStats":
        if not isinstance(other, RoutingStats):
            return NotImplemented
        if self.config != other.config:
            raise ValueError(
                "RoutingStats + RoutingStats: configs differ; only runs of the same experts, top_k, batch, "
                f"layers, routing, placement and cost merge ({self.config} vs {other.config})"
            )
        hists = {k: self._h[k] + other._h[k] for k in _HISTS}
        lt = st = None
        if self._layer_time is not None and other._layer_time is not None:
            lt = self._layer_time.merged(other._layer_time)
        if self._step_time is not None and other._step_time is not None:
            st = self._step_time.merged(other._step_time)
        same_w = (self.layer_weights is not None and other.layer_weights is not None
                  and np.array_equal(self.layer_weights, other.layer_weights))
        return RoutingStats(self.config, self.microbatches + other.microbatches, self.seed + other.seed, hists,
                            lt, st, self.layer_weights if same_w else None)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly record (format name and version included)."""
        d: dict[str, Any] = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "microbatches": self.microbatches,
            "seed": _plain(self.seed),
        }
        for k in _HISTS:
            d[k] = self._h[k].tolist()
        d["layer_time"] = None if self._layer_time is None else self._layer_time.to_dict()
        d["step_time"] = None if self._step_time is None else self._step_time.to_dict()
        d["layer_weights"] = None if self.layer_weights is None else self.layer_weights.tolist()
        d["precision"] = None if self.precision is None else self.precision.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RoutingStats":
        """Rebuild from :meth:`to_dict` output (refuses other formats/versions)."""
        if d.get("format") != FORMAT:
            raise ValueError(f"format={d.get('format')!r}: not a {FORMAT} record")
        if d.get("version") != FORMAT_VERSION:
            raise ValueError(f"version={d.get('version')!r}: this qsengine reads version {FORMAT_VERSION}")
        c = d["config"]
        config = RoutingConfig(c["experts"], c["top_k"], c["batch"], c["layers"], c["routing"], c["placement"],
                               c["cost"])
        lt = None if d.get("layer_time") is None else _TimeStats.from_dict(d["layer_time"])
        st = None if d.get("step_time") is None else _TimeStats.from_dict(d["step_time"])
        w = d.get("layer_weights")
        out = cls(config, d["microbatches"], list(d["seed"]), {k: np.asarray(d[k], dtype=np.uint64) for k in _HISTS},
                  lt, st, None if w is None else np.asarray(w, dtype=np.float64))
        p = d.get("precision")  # absent in records written before precision-targeted runs
        out.precision = None if p is None else RoutingPrecision(**p)
        return out

    # -- presentation -------------------------------------------------------
    def summary(self) -> str:
        """A readable table of the main statistics."""
        rows = [("unique experts u", self.unique), ("reuse B*k/u", self.reuse),
                ("straggler u_g", self.gpu_unique_max), ("straggler n_g", self.gpu_assign_max),
                ("imbalance max/mean n_g", self.imbalance)]
        if self.layer_time is not None:
            rows += [("layer time [s]", self.layer_time), ("step time [s]", self.step_time)]  # type: ignore[list-item]
        c = self.config
        head = (f"routing {c.routing.get('kind')}: experts={c.experts} top_k={c.top_k} batch={c.batch} "
                f"layers={c.layers} gpus={self.gpus} microbatches={self.microbatches}")
        lines = [head, f"{'quantity':<24}{'mean':>12}{'std':>12}{'sem':>12}{'p50':>12}{'p90':>12}{'p99':>12}"]
        for name, dist in rows:
            lines.append(f"{name:<24}{dist.mean:>12.5g}{dist.std:>12.5g}{dist.sem:>12.3g}"
                         f"{dist.p50:>12.5g}{dist.p90:>12.5g}{dist.p99:>12.5g}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        """Notebook view: the configuration and the statistics as an HTML table."""
        from qsengine._html import routing_html

        return routing_html(self)

    def __repr__(self) -> str:
        c = self.config
        return (f"RoutingStats(experts={c.experts}, top_k={c.top_k}, batch={c.batch}, layers={c.layers}, "
                f"routing={c.routing.get('kind')!r}, gpus={self.gpus}, microbatches={self.microbatches}, "
                f"unique.mean={self.unique.mean:.6g})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RoutingStats):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]
