"""Fuzz qsengine.simulate (small Monte Carlo budgets) and qsengine.sweep
(grid validation, small grids). Rules in tests/_fuzz.py."""

from __future__ import annotations

import itertools
import json
import math
import warnings

import pytest

from hypothesis import given
from hypothesis import strategies as st

import qsengine as q
from _fuzz import JUNK, call_args, fuzz_settings, outcome

MOE = ["qwen3-30b-a3b", "mixtral-8x7b", "gpt-oss-120b", "deepseek-v3"]
SIM_NAMES = ["model", "cluster", "context", "q", "dense", "routing", "plan", "precision", "microbatches",
             "slo_tpot", "seed", "threads", "twin_attention", "break_even", "options", "alpha", "rho", "groups",
             "memory limit", "num_gpus", "is dense", "tp", "pp", "dp", "ep", "weights", "output", "prefill"]

SIM_VALID = dict(
    model=st.sampled_from(MOE),
    cluster=st.sampled_from(["8xh100", "8xh200", "16xh100", "8xmi300x", "1xh100"]),
    context=st.one_of(st.sampled_from([1, 4096, 32768, 131072]), st.integers(1, 200_000)),
    q=st.one_of(st.none(), st.just("sqrt"), st.floats(1.0, 20.0)),
    routing=st.sampled_from(["uniform", "powerlaw:1.0", "powerlaw:1.2:per_layer", "dirichlet:0.5", "sticky:0.5"]),
    precision=st.sampled_from([None, "bf16", "fp8", "fp4"]),
    microbatches=st.integers(0, 12),
    slo_tpot=st.one_of(st.none(), st.floats(1e-3, 1.0)),
    seed=st.one_of(st.none(), st.integers(0, 2**63)),
    threads=st.one_of(st.none(), st.integers(1, 2)),
    twin_attention=st.sampled_from(["same", "gqa"]),
    break_even=st.booleans(),
    output=st.sampled_from([0, 0, 1, 2048]),
    prefill=st.sampled_from(["none", "none", "colocated", "disaggregated"]),
)
SIM_BAD = dict(
    model=st.sampled_from(["llama-3.1-8b", "nope", "", "../x.toml"]),
    cluster=st.sampled_from(["0xh100", "1048577xh100", "8xnope"]),
    context=st.sampled_from([0, -1, 2**62, 2**64, 1.5, float("nan"), True, "4096"]),
    q=st.sampled_from([0.0, -1.0, 0.5, float("nan"), float("inf"), 1e308, "sqrtx", "", 10**400 if False else 1e-300]),
    routing=st.sampled_from(["zipf", "powerlaw:nan", "powerlaw:-1", "group:3:1", "sticky:2", "trace:/nope.npy", ""]),
    precision=st.sampled_from(["fp7", "", "BF16"]),
    microbatches=st.sampled_from([-1, 1.5, "many", float("inf"), 2**70]),
    slo_tpot=st.sampled_from([0.0, -1.0, float("nan"), float("inf"), 1e-30, "1ms"]),
    seed=st.sampled_from([-1, 1.5, 2**200, "seed"]),
    threads=st.sampled_from([0, -1, 2**40, 1.5]),
    twin_attention=st.sampled_from(["mha", "", None]),
    break_even=st.sampled_from([None, "yes", 2]),
    output=st.sampled_from([-1, 1.5, 2**60, None, "2k", True]),
    prefill=st.sampled_from(["", "both", None, 1]),
)


def _check_side(side) -> None:
    if side.feasible:
        assert side.tokens_per_second > 0 and math.isfinite(side.tokens_per_second)
        assert side.batch >= 1


@fuzz_settings(200)
@given(args=call_args(SIM_VALID, SIM_BAD))
def test_fuzz_simulate(args):
    kw, changed = args
    # A small work budget: generated microbatch counts (up to 2^70) must be
    # refused by the resource guard, not run for years.
    q.set_work_limit(10**9)
    try:
        r = outcome("simulate", lambda: q.simulate(**kw), SIM_NAMES, [kw.get("model"), kw.get("cluster"),
                                                                      kw.get("routing"), kw.get("precision")])
    finally:
        q.set_work_limit(None)
    if r is None:
        return
    _check_side(r.moe)
    _check_side(r.dense)
    if r.moe.feasible and r.dense.feasible:
        rec = r.to_record()
        if rec["ratio_basis"] == "decode":
            assert r.ratio is not None and math.isclose(r.ratio, r.dense.tokens_per_second / r.moe.tokens_per_second)
        else:  # whole requests with prefill: the end-to-end ratio
            assert r.ratio is not None and math.isclose(r.ratio, rec["dense_request_tokens_per_s_per_gpu"]
                                                        / rec["moe_request_tokens_per_s_per_gpu"])
    else:
        assert r.ratio is None
    assert r.break_even_q is None or (math.isfinite(r.break_even_q) and r.break_even_q > 0)
    # never a silent NaN: the whole record is strict JSON
    d = r.to_dict()
    json.dumps(d, allow_nan=False, default=str)
    # table rows mark "not available" as NaN (pandas' missing value): only
    # where the record itself says None
    for k, v in r.to_record().items():
        if isinstance(v, float) and not math.isfinite(v):
            side_missing = (k.startswith("moe_") and not r.moe.feasible) or (
                k.startswith("dense_") and not r.dense.feasible)
            assert side_missing or (k in d and d[k] is None), (k, v)


_FIELD_VALUES = dict(
    model=st.lists(st.sampled_from(MOE[:2]), min_size=1, max_size=2, unique=True),
    cluster=st.lists(st.sampled_from(["8xh100", "8xh200"]), min_size=1, max_size=2, unique=True),
    context=st.lists(st.sampled_from([4096, 32768]), min_size=1, max_size=2, unique=True),
    microbatches=st.just([0]),
    break_even=st.just([False]),
)
_GRID_BAD = dict(
    model=st.sampled_from([[], ["nope"], "qwen3-30b-a3b", [None], [["x"]], ["llama-3.1-8b"]]),
    cluster=st.sampled_from([[], ["0xh100"], [8], [{"a": 1}]]),
    context=st.sampled_from([[], [0], [-1], [1.5], ["4k"], [2**70], [float("nan")], 4096]),
    microbatches=st.sampled_from([[-1], ["auto", -2], [1.5], [None]]),
    break_even=st.sampled_from([[None], ["no"], [2]]),
)


@fuzz_settings(60)
@given(args=call_args(_FIELD_VALUES, _GRID_BAD), extra=st.one_of(st.none(), st.sampled_from(["modle", "qq", "",
                                                                                              "seed", "contexts"])),
       form=st.sampled_from(["product", "points"]), seed=st.one_of(st.integers(0, 2**32), JUNK))
def test_fuzz_sweep(tmp_path_factory, args, extra, form, seed):
    grid, changed = args
    if extra is not None:
        grid[extra] = [1]
    if form == "points":  # an explicit list of point dicts
        keys = list(grid)
        vals = [v if isinstance(v, list) else [v] for v in grid.values()]
        grid = [dict(zip(keys, combo)) for combo in itertools.islice(itertools.product(*vals), 6)]
    ck = tmp_path_factory.mktemp("sweep")
    names = list(q.sweeps.FIELDS) + ["grid", "seed"] + ([extra, repr(extra)] if extra is not None else [])
    df = outcome("sweep", lambda: q.sweep(grid, checkpoint=ck, progress=False, seed=seed), names)
    if df is None:
        return
    if form == "product":
        n = math.prod(len(v) if isinstance(v, list) else 1 for v in grid.values())
    else:
        n = len(grid)
    assert len(df) == n and df["point_id"].notna().all()
    # resuming the finished sweep recomputes nothing and gives the same frame
    again = q.sweep(grid, checkpoint=ck, progress=False, seed=seed)
    assert again.attrs["sweep"]["computed_points"] == 0
    assert again.drop(columns=[]).equals(df)


def test_step_model_raises_no_overflow_warning_for_a_skewed_small_monte_carlo():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        q.simulate("qwen3-30b-a3b", "8xh200", 36300, routing="powerlaw:1.0", precision="fp8", microbatches=8,
                   slo_tpot=0.5765399327828519, seed=16408, threads=1, break_even=False)
