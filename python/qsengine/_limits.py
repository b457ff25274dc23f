"""Resource limits shared by the engines.

The memory limit caps what one call may allocate (estimated before anything is
allocated; above it the call raises :class:`qsengine.ResourceLimitError`).
Precedence: :func:`set_memory_limit` > environment variable
``QSENGINE_MAX_MEMORY`` (bytes, or with a K/M/G/T suffix, powers of 1024) >
the default of 4 GiB.
"""

from __future__ import annotations

import numbers
import os

__all__ = ["DEFAULT_MEMORY_LIMIT", "get_memory_limit", "set_memory_limit"]

DEFAULT_MEMORY_LIMIT: int = 4 << 30
_ENV = "QSENGINE_MAX_MEMORY"
_override: int | None = None
_SUFFIX = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _parse_bytes(text: str, *, name: str) -> int:
    raw = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    if raw and raw[-1] in _SUFFIX:
        mult = _SUFFIX[raw[-1]]
        raw = raw[:-1]
    try:
        value = int(float(raw) * mult)
    except ValueError:
        raise ValueError(f"{name}={text!r}: must be a byte count such as 4294967296 or 4G") from None
    if value < 1:
        raise ValueError(f"{name}={text!r}: must be positive")
    return value


def set_memory_limit(limit: int | str | None) -> None:
    """Set the per-call memory limit in bytes (``"8G"`` also works); None restores the default."""
    global _override
    if limit is None:
        _override = None
        return
    if isinstance(limit, str):
        _override = _parse_bytes(limit, name="limit")
        return
    if isinstance(limit, bool) or not isinstance(limit, numbers.Integral):
        raise TypeError(f"limit={limit!r}: must be an int (bytes), a string like '8G', or None")
    if int(limit) < 1:
        raise ValueError(f"limit={limit}: must be a positive number of bytes")
    _override = int(limit)


def get_memory_limit() -> int:
    """The memory limit in bytes currently in force."""
    if _override is not None:
        return _override
    env = os.environ.get(_ENV)
    if env:
        return _parse_bytes(env, name=_ENV)
    return DEFAULT_MEMORY_LIMIT


# ---------------------------------------------------------------------------
# Work limit: token-expert assignments one routing Monte Carlo may simulate.
# ---------------------------------------------------------------------------

#: Default: 1e12 assignments, about an hour on one core at the engine's
#: measured rate (~4e8/s); larger studies raise it explicitly.
DEFAULT_WORK_LIMIT: int = 10**12
_WORK_ENV = "QSENGINE_MAX_ASSIGNMENTS"
_work_override: int | None = None

__all__ += ["DEFAULT_WORK_LIMIT", "get_work_limit", "set_work_limit"]


def set_work_limit(limit: int | None) -> None:
    """Set the most token-expert assignments (microbatches × layers × batch ×
    top_k) one :func:`qsengine.route` call may simulate; None restores the
    default (env ``QSENGINE_MAX_ASSIGNMENTS``, else 1e12)."""
    global _work_override
    if limit is None:
        _work_override = None
        return
    if isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or int(limit) < 1:
        raise ValueError(f"limit={limit!r}: must be a positive int (assignments) or None")
    _work_override = int(limit)


def get_work_limit() -> int:
    """The work limit (assignments per routing Monte Carlo) currently in force."""
    if _work_override is not None:
        return _work_override
    env = os.environ.get(_WORK_ENV)
    if env:
        try:
            value = int(float(env))
        except ValueError:
            raise ValueError(f"{_WORK_ENV}={env!r}: must be a number of assignments such as 1e12") from None
        if value < 1:
            raise ValueError(f"{_WORK_ENV}={env!r}: must be positive")
        return value
    return DEFAULT_WORK_LIMIT
