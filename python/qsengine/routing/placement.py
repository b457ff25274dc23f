"""Where experts live (placement, replicas) and what a GPU's routed experts cost (LayerCost)."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from qsengine.routing._checks import _float, _float_vector, _int


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
