"""A sweep's grid: expanded and validated before any work (the points' one
:class:`~qsengine.decode.point.Validator`), held column-wise, and each point
identified by its content (:func:`point_id`) and seeded from it
(:func:`point_seed`)."""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qsengine._groups import factorize, group
from qsengine.decode.point import FIELDS as POINT_FIELDS
from qsengine.decode.point import Validator, Value

__all__ = ["FIELDS", "point_id", "point_seed"]

#: Grid fields, their defaults (those of :func:`qsengine.simulate`); ``...`` = required.
FIELDS: dict[str, Any] = POINT_FIELDS


def point_id(text: str) -> str:
    """The stable id of a point: 32 hex digits of SHA-256 of its canonical JSON ``text``."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def point_seed(root: np.random.SeedSequence, pid: str) -> np.random.SeedSequence:
    """The seed of point ``pid`` under the sweep seed ``root``: the root's
    entropy, with the point id's four 32-bit words appended to its spawn key."""
    words = tuple(int(pid[i:i + 8], 16) for i in range(0, 32, 8))
    return np.random.SeedSequence(root.entropy, spawn_key=tuple(root.spawn_key) + words)


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------


def _err(field: str, value: Any, rule: str, exc: type[Exception] = ValueError) -> Exception:
    return exc(f"grid: field {field!r} = {value!r}: {rule}")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


@dataclass
class _Points:
    """The validated grid, column-wise: per field its distinct values and the
    value code of every grid position; the point id of every position; the
    unique points (first occurrence of each id, in grid order)."""

    values: dict[str, list[Value]]  # field -> distinct validated values
    codes: dict[str, np.ndarray]  # field -> value code per grid position
    ids: list[str]  # point id per grid position
    unique: np.ndarray  # grid position of each unique point (grid order)
    unique_of: np.ndarray  # per grid position: its unique point's index
    grid_hash: str

    @property
    def unique_ids(self) -> list[str]:
        return [self.ids[i] for i in self.unique.tolist()]

    def kwargs(self, pos: int) -> dict[str, Any]:
        return {k: self.values[k][int(c[pos])].arg for k, c in self.codes.items()}

    def arg_columns(self, positions: np.ndarray) -> dict[str, tuple[list[Any], np.ndarray]]:
        """The points at ``positions`` as fast-path columns (simulate's arguments)."""
        return {k: ([v.arg for v in self.values[k]], c[positions]) for k, c in self.codes.items()}


def _as_values(field: str, v: Any) -> list[Any]:
    if isinstance(v, (list, tuple, range, np.ndarray)):
        vals = list(v.tolist() if isinstance(v, np.ndarray) else v)
        if not vals:
            raise ValueError(f"grid: field {field!r} = {v!r}: empty list (give at least one value)")
        return vals
    if isinstance(v, (set, frozenset, Mapping)) or hasattr(v, "__next__"):
        raise _err(field, v, f"must be a list of values (order matters), got {type(v).__name__}", TypeError)
    return [v]  # a scalar is a one-value axis


def _check_fields(keys, where: str) -> None:
    from qsengine.specs._validate import did_you_mean

    for k in keys:
        if not isinstance(k, str):
            raise TypeError(f"{where}: field names must be strings, got {k!r}")
        if k not in FIELDS:
            hint = did_you_mean(k, FIELDS)
            extra = " (the seed is the sweep's seed=, threads are set per executor)" if k in ("seed", "threads") \
                else ""
            raise ValueError(f"{where}: unknown field {k!r}{hint}{extra}; known fields: {', '.join(FIELDS)}")
    for k, d in FIELDS.items():
        if d is ... and k not in keys:
            raise ValueError(f"{where}: required field {k!r} is missing")


def _expand(grid: Mapping[str, Any] | Sequence[Mapping[str, Any]], strict: bool = False) -> _Points:
    """Validate the whole grid (before any work) with the points' one
    :class:`~qsengine.decode.point.Validator` and list its points."""
    val = Validator(strict)

    def checked(k: str, v: Any, where: str) -> Value:
        try:
            return val.value(k, v)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{where}: {exc}") from None

    values: dict[str, list[Value]] = {}
    codes: dict[str, np.ndarray] = {}
    if isinstance(grid, Mapping):
        _check_fields(list(grid), "grid")
        axes = {k: [checked(k, v, "grid") for v in (_as_values(k, grid[k]) if k in grid else [FIELDS[k]])]
                for k in FIELDS}
        n = math.prod(len(v) for v in axes.values())
        stride = n
        for k, vals in axes.items():  # the cartesian product, last field fastest
            stride //= len(vals)
            values[k] = vals
            codes[k] = (np.arange(n, dtype=np.int64) // stride) % len(vals)
    elif isinstance(grid, Sequence) and not isinstance(grid, (str, bytes)):
        if not grid:
            raise ValueError("grid: empty list of points (give at least one)")
        n = len(grid)
        index: dict[str, dict[int, int]] = {k: {} for k in FIELDS}
        for k in FIELDS:
            values[k] = []
            codes[k] = np.empty(n, dtype=np.int64)
        for i, p in enumerate(grid):
            if not isinstance(p, Mapping):
                raise TypeError(f"grid point {i}: must be a dict of field values, got {type(p).__name__}")
            _check_fields(list(p), f"grid point {i}")
            for k, d in FIELDS.items():
                v = checked(k, p.get(k, d), f"grid point {i}")
                c = index[k].get(id(v))  # the validator returns one Value per distinct raw value
                if c is None:
                    c = index[k][id(v)] = len(values[k])
                    values[k].append(v)
                codes[k][i] = c
    else:
        raise TypeError(f"grid: must be a dict of lists or a list of point dicts, got {type(grid).__name__}")

    # cross-field checks once per distinct combination that matters, in grid order
    val.points(values, codes, n, lambda i, pv: f"grid point {i} (model={pv['model'].display!r}, "
                                              f"cluster={pv['cluster'].display!r}, context={pv['context'].display})")

    ids = _point_ids(n, values, codes)
    unique_of, unique = factorize(np.asarray(ids, dtype=object))
    grid_hash = hashlib.sha256("".join(ids).encode()).hexdigest()[:32]
    return _Points(values=values, codes=codes, ids=ids, unique=unique, unique_of=unique_of,
                   grid_hash=grid_hash)


def _point_ids(n: int, values: dict[str, list[Value]], codes: dict[str, np.ndarray]) -> list[str]:
    """:func:`point_id` of every position, i.e. SHA-256 of the canonical JSON
    ``{"model":...,"cluster":...,...}`` (fields in :data:`FIELDS` order).

    The JSON of a position is the concatenation of one part per field, so the
    hash is built as a trie over the fields: the hash state of each distinct
    prefix is computed once and copied for its children. Fields with one value
    are folded into the part before them; the cost is about one state copy and
    one digest per point."""
    parts = {k: [(("," if j else "{") + f'"{k}":{v.canon}').encode() for v in values[k]]
             for j, k in enumerate(FIELDS)}
    levels: list[tuple[np.ndarray, list[bytes]]] = []  # (code per position, part per code) of varying fields
    head = b""
    for k in FIELDS:
        c = codes[k]
        if len(values[k]) == 1 or (n and int(c.min()) == int(c.max())):
            piece = parts[k][int(c[0])] if n else parts[k][0]
            if levels:  # fold a constant field into the part of the varying field before it
                cs, ps = levels[-1]
                levels[-1] = (cs, [x + piece for x in ps])
            else:
                head += piece
        else:
            levels.append((c, list(parts[k])))
    if not levels:
        return [point_id((head + b"}").decode())] * n
    cs, ps = levels[-1]
    levels[-1] = (cs, [x + b"}" for x in ps])
    states = [hashlib.sha256(head)]
    parent = np.zeros(n, dtype=np.int64)  # the prefix group of each position
    for depth, (c, ps) in enumerate(levels):
        child, first = group(n, parent, c)
        copies = [h.copy for h in states]
        pairs = zip(parent[first].tolist(), c[first].tolist())
        if depth < len(levels) - 1:
            states = []
            for pc, cc in pairs:
                h = copies[pc]()
                h.update(ps[cc])
                states.append(h)
            parent = child
            continue
        digests = []
        for pc, cc in pairs:
            h = copies[pc]()
            h.update(ps[cc])
            digests.append(h.hexdigest()[:32])
        if first.size == n and not (first - np.arange(n)).any():  # every position distinct, in order
            return digests
        return [digests[g] for g in child.tolist()]
    raise AssertionError("unreachable")  # pragma: no cover
