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

from __future__ import annotations

import hashlib
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import numpy as np

from qsengine import _core
from qsengine._core import ResourceLimitError
from qsengine._limits import get_memory_limit, get_work_limit
from qsengine._seed import SeedLike, as_seed_sequence, philox_key, seed_record

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
]

FORMAT = "qsengine.RoutingStats"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------


def _int(name: str, value: object, *, minimum: int = 1) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r} (type {type(value).__name__}): must be an int")
    v = int(value)
    if v < minimum:
        raise ValueError(f"{name}={v}: must be >= {minimum}")
    return v


def _float(name: str, value: object) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r} (type {type(value).__name__}): must be a real number")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name}={v}: must be finite")
    return v


def _check_npy_header(fh: Any, where: str, limit: int) -> None:
    """Read a .npy header (no data) and refuse arrays above ``limit`` bytes."""
    from qsengine.errors import ResourceLimitError

    fmt = np.lib.format
    version = fmt.read_magic(fh)
    if version == (1, 0):
        shape, _, dtype = fmt.read_array_header_1_0(fh)
    else:  # 2.0; 3.0 differs only in the header's text encoding (utf-8 vs latin-1)
        shape, _, dtype = fmt.read_array_header_2_0(fh)
    if dtype.hasobject:
        raise ValueError(f"{where}: holds Python objects (pickled data is never loaded)")
    count = 1
    for n in shape:
        count *= int(n)
    need = count * dtype.itemsize
    if need > limit:
        raise ResourceLimitError(f"{where}: header declares shape {shape} of {dtype} = {need} bytes, above the "
                                 f"limit {limit}")



def _float_vector(name: str, value: object) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name}={value!r}: must be a sequence of numbers")
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: must be a sequence of real numbers, got {type(value).__name__}") from None
    if arr.ndim != 1:
        raise ValueError(f"{name}: must be 1-D, got shape {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr) | (arr < 0))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{name}[{i}]={arr[i]}: weights must be finite and >= 0")
    return tuple(float(x) for x in arr)


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


# ---------------------------------------------------------------------------
# placement and cost
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Placement of experts on the ``gpus`` GPUs of an expert-parallel group.

    ``kind``: ``contiguous`` (expert e on GPU e*gpus//experts), ``round_robin``
    (e mod gpus) or ``explicit`` (``expert_map[e]``). ``replicas`` adds extra
    copies as (expert, gpu) pairs. Token-split policy for an expert with r
    replicas (primary first, then extras in the order given): the assignment
    of token t (its index in the microbatch) goes to replica t mod r.
    """

    gpus: int
    kind: Literal["contiguous", "round_robin", "explicit"] = "contiguous"
    expert_map: tuple[int, ...] | None = None
    replicas: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "gpus", _int("placement.gpus", self.gpus))
        if self.kind not in ("contiguous", "round_robin", "explicit"):
            raise ValueError(f"placement.kind={self.kind!r}: must be contiguous, round_robin or explicit")
        if self.kind == "explicit":
            if self.expert_map is None:
                raise ValueError("placement.expert_map: required for an explicit placement")
            m = tuple(_int(f"placement.expert_map[{i}]", g, minimum=0) for i, g in enumerate(self.expert_map))
            for i, g in enumerate(m):
                if g >= self.gpus:
                    raise ValueError(f"placement.expert_map[{i}]={g}: GPU ids must be < gpus={self.gpus}")
            object.__setattr__(self, "expert_map", m)
        reps = []
        for pair in self.replicas:
            e, g = pair
            e = _int("placement.replicas expert", e, minimum=0)
            g = _int("placement.replicas gpu", g, minimum=0)
            if g >= self.gpus:
                raise ValueError(f"placement.replicas: expert {e} on GPU {g}, GPU ids must be < gpus={self.gpus}")
            reps.append((e, g))
        object.__setattr__(self, "replicas", tuple(reps))

    @classmethod
    def contiguous(cls, gpus: int) -> "Placement":
        """Experts split into ``gpus`` contiguous ranges (expert e on GPU e*gpus//experts)."""
        return cls(gpus, "contiguous")

    @classmethod
    def round_robin(cls, gpus: int) -> "Placement":
        """Expert e on GPU e mod gpus."""
        return cls(gpus, "round_robin")

    @classmethod
    def explicit(cls, expert_map: Sequence[int], gpus: int | None = None) -> "Placement":
        """Expert e on GPU ``expert_map[e]``; ``gpus`` defaults to max(map)+1."""
        if isinstance(expert_map, (str, bytes)) or not hasattr(expert_map, "__iter__"):
            raise TypeError(f"placement.expert_map={expert_map!r}: must be a sequence of GPU ids (ints), "
                            f"got {type(expert_map).__name__}")
        m = tuple(expert_map)
        for i, g in enumerate(m):
            if isinstance(g, bool) or not isinstance(g, (int, np.integer)):
                raise TypeError(f"placement.expert_map[{i}]={g!r}: must be an int GPU id, got {type(g).__name__}")
        m = tuple(int(g) for g in m)
        if gpus is None:
            gpus = (max(m) + 1) if m else 1
        return cls(gpus, "explicit", m)

    def with_replicas(self, replicas: Mapping[int, Sequence[int]]) -> "Placement":
        """Add replicas: ``{expert: [gpu, ...]}`` (extra copies beside the primary)."""
        extra = tuple((int(e), int(g)) for e, gs in replicas.items() for g in gs)
        return Placement(self.gpus, self.kind, self.expert_map, self.replicas + extra)

    def expert_gpus(self, experts: int) -> list[list[int]]:
        """For each expert, the GPUs of its replicas (primary first)."""
        if self.kind == "contiguous":
            out = [[e * self.gpus // experts] for e in range(experts)]
        elif self.kind == "round_robin":
            out = [[e % self.gpus] for e in range(experts)]
        else:
            assert self.expert_map is not None
            if len(self.expert_map) != experts:
                raise ValueError(
                    f"placement.expert_map: has {len(self.expert_map)} entries, must place every one of experts={experts}"
                )
            out = [[g] for g in self.expert_map]
        for e, g in self.replicas:
            if e >= experts:
                raise ValueError(f"placement.replicas: expert {e} does not exist (experts={experts})")
            if g in out[e]:
                raise ValueError(f"placement.replicas: expert {e} already has a replica on GPU {g}")
            out[e].append(g)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"gpus": self.gpus, "kind": self.kind,
                "expert_map": None if self.expert_map is None else list(self.expert_map),
                "replicas": [list(p) for p in self.replicas]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Placement":
        m = d.get("expert_map")
        return cls(d["gpus"], d["kind"], None if m is None else tuple(m), tuple(tuple(p) for p in d.get("replicas", ())))


@dataclass(frozen=True)
class LayerCost:
    """Straggler cost of one MoE layer: GPU g takes max(a_g*u_g, b_g*n_g) seconds.

    ``a``: seconds per touched expert (reading its weights); ``b``: seconds per
    token-expert assignment. Scalars apply to every GPU; sequences give one
    value per GPU. The layer time is the max over GPUs, the step time the sum
    over the ``layers`` layers of a microbatch.
    """

    a: float | tuple[float, ...]
    b: float | tuple[float, ...]

    def __post_init__(self) -> None:
        for name in ("a", "b"):
            v = getattr(self, name)
            if isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)):
                f = _float(f"cost.{name}", v)
                if f <= 0:
                    raise ValueError(f"cost.{name}={f}: must be > 0 (seconds)")
                object.__setattr__(self, name, f)
            else:
                vec = _float_vector(f"cost.{name}", v)
                for i, x in enumerate(vec):
                    if x <= 0:
                        raise ValueError(f"cost.{name}[{i}]={x}: must be > 0 (seconds)")
                object.__setattr__(self, name, vec)

    def per_gpu(self, gpus: int) -> tuple[np.ndarray, np.ndarray]:
        out = []
        for name in ("a", "b"):
            v = getattr(self, name)
            arr = np.full(gpus, v, dtype=np.float64) if isinstance(v, float) else np.asarray(v, dtype=np.float64)
            if arr.shape != (gpus,):
                raise ValueError(f"cost.{name}: has {arr.size} values, must have one per GPU (gpus={gpus})")
            out.append(arr)
        return out[0], out[1]

    def to_dict(self) -> dict[str, Any]:
        return {k: (v if isinstance(v, float) else list(v)) for k, v in (("a", self.a), ("b", self.b))}


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


# ---------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------


#: Bytes per expert of the placement lists (a Python list of GPU ids, then the
#: core's vector of them): an over-estimate used to refuse huge expert counts.
_PLACEMENT_BYTES_PER_EXPERT = 128


def _prepare(experts: object, top_k: object, batch: object, microbatches: object, routing: object,
             placement: object, threads: object, layers: object,
             cost: object) -> tuple[_core.RouteRequest, RoutingConfig, int]:
    """Checks the arguments and builds the core's request, the run's config and the thread count."""
    E = _int("experts", experts)
    k = _int("top_k", top_k)
    B = _int("batch", batch)
    L = _int("layers", layers)
    model = parse_routing(routing)  # type: ignore[arg-type]
    if microbatches is None:
        if not isinstance(model, Trace):
            raise TypeError("microbatches=None: only allowed with a Trace (it then means steps // layers)")
        mb = model.expert_ids.shape[0] // L
        if mb < 1:
            raise ValueError(f"layers={L}: the trace has only {model.expert_ids.shape[0]} steps")
    else:
        mb = _int("microbatches", microbatches)
    if threads is None:
        nthreads = 0
    else:
        nthreads = _int("threads", threads)
    if placement is None:
        placement = Placement.contiguous(1)
    if isinstance(placement, (int, np.integer)) and not isinstance(placement, bool):
        placement = Placement.contiguous(int(placement))
    if not isinstance(placement, Placement):
        raise TypeError(f"placement={placement!r}: must be a qsengine.Placement, an int (contiguous GPUs) or None")
    if k > E:
        raise ValueError(f"top_k={k}: must be <= experts={E} (each token picks top_k distinct experts)")
    # The core's own bounds, checked here first: Python ints are exact, while
    # the core's message for batch*top_k overflowed int64 (UBSan) and the
    # placement below is built before the core sees experts.
    if E > 1 << 24:
        raise ValueError(f"experts={E}: must be between 1 and 16777216")
    if B * k >= 1 << 31:
        raise ValueError(f"batch={B}: batch*top_k={B * k} must be < 2^31")
    # The per-expert placement lists are built here, in Python, before the
    # core's own estimate runs: refuse a huge expert count before building them.
    need = E * _PLACEMENT_BYTES_PER_EXPERT
    if need > get_memory_limit():
        from qsengine.errors import ResourceLimitError

        raise ResourceLimitError(
            f"experts={E}: the expert placement alone would need about {need} bytes, above the memory limit of "
            f"{get_memory_limit()} bytes (qsengine.set_memory_limit or QSENGINE_MAX_MEMORY)")
    expert_gpus = placement.expert_gpus(E)
    cost_a = cost_b = None
    if cost is not None:
        if isinstance(cost, tuple) and len(cost) == 2:
            cost = LayerCost(*cost)
        if not isinstance(cost, LayerCost):
            raise TypeError(f"cost={cost!r}: must be a qsengine.LayerCost(a, b), an (a, b) tuple or None")
        cost_a, cost_b = cost.per_gpu(placement.gpus)

    req = _core.RouteRequest()
    req.experts, req.top_k, req.batch, req.microbatches, req.layers = E, k, B, mb, L
    req.placement.gpus = placement.gpus
    req.placement.expert_gpus = expert_gpus
    if cost_a is not None and cost_b is not None:
        req.cost.a, req.cost.b = cost_a, cost_b
        req.cost.enabled = True
    req.memory_limit = get_memory_limit()
    spec = req.model
    base: RoutingModel = model
    if isinstance(model, GroupLimited):
        spec.kind = _core.ModelKind.GroupLimited
        spec.groups, spec.top_groups = model.groups, model.top_groups
        base = model.base
    elif isinstance(model, Sticky):
        spec.kind = _core.ModelKind.Sticky
        spec.rho = model.rho
        base = model.base
    elif isinstance(model, Trace):
        spec.kind = _core.ModelKind.Trace
        spec.trace = model.expert_ids
        base = Uniform()
    else:
        spec.kind = _core.ModelKind.Independent
    w = spec.base
    if isinstance(base, PowerLaw):
        w.kind = _core.WeightKind.PowerLaw
        w.alpha = base.alpha
        w.ranks = _core.RankOrder.PerLayer if base.ranks == "per_layer" else _core.RankOrder.Fixed
    elif isinstance(base, Popularity):
        w.kind = _core.WeightKind.Popularity
        w.weights = np.asarray(base.weights, dtype=np.float64)
    elif isinstance(base, Dirichlet):
        w.kind = _core.WeightKind.Dirichlet
        w.concentration = np.atleast_1d(np.asarray(base.concentration, dtype=np.float64))
    else:
        w.kind = _core.WeightKind.Uniform
    config = RoutingConfig(E, k, B, L, model.to_dict(), placement.to_dict(),
                           None if cost is None else cost.to_dict())  # type: ignore[union-attr]
    return req, config, nthreads


def _rtol(value: object) -> float:
    """The precision target as the core takes it (0.0: off)."""
    if value is None:
        return 0.0
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"rtol={value!r} (type {type(value).__name__}): must be a real number in (0, 1) or None")
    v = float(value)
    if not (0.0 < v < 1.0):  # also refuses nan
        raise ValueError(f"rtol={v}: must be in (0, 1) (a relative standard error), or None to run all microbatches")
    return v


def route(experts: int, top_k: int, batch: int, microbatches: int | None, routing: RoutingModel | str = "uniform",
          placement: Placement | int | None = None, seed: SeedLike = None, threads: int | None = None,
          layers: int = 1, cost: LayerCost | tuple[Any, Any] | None = None, *,
          rtol: float | None = None) -> RoutingStats:
    """Simulate routing of ``microbatches`` decode microbatches through ``layers`` MoE layers.

    Args:
        experts: routed experts E per layer.
        top_k: experts per token k (distinct, exact Plackett-Luce).
        batch: tokens B per microbatch.
        microbatches: number of microbatches (None only for a Trace); with
            ``rtol``, the maximum.
        routing: a model (:class:`Uniform`, :class:`PowerLaw`, ...) or a string
            (see :func:`parse_routing`).
        placement: a :class:`Placement`, an int (contiguous over that many
            GPUs) or None (one GPU).
        seed: None, a non-negative int or a numpy SeedSequence; the entropy
            used is recorded in ``stats.seed``.
        threads: worker threads (None: all hardware threads). Results do not
            depend on it.
        layers: MoE layers each microbatch passes through.
        cost: optional :class:`LayerCost` for straggler layer/step times.
        rtol: optional precision target in (0, 1). The run stops at the first
            checkpoint where the relative standard errors of both the mean and
            the p99 of the *precision statistic* are <= rtol: the step time when
            ``cost`` is given, else the straggler assignment count
            ``gpu_assign_max`` (max over GPUs of n_g, per microbatch-layer).
            Standard errors by sectioning over whole work blocks (batch means
            for the mean; Asmussen & Glynn, *Stochastic Simulation*, 2007,
            III.5a), honest when routing is correlated within a block (Sticky).
            Checkpoints fall on a fixed schedule of whole blocks and the
            statistics are reduced in block order, so where the run stops does
            not depend on ``threads``. See :attr:`RoutingStats.precision`.
            Not available with a :class:`Trace`.

    Returns:
        :class:`RoutingStats`. Raises ValueError/TypeError naming a bad
        argument, :class:`qsengine.ResourceLimitError` above the memory limit
        or above the work limit (:func:`qsengine.set_work_limit`: at most
        1e12 token-expert assignments per call by default), KeyboardInterrupt
        on Ctrl-C.
    """
    target = _rtol(rtol)
    req, config, nthreads = _prepare(experts, top_k, batch, microbatches, routing, placement, threads, layers, cost)
    work = req.microbatches * req.layers * req.batch * req.top_k
    if work > get_work_limit():
        raise ResourceLimitError(
            f"microbatches={req.microbatches}: {work:.3g} token-expert assignments "
            f"(microbatches x layers x batch x top_k) exceed the work limit {get_work_limit():.3g}; "
            "use fewer microbatches or raise it with qsengine.set_work_limit / QSENGINE_MAX_ASSIGNMENTS")
    seq = as_seed_sequence(seed)
    req.key = philox_key(seq)
    req.rtol = target
    raw = _core.route(req, nthreads)
    stats = RoutingStats._from_core(config, seed_record(seq), raw)
    if target > 0.0:
        stats.precision = RoutingPrecision(
            rtol=target, statistic="step_time" if cost is not None else "gpu_assign_max",
            max_microbatches=int(req.microbatches), target_reached=bool(raw.target_reached),
            rse_mean=float(raw.rse_mean), rse_p99=float(raw.rse_p99), sections=int(raw.precision_sections),
            checkpoints=int(raw.checkpoints))
    return stats


def sample_routing(experts: int, top_k: int, batch: int, microbatches: int | None,
                   routing: RoutingModel | str = "uniform", seed: SeedLike = None, layers: int = 1,
                   threads: int | None = None) -> np.ndarray:
    """The raw selections of the same engine and streams as :func:`route`:
    an int32 array [microbatches, layers, batch, top_k]. For tests and small
    runs (bounded by the memory limit)."""
    req, _, nthreads = _prepare(experts, top_k, batch, microbatches, routing, None, threads, layers, None)
    seq = as_seed_sequence(seed)
    req.key = philox_key(seq)
    req.record = True
    raw = _core.route(req, nthreads)
    return np.asarray(raw.selections)
