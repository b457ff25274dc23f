"""Routing models (laws): how tokens pick their experts, parsed from objects or strings;
the independent popularity the closed form uses, and the proxy that ranks plans."""

from __future__ import annotations

import hashlib
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import numpy as np

from qsengine._limits import get_memory_limit
from qsengine.routing._checks import _check_npy_header, _float, _float_vector, _int


# ---------------------------------------------------------------------------
# routing models
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Uniform:
    """Every expert equally likely."""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "uniform"}


@dataclass(frozen=True)
class PowerLaw:
    """Expert of popularity rank r (1-based) has weight r**-alpha.

    ``ranks="fixed"``: expert i holds rank i+1 in every layer.
    ``ranks="per_layer"``: each layer draws a uniformly random rank
    permutation from the seed (the same for every microbatch of the run).
    """

    alpha: float = 1.0
    ranks: Literal["fixed", "per_layer"] = "fixed"

    def __post_init__(self) -> None:
        a = _float("routing.alpha", self.alpha)
        if a < 0:
            raise ValueError(f"routing.alpha={a}: must be >= 0")
        object.__setattr__(self, "alpha", a)
        if self.ranks not in ("fixed", "per_layer"):
            raise ValueError(f"routing.ranks={self.ranks!r}: must be 'fixed' or 'per_layer'")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "powerlaw", "alpha": self.alpha, "ranks": self.ranks}


@dataclass(frozen=True)
class Popularity:
    """Explicit per-expert weights (any scale; at least top_k must be positive)."""

    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        w = _float_vector("routing.weights", self.weights)
        if len(w) == 0 or not any(x > 0 for x in w):
            raise ValueError("routing.weights: all weights are zero; at least top_k must be positive")
        # The core normalises w / sum(w): a sum that overflows would silently
        # give NaN tables. (A positive weight that underflows after it is kept
        # drawable by the core, which floors it: see routing.h.)
        total = sum(w)
        if not math.isfinite(total):
            raise ValueError(f"routing.weights: the sum of the weights overflows ({total}); rescale them")
        object.__setattr__(self, "weights", w)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "popularity", "weights": list(self.weights)}


@dataclass(frozen=True)
class Dirichlet:
    """A popularity vector drawn per layer from Dirichlet(concentration).

    ``concentration`` is a scalar (symmetric) or one value per expert. Each
    layer index has its own draw, the same across the microbatches of a run.
    """

    concentration: float | tuple[float, ...] = 1.0

    def __post_init__(self) -> None:
        c = self.concentration
        if isinstance(c, numbers.Real) and not isinstance(c, (bool, np.bool_)):
            v = _float("routing.concentration", c)
            if v <= 0:
                raise ValueError(f"routing.concentration={v}: must be > 0")
            object.__setattr__(self, "concentration", v)
        else:
            vec = _float_vector("routing.concentration", c)
            for i, x in enumerate(vec):
                if x <= 0:
                    raise ValueError(f"routing.concentration[{i}]={x}: must be > 0")
            object.__setattr__(self, "concentration", vec)

    def to_dict(self) -> dict[str, Any]:
        c = self.concentration
        return {"kind": "dirichlet", "concentration": c if isinstance(c, float) else list(c)}


BaseModel = Union[Uniform, PowerLaw, Popularity, Dirichlet]


@dataclass(frozen=True)
class GroupLimited:
    """DeepSeek-V3-style group-limited routing.

    Experts form ``groups`` contiguous groups of ``experts/groups``. Each token
    draws ``top_groups`` distinct groups Plackett-Luce with group weight = sum
    of its experts' ``base`` weights, then ``top_k`` experts Plackett-Luce from
    ``base`` restricted to the union of those groups.
    """

    groups: int
    top_groups: int
    base: BaseModel = field(default_factory=Uniform)

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", _int("routing.groups", self.groups))
        object.__setattr__(self, "top_groups", _int("routing.top_groups", self.top_groups))
        if self.top_groups > self.groups:
            raise ValueError(f"routing.top_groups={self.top_groups}: must be <= groups={self.groups}")
        if not isinstance(self.base, (Uniform, PowerLaw, Popularity, Dirichlet)):
            raise TypeError(f"routing.base={self.base!r}: must be Uniform, PowerLaw, Popularity or Dirichlet")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "group_limited", "groups": self.groups, "top_groups": self.top_groups,
                "base": self.base.to_dict()}


@dataclass(frozen=True)
class Sticky:
    """Temporally correlated routing of the same ``batch`` sequences.

    At each decode step (microbatch) and layer, a token keeps each of its
    previous step's experts independently with probability ``rho``; the rest
    are redrawn Plackett-Luce from ``base`` excluding the kept ones. Each work
    block of the engine (>= 256 microbatches) starts a fresh chain from a base
    draw.
    """

    rho: float
    base: BaseModel = field(default_factory=Uniform)

    def __post_init__(self) -> None:
        r = _float("routing.rho", self.rho)
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"routing.rho={r}: must be in [0, 1]")
        object.__setattr__(self, "rho", r)
        if not isinstance(self.base, (Uniform, PowerLaw, Popularity, Dirichlet)):
            raise TypeError(f"routing.base={self.base!r}: must be Uniform, PowerLaw, Popularity or Dirichlet")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "sticky", "rho": self.rho, "base": self.base.to_dict()}


@dataclass(frozen=True, eq=False)
class Trace:
    """Replay of recorded routing: integer ``expert_ids[steps, tokens, k]``.

    Microbatch m, layer l replays step ``m*layers + l`` exactly; ``batch`` must
    equal ``tokens`` and ``top_k`` must equal ``k``. ``microbatches=None`` in
    :func:`route` means ``steps // layers``.
    """

    expert_ids: np.ndarray

    def __post_init__(self) -> None:
        ids = self.expert_ids
        if not isinstance(ids, np.ndarray):
            try:
                ids = np.asarray(ids)
            except (TypeError, ValueError):
                raise TypeError("routing.expert_ids: must be an integer array [steps, tokens, k]") from None
        if ids.dtype.kind not in "iu":
            raise TypeError(f"routing.expert_ids: dtype {ids.dtype} must be an integer type")
        if ids.ndim != 3:
            raise ValueError(f"routing.expert_ids: shape {ids.shape} must be [steps, tokens, k] (3-D)")
        if min(ids.shape) < 1:
            raise ValueError(f"routing.expert_ids: shape {ids.shape} has an empty dimension")
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        ids.setflags(write=False)
        object.__setattr__(self, "expert_ids", ids)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, key: str | None = None, max_bytes: int | None = None) -> "Trace":
        """Load ids from ``.npy`` or ``.npz`` (no pickles). ``key`` picks an
        array of an ``.npz`` (default: ``expert_ids`` or its only array).
        Files larger than ``max_bytes`` (default: the memory limit) are refused."""
        from qsengine.errors import ResourceLimitError

        import tokenize
        import zipfile
        import zlib

        limit = get_memory_limit() if max_bytes is None else int(max_bytes)
        where = f"Trace.load({os.fspath(path)!r})"
        try:
            size = os.path.getsize(path)
        except OSError as exc:
            raise ValueError(f"{where}: cannot read the file ({exc.strerror or exc})") from None
        if size > limit:
            raise ResourceLimitError(f"{where}: file has {size} bytes, above the limit {limit}")
        # Only numpy's own parser runs (allow_pickle=False: no object arrays,
        # no code). The header's shape is checked against the limit before the
        # data is read (a 100-byte file can claim 10^11 elements). A truncated
        # or corrupted file, or a zip member that fails its CRC, is reported as
        # a ValueError naming the file.
        try:
            with open(path, "rb") as fh:
                magic = fh.read(6)
            if magic == b"\x93NUMPY":
                with open(path, "rb") as fh:
                    _check_npy_header(fh, where, limit)
            loaded = np.load(path, allow_pickle=False)
            if isinstance(loaded, np.ndarray):
                arr = loaded
            else:
                with loaded as data:
                    names = list(data.keys())
                    if key is None:
                        key = "expert_ids" if "expert_ids" in names else (names[0] if len(names) == 1 else None)
                    if key is None or key not in names:
                        raise ValueError(f"{where}: key={key!r}: pick one of {names}")
                    member = f"{key}.npy"
                    if member not in data.zip.namelist():
                        raise ValueError(f"{where}: member {key!r} is not a .npy array")
                    # a compressed member may inflate far beyond the file size
                    inflated = data.zip.getinfo(member).file_size
                    if inflated > limit:
                        raise ResourceLimitError(f"{where}: array {key!r} inflates to {inflated} bytes, above the "
                                                 f"limit {limit}")
                    with data.zip.open(member) as fh:
                        _check_npy_header(fh, f"{where}[{key!r}]", limit)
                    arr = data[key]
        except ValueError as exc:
            if str(exc).startswith(where):
                raise
            raise ValueError(f"{where}: not a readable .npy/.npz integer array ({exc})") from None
        except MemoryError:
            raise ResourceLimitError(f"{where}: the array does not fit in memory") from None
        except (OSError, EOFError, SyntaxError, zipfile.BadZipFile, zlib.error, KeyError, NotImplementedError,
                tokenize.TokenError) as exc:
            raise ValueError(f"{where}: corrupted or truncated .npy/.npz file ({type(exc).__name__}: {exc})") from None
        if not isinstance(arr, np.ndarray):
            raise ValueError(f"{where}: does not hold a numpy array")
        if arr.nbytes > limit:
            raise ResourceLimitError(f"{where}: array has {arr.nbytes} bytes, above the limit {limit}")
        try:
            return cls(np.asarray(arr))
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{where}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        digest = hashlib.sha256(self.expert_ids.tobytes()).hexdigest()
        return {"kind": "trace", "shape": list(self.expert_ids.shape), "sha256": digest}


RoutingModel = Union[Uniform, PowerLaw, Popularity, Dirichlet, GroupLimited, Sticky, Trace]
_MODEL_TYPES = (Uniform, PowerLaw, Popularity, Dirichlet, GroupLimited, Sticky, Trace)


def parse_routing(spec: str | RoutingModel) -> RoutingModel:
    """Parse a routing string (or pass a model through).

    Forms: ``uniform``; ``powerlaw:ALPHA[:per_layer]``; ``dirichlet:C``;
    ``group:GROUPS:TOP_GROUPS[:BASE...]`` (e.g. ``group:8:4:powerlaw:1.01``);
    ``sticky:RHO[:BASE...]``; ``trace:PATH`` (.npy/.npz).
    """
    if isinstance(spec, _MODEL_TYPES):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"routing={spec!r}: must be a routing model (Uniform, PowerLaw, ...) or a string like 'powerlaw:1.0'")
    parts = spec.strip().split(":")
    kind = parts[0].lower().replace("-", "_")
    try:
        if kind == "uniform" and len(parts) == 1:
            return Uniform()
        if kind in ("powerlaw", "power_law") and len(parts) in (2, 3):
            return PowerLaw(float(parts[1]), parts[2] if len(parts) == 3 else "fixed")  # type: ignore[arg-type]
        if kind == "dirichlet" and len(parts) == 2:
            return Dirichlet(float(parts[1]))
        if kind in ("group", "group_limited", "grouplimited") and len(parts) >= 3:
            base = parse_routing(":".join(parts[3:])) if len(parts) > 3 else Uniform()
            return GroupLimited(int(parts[1]), int(parts[2]), base)  # type: ignore[arg-type]
        if kind == "sticky" and len(parts) >= 2:
            base = parse_routing(":".join(parts[2:])) if len(parts) > 2 else Uniform()
            return Sticky(float(parts[1]), base)  # type: ignore[arg-type]
        if kind == "trace" and len(parts) >= 2:
            return Trace.load(":".join(parts[1:]))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"routing={spec!r}: {exc}") from None
    raise ValueError(
        f"routing={spec!r}: unknown form; use uniform, powerlaw:ALPHA[:per_layer], dirichlet:C, "
        "group:GROUPS:TOP_GROUPS[:BASE], sticky:RHO[:BASE] or trace:PATH"
    )


def independent_popularity(routing: RoutingModel | str, experts: int) -> np.ndarray | None:
    """Per-expert weights of an *independent* routing model, for the closed form.

    Tokens route independently with fixed weights under ``Uniform`` (returns
    None), ``PowerLaw(alpha, ranks="fixed")`` (expert i has weight (i+1)^-alpha)
    and ``Popularity``. Any other model (per-layer ranks, Dirichlet,
    GroupLimited, Sticky, Trace) has no closed form: ValueError.
    """
    model = parse_routing(routing)
    if isinstance(model, Uniform):
        return None
    if isinstance(model, PowerLaw) and model.ranks == "fixed":
        return np.arange(1, experts + 1, dtype=float) ** -model.alpha
    if isinstance(model, Popularity):
        if len(model.weights) != experts:
            raise ValueError(f"routing.weights: has {len(model.weights)} values, the model has {experts} experts")
        return np.asarray(model.weights, dtype=float)
    raise ValueError(
        f"routing={model!r}: has no closed form (tokens are not routed independently with fixed weights); "
        "use the Monte Carlo (microbatches > 0)"
    )


def proxy_popularity(routing: RoutingModel | str, experts: int) -> np.ndarray | None:
    """Weights of the closest independent model, used only to *rank* plans
    before the Monte Carlo runs: the model itself when independent, the base
    model for GroupLimited and Sticky, uniform for models whose popularity is
    random per layer (Dirichlet, per-layer ranks), and the recorded expert
    frequencies for a Trace."""
    model = parse_routing(routing)
    if isinstance(model, (GroupLimited, Sticky)):
        return proxy_popularity(model.base, experts)
    if isinstance(model, Trace):
        counts = np.bincount(np.asarray(model.expert_ids).ravel(), minlength=experts)[:experts].astype(float)
        return counts if counts.sum() > 0 else None
    try:
        return independent_popularity(model, experts)
    except ValueError:
        return None


def _model_from_dict(d: Mapping[str, Any]) -> RoutingModel | dict[str, Any]:
    kind = d.get("kind")
    if kind == "uniform":
        return Uniform()
    if kind == "powerlaw":
        return PowerLaw(d["alpha"], d.get("ranks", "fixed"))
    if kind == "popularity":
        return Popularity(tuple(d["weights"]))
    if kind == "dirichlet":
        c = d["concentration"]
        return Dirichlet(c if isinstance(c, (int, float)) else tuple(c))
    if kind == "group_limited":
        return GroupLimited(d["groups"], d["top_groups"], _model_from_dict(d["base"]))  # type: ignore[arg-type]
    if kind == "sticky":
        return Sticky(d["rho"], _model_from_dict(d["base"]))  # type: ignore[arg-type]
    if kind == "trace":
        return dict(d)  # the ids are not stored; keep the fingerprint
    raise ValueError(f"routing: unknown kind {kind!r} in serialised stats")
