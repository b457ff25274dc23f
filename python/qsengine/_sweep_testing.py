"""Point evaluators for testing the sweep machinery (private).

They live in the package, not in ``tests/``, so that worker processes
(process pools, Dask workers) can import them by name.

* :func:`fake_point`: a cheap, deterministic stand-in for simulate whose
  record has the same column kinds as ``SimulationResult.to_record()``
  (floats with NaN, ints, strings, bools with None) and depends on the seed;
* :func:`exit_once`: like ``fake_point``, but the worker process dies
  (``os._exit``) the first time it meets a point whose ``context`` equals
  ``$QSENGINE_TEST_KILL_CONTEXT``; a marker file per point in
  ``$QSENGINE_TEST_MARKERS`` makes the retry succeed;
* :func:`interrupt_after`: raises KeyboardInterrupt once ``n`` points have
  been evaluated in this process (set with :func:`arm_interrupt`).
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

_calls = {"n": 0, "limit": None}


def fake_point(kwargs: dict[str, Any], seed: np.random.SeedSequence, threads: int | None) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    x = float(rng.random())
    feasible = kwargs["context"] <= 16384 or x > 0.5
    return {
        "model": str(kwargs["model"]),
        "context": int(kwargs["context"]),
        "ratio": x * 2.0 if feasible else math.nan,
        "verdict": ("dense" if x > 0.5 else "moe") if feasible else "dense-only",
        "agrees_with_qs": (x > 0.25) if feasible else None,
        "moe_feasible": feasible,
        "moe_reason": "" if feasible else "KV cache does not fit",
        "moe_batch": int(rng.integers(1, 1000)) if feasible else 0,
        "draw": x,
    }


def _marker(seed: np.random.SeedSequence) -> str:
    return hashlib.sha256(repr(tuple(seed.spawn_key)).encode()).hexdigest()[:16]


def exit_once(kwargs: dict[str, Any], seed: np.random.SeedSequence, threads: int | None) -> dict[str, Any]:
    kill = os.environ.get("QSENGINE_TEST_KILL_CONTEXT")
    markers = os.environ.get("QSENGINE_TEST_MARKERS")
    if kill and markers and int(kill) == kwargs["context"]:
        m = Path(markers) / _marker(seed)
        if not m.exists():
            m.write_text("killed once\n")
            os._exit(17)
    return fake_point(kwargs, seed, threads)


def arm_interrupt(n: int | None) -> None:
    """Raise KeyboardInterrupt on the (n+1)-th call of :func:`interrupt_after`."""
    _calls["n"] = 0
    _calls["limit"] = n


def interrupt_after(kwargs: dict[str, Any], seed: np.random.SeedSequence, threads: int | None) -> dict[str, Any]:
    if _calls["limit"] is not None and _calls["n"] >= _calls["limit"]:
        raise KeyboardInterrupt
    _calls["n"] += 1
    return fake_point(kwargs, seed, threads)


def slow_point(kwargs: dict[str, Any], seed: np.random.SeedSequence, threads: int | None) -> dict[str, Any]:
    """``fake_point`` after a 50 ms sleep (for real-signal interrupt tests)."""
    import time

    time.sleep(0.05)
    return fake_point(kwargs, seed, threads)
