"""Validation helpers shared by every spec's ``__post_init__`` and the loaders.

Every message has the form ``<source>: field '<name>' = <value>: <rule>``,
e.g. ``deepseek-v3.toml: field 'top_k' = 300: must be <= routed_experts (256)``.

The *source* is the file being loaded when a loader is active (set with
:func:`spec_source`), otherwise a description of the object being built
(``Model 'deepseek-v3'``). Value errors raise :class:`qsengine.SpecError`
(a :class:`ValueError`); wrong types raise :class:`TypeError`.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import math
import numbers
from collections.abc import Iterable, Iterator
from typing import Any

from qsengine.errors import SpecError

_SOURCE: contextvars.ContextVar[str | None] = contextvars.ContextVar("qsengine_spec_source", default=None)


@contextlib.contextmanager
def spec_source(label: str) -> Iterator[None]:
    """Within this block, validation messages name ``label`` (e.g. a file name)
    as their source instead of the object being built."""
    token = _SOURCE.set(label)
    try:
        yield
    finally:
        _SOURCE.reset(token)


def current_source(default: str) -> str:
    """The active loader's source label, or ``default``."""
    src = _SOURCE.get()
    return src if src is not None else default


def _fmt(value: object) -> str:
    if isinstance(value, str):
        return repr(value)
    return str(value)


def fail(src: str, name: str, value: object, rule: str) -> SpecError:
    """Build (not raise) the standard value error."""
    return SpecError(f"{src}: field {name!r} = {_fmt(value)}: {rule}")


def type_fail(src: str, name: str, value: object, expected: str) -> TypeError:
    """Build (not raise) the standard type error."""
    return TypeError(f"{src}: field {name!r} = {_fmt(value)}: must be {expected}, got {type(value).__name__}")


#: Largest integer any spec field accepts: counts above 2^53 are not exact in
#: the float64 arithmetic of the memory and step models, and would overflow
#: the core's 64-bit products (a hand-written or JSON file can hold any size).
MAX_SPEC_INT = 2**53


def check_int(src: str, name: str, value: object, *, minimum: int | None = None,
              maximum: int | None = MAX_SPEC_INT) -> int:
    """``value`` must be an integer (``int`` or e.g. ``numpy.int64``; not
    ``bool``, not ``float``), ``>= minimum`` and ``<= maximum``. Returns it as ``int``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise type_fail(src, name, value, "an integer")
    value = int(value)
    if minimum is not None and value < minimum:
        rule = "must be positive" if minimum == 1 else ("must be >= 0" if minimum == 0 else f"must be >= {minimum}")
        raise fail(src, name, value, rule)
    if maximum is not None and value > maximum:
        raise fail(src, name, value, f"must be <= {maximum}")
    return value


def check_opt_int(src: str, name: str, value: object, *, minimum: int | None = None) -> int | None:
    return None if value is None else check_int(src, name, value, minimum=minimum)


def check_float(
    src: str,
    name: str,
    value: object,
    *,
    positive: bool = True,
    allow_zero: bool = False,
    maximum: float | None = None,
) -> float:
    """``value`` must be a real number (int or float, not bool), finite, and
    ``> 0`` (``>= 0`` with ``allow_zero``), and ``<= maximum`` if given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise type_fail(src, name, value, "a number")
    v = float(value)
    if math.isnan(v) or math.isinf(v):
        raise fail(src, name, value, "must be finite")
    if positive:
        if allow_zero and v < 0:
            raise fail(src, name, value, "must be >= 0")
        if not allow_zero and v <= 0:
            raise fail(src, name, value, "must be positive")
    if maximum is not None and v > maximum:
        raise fail(src, name, value, f"must be <= {maximum}")
    return v


def check_fraction(src: str, name: str, value: object) -> float:
    """An efficiency / fraction in (0, 1]."""
    v = check_float(src, name, value)
    if v > 1.0:
        raise fail(src, name, value, "must be in (0, 1]")
    return v


def check_bool(src: str, name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise type_fail(src, name, value, "true or false")
    return value


def check_str(src: str, name: str, value: object, *, nonempty: bool = False) -> str:
    if not isinstance(value, str):
        raise type_fail(src, name, value, "a string")
    if nonempty and not value.strip():
        raise fail(src, name, value, "must not be empty")
    return value


def check_choice(src: str, name: str, value: object, choices: Iterable[str]) -> str:
    choices = list(choices)
    check_str(src, name, value)
    if value not in choices:
        raise fail(src, name, value, f"must be one of {choices}{did_you_mean(str(value), choices)}")
    return str(value)


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest candidate, or ``""``."""
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def check_keys(src: str, table: dict[str, Any], allowed: Iterable[str], where: str = "") -> None:
    """Reject keys of ``table`` not in ``allowed``, with a did-you-mean hint."""
    allowed = list(allowed)
    for key in table:
        if key not in allowed:
            loc = f" in [{where}]" if where else ""
            raise SpecError(f"{src}: unknown field {key!r}{loc}{did_you_mean(key, allowed)}")
