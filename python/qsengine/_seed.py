"""One way in for randomness (Scientific Python SPEC 7).

Every public function that draws random numbers takes ``seed=None | int |
numpy.random.SeedSequence``. It is normalised here to a SeedSequence; results
record its ``entropy`` (and ``spawn_key``) so any run can be repeated exactly.
The C++ core uses a Philox4x64-10 key derived from the SeedSequence; streams
inside the core are keyed by (key, work block, purpose), never by thread.
"""

from __future__ import annotations

import numbers
from typing import Union

import numpy as np

SeedLike = Union[None, int, np.random.SeedSequence]

__all__ = ["SeedLike", "as_seed_sequence", "philox_key", "seed_record"]


def as_seed_sequence(seed: SeedLike, *, name: str = "seed") -> np.random.SeedSequence:
    """Normalise ``seed`` to a :class:`numpy.random.SeedSequence`.

    ``None`` draws fresh OS entropy (recorded in the result), an int must be
    non-negative, a SeedSequence is used as is.
    """
    if seed is None:
        return np.random.SeedSequence()
    if isinstance(seed, np.random.SeedSequence):
        return seed
    if isinstance(seed, (bool, np.bool_)):
        raise TypeError(f"{name}={seed!r}: must be None, a non-negative int or a numpy.random.SeedSequence, not a bool")
    if isinstance(seed, numbers.Integral):
        value = int(seed)
        if value < 0:
            raise ValueError(f"{name}={value}: must be a non-negative integer")
        return np.random.SeedSequence(value)
    raise TypeError(
        f"{name}={seed!r} (type {type(seed).__name__}): must be None, a non-negative int "
        "or a numpy.random.SeedSequence"
    )


def philox_key(seq: np.random.SeedSequence) -> tuple[int, int]:
    """The two 64-bit words of the Philox4x64 key derived from ``seq``."""
    words = seq.generate_state(2, dtype=np.uint64)
    return int(words[0]), int(words[1])


def seed_record(seq: np.random.SeedSequence) -> dict[str, object]:
    """A JSON-friendly record of ``seq`` from which it can be rebuilt exactly."""
    entropy = seq.entropy
    if isinstance(entropy, (list, tuple, np.ndarray)):
        entropy = [int(x) for x in entropy]
    elif entropy is not None:
        entropy = int(entropy)
    return {"entropy": entropy, "spawn_key": [int(x) for x in seq.spawn_key]}
