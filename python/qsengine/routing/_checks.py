"""Input checks shared by the routing specs and the engine (messages name the argument)."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np



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
