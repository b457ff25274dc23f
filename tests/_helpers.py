"""Helpers shared by the pipeline test modules (test_pipeline, test_requests):
the model and cluster grids their property tests draw from, the point filter,
and one call of the vectorised pipeline as per-point records."""

from __future__ import annotations

import warnings

import qsengine
from qsengine.decode.pipeline import RECORD_COLUMNS, encode_points, evaluate_columns

MOE_MODELS = ["deepseek-v3", "qwen3-235b-a22b", "grok-1", "switch-c-2048", "qwen3-30b-a3b", "mixtral-8x7b",
              "gpt-oss-120b", "llama-4-scout", "dbrx", "kimi-k2"]
CLUSTERS = ["8xh100", "8xh200", "8xb200", "8xmi300x", "16xh100", "8xa100", "12xmi300x"]


def valid_point(p) -> bool:
    """Whether the point dict ``p`` is accepted by Point.make (drawn points may not be)."""
    try:
        qsengine.Point.make(strict=False, **p)
        return True
    except ValueError:
        return False


def records(pts):
    """The pipeline's records of the point dicts ``pts``, evaluated in one call
    (ContextWarning silenced: the grids run past some models' maximum context)."""
    cols, n = encode_points(pts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qsengine.ContextWarning)
        out = evaluate_columns(cols, n)
    return [{name: out[name][i] for name, _ in RECORD_COLUMNS} for i in range(n)]
