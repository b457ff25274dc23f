"""Shared machinery of the fuzz suite (tests/test_fuzz_*.py).

Every public entry point is called with hypothesis-generated inputs: valid,
borderline and garbage. The only outcomes allowed (docs/reliability.md):

* a result, whose invariants the test then checks; or
* a ValueError / TypeError (SpecError and ResourceLimitError are documented
  subclasses) whose message names the input: it must mention at least one of
  the argument/field names or the file the test passed.

Anything else (another exception type, a crash, a hang) fails the test.

Example counts scale with ``QSENGINE_FUZZ_SCALE`` (default 1: the CI budget
of about two minutes; e.g. 20 for a nightly run, with QSENGINE_FUZZ_RANDOM=1
for fresh cases instead of the fixed reproducible set). Every case that ran is
counted per entry point in :data:`COUNTS` and reported at the end of the
pytest session (and written to ``$QSENGINE_FUZZ_COUNTS`` as JSON if set).
"""

from __future__ import annotations

import collections
import math
import os
import re
from typing import Any, Callable, Iterable

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import qsengine as q

SCALE = float(os.environ.get("QSENGINE_FUZZ_SCALE", "1"))
#: CI runs a fixed, reproducible set of cases; QSENGINE_FUZZ_RANDOM=1 (nightly,
#: with a larger scale) draws new ones each run.
RANDOM = os.environ.get("QSENGINE_FUZZ_RANDOM", "0") == "1"
#: entry point -> outcome ("ok" or the exception class name) -> cases
COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

ALLOWED = (ValueError, TypeError)


def fuzz_settings(examples: int, **kw: Any) -> settings:
    """hypothesis settings for one fuzz test: ``examples`` × QSENGINE_FUZZ_SCALE."""
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=None, database=None,
                    derandomize=not RANDOM,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
                    **kw)


#: a dotted path or an index after a name: ``routing.weights[1]``, ``cost.a``
_PATH = r"(?:\.\w+|\[\d+\])*"


def _name_patterns(name: str) -> list[str]:
    """Where a message names ``name`` in the package's formats: quoted
    (``field 'x' = v: rule``, ``unknown field 'x'``, a value ``'nope'``);
    ``x=v: rule``, also with a dotted path or index (``plan.tp=3``,
    ``routing.weights[1]=nan``); or as the source at the start of the message
    (``<file>: field ...``, ``cost.b: must be 1-D``). An argument already
    quoted (``repr`` of a value) must appear as it is."""
    if len(name) >= 2 and name[0] == name[-1] and name[0] in "'\"":
        return [re.escape(name)]
    e = re.escape(name)
    return [f"'{e}'", f'"{e}"', rf"(?<![\w]){e}{_PATH}=(?!=)", rf"^{e}{_PATH}:"]


#: Python's own call-signature errors ("f() takes 2 positional arguments but
#: 4 were given", "f() missing 1 required positional argument: 'x'", "got an
#: unexpected keyword argument 'x'") name the callable and its arguments.
_SIGNATURE = re.compile(r"^[\w.]+\(\) (?:takes|missing|got)")


def _mentions(msg: str, names: Iterable[str]) -> bool:
    """Whether ``msg`` names one of ``names`` in one of the package's formats
    (:func:`_name_patterns`), not merely contains it: a generic crash message
    such as "unsupported operand type(s) for *" or "min() arg is an empty
    sequence" does not name "q" or "ep" just because those letters occur."""
    if _SIGNATURE.match(msg):
        return True
    return any(re.search(p, msg) for n in names if n for p in _name_patterns(n))


#: Messages the oracle rejects whose fix belongs to a module this suite's
#: owner does not edit: entry -> [(regex on the message, where to fix it)].
#: The fuzz run counts them as "known defect" instead of failing; each is
#: reproduced by an ``xfail(strict=True)`` test in tests/test_fuzz_known.py,
#: so fixing the source makes that test pass and fail loudly until the entry
#: here is removed.
KNOWN_DEFECTS: dict[str, list[tuple[str, str]]] = {
}


def known_defect(entry: str, msg: str) -> str | None:
    """Where to fix ``msg`` if it is a known defect of ``entry`` (else None)."""
    for pattern, where in KNOWN_DEFECTS.get(entry, ()):
        if re.search(pattern, msg):
            return where
    return None


def outcome(entry: str, call: Callable[[], Any], names: Iterable[str], inputs: Iterable[Any] = ()) -> Any:
    """Run ``call``; return its result, or None if it raised an allowed error
    whose message names one of ``names`` (argument/field names, files) or one
    of the string ``inputs`` themselves. Other exceptions propagate (a bug)."""
    names = list(names) + [v.strip() for v in inputs if isinstance(v, str) and len(v.strip()) >= 2]
    try:
        result = call()
    except ALLOWED as exc:
        COUNTS[entry][type(exc).__name__] += 1
        msg = str(exc)
        assert msg.strip(), f"{entry}: {type(exc).__name__} with an empty message"
        if not _mentions(msg, names) and known_defect(entry, msg):
            COUNTS[entry]["known defect"] += 1
            return None
        assert _mentions(msg, names), f"{entry}: message does not name the input ({names}): {msg!r}"
        return None
    except BaseException as exc:
        COUNTS[entry][f"BUG:{type(exc).__name__}"] += 1
        raise
    COUNTS[entry]["ok"] += 1
    return result


def finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# ---------------------------------------------------------------- strategies
_junk_text = st.sampled_from(["", " ", "é", "∞", "\x00", "nan", "inf", "-1", "0", "1e400", "🙂", "a" * 300,
                              "../../etc/passwd", "__import__('os')", "$(rm -rf /)", "{}", "[]", "null"])
JUNK = st.one_of(
    st.none(), st.booleans(), _junk_text, st.text(max_size=20),
    st.integers(-(2**70), 2**70), st.sampled_from([0, -1, -(2**63), 2**63 - 1, 2**63, 2**64, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([float("nan"), float("inf"), -float("inf"), -0.0,
                                                                    1e-320, 1e308]),
    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.just(object()), st.just(b"bytes"), st.just(1 + 2j),
)


def maybe(valid: st.SearchStrategy, junk_in: int = 10) -> st.SearchStrategy:
    """``valid`` most of the time, garbage (:data:`JUNK`) about once in ``junk_in``
    draws (so a call with many arguments is often entirely valid)."""
    return st.sampled_from(range(junk_in)).flatmap(lambda i: JUNK if i == junk_in - 1 else valid)


def memory_limited(limit: int = 256 << 20):
    """Context manager: a small memory limit so huge requests are refused cheaply."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        from qsengine import _limits

        old = _limits._override
        q.set_memory_limit(limit)
        try:
            yield
        finally:
            _limits._override = old

    return cm()


@st.composite
def call_args(draw, valid: dict[str, st.SearchStrategy], bad: dict[str, st.SearchStrategy] | None = None):
    """Keyword arguments: all drawn from ``valid``; then, in about half of the
    cases, one to three of them replaced by a borderline/garbage value (from
    ``bad[name]`` if given, else :data:`JUNK`). Returns ``(kwargs, changed)``."""
    kwargs = {k: draw(v) for k, v in valid.items()}
    changed: list[str] = []
    if draw(st.booleans()):
        for _ in range(draw(st.integers(1, 3))):
            k = draw(st.sampled_from(sorted(valid)))
            pool = (bad or {}).get(k)
            kwargs[k] = draw(st.one_of(pool, JUNK) if pool is not None else JUNK)
            changed.append(k)
    return kwargs, changed
