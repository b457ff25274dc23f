"""Helpers shared by the pipeline test modules (test_pipeline, test_requests,
test_speculative, ...): the model and cluster grids their property tests draw
from, the one hypothesis strategy of point dicts (:func:`point_strategy`), the
point filter, one call of the vectorised pipeline as per-point records, and the
comparison of those records with the scalar oracle (:func:`assert_matches_oracle`)."""

from __future__ import annotations

import warnings
from typing import Any

from hypothesis import strategies as st

import qsengine
from qsengine.decode.pipeline import RECORD_COLUMNS, encode_points, evaluate_columns

MOE_MODELS = ["deepseek-v3", "qwen3-235b-a22b", "grok-1", "switch-c-2048", "qwen3-30b-a3b", "mixtral-8x7b",
              "gpt-oss-120b", "llama-4-scout", "dbrx", "kimi-k2"]
CLUSTERS = ["8xh100", "8xh200", "8xb200", "8xmi300x", "16xh100", "8xa100", "12xmi300x"]

#: The fields of a drawn point and the strategy of each (test_pipeline's ranges);
#: :func:`point_strategy` replaces some and adds others.
POINT_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from(MOE_MODELS),
    "cluster": st.sampled_from(CLUSTERS),
    "context": st.one_of(st.sampled_from([1, 4096, 32768, 131072]), st.integers(1, 262144)),
    "q": st.one_of(st.just("sqrt"), st.none(), st.floats(1.05, 12.0)),
    "slo_tpot": st.one_of(st.none(), st.floats(0.002, 0.2)),
    "precision": st.sampled_from([None, "bf16", "fp8", "fp8", "nvfp4-experts", "fp4", "fp8-flashmla"]),
    "routing": st.sampled_from(["uniform", "uniform", "powerlaw:1.01"]),
    "twin_attention": st.sampled_from(["same", "same", "gqa"]),
    "break_even": st.booleans(),
    "microbatches": st.just(0),
    "batch": st.one_of(st.none(), st.none(), st.sampled_from([1, 8, 48, 64, 100, 256, 4096])),
    "options": st.sampled_from([None, None, None, qsengine.StepOptions(overlap="tbo"),
                                qsengine.StepOptions(kernels="roofline")]),
}


def point_strategy(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Point dicts (keyword arguments of ``qsengine.Point.make``): every field of
    :data:`POINT_FIELDS`, each drawn from the strategy given for it in ``fields``
    if any (another range, or a new field such as ``output``), else from its
    default. Drawn points may be invalid: filter them with :func:`valid_point`."""
    unknown = sorted(set(fields) - set(qsengine.decode.point.FIELDS))
    if unknown:
        raise ValueError(f"point_strategy: fields {unknown}: not point fields")
    return st.fixed_dictionaries({**POINT_FIELDS, **fields})


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


def assert_matches_oracle(pts, exact=None, close=(), rtol: float = 1e-9, q_star_rtol: float | None = None) -> list:
    """Evaluate the valid points of ``pts`` (ContextWarning silenced) in ONE pipeline
    call and compare each record with the scalar oracle's
    (``tests/reference_simulate.py`` ``record``): the columns ``exact`` (every oracle
    column if None) by ``reference_simulate.same`` at ``rtol``, the columns ``close``
    to ``rtol`` (nan equals nan), ``break_even_q`` to ``q_star_rtol`` when given.
    Returns the (point, record) pairs compared (none if no point was valid)."""
    import math

    import reference_simulate as ref

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qsengine.ContextWarning)
        pts = [p for p in pts if valid_point(p)]
        if not pts:
            return []
        got = records(pts)
        for p, g in zip(pts, got):
            want = ref.record(**p)
            cols = want if exact is None else {k: want[k] for k in exact}
            assert ref.same(cols, g, rtol=rtol) == [], p
            checks = [(k, rtol) for k in close] + ([("break_even_q", q_star_rtol)] if q_star_rtol is not None else [])
            for k, tol in checks:
                a, b = g[k], want[k]
                assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=tol, abs_tol=0.0), \
                    (k, a, b, p)
    return list(zip(pts, got))
