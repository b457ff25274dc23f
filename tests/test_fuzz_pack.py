"""Fuzz qsengine.pack and qsengine.min_gpus (rules in tests/_fuzz.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qsengine as q
from _fuzz import JUNK, call_args, fuzz_settings, maybe, memory_limited, outcome

MODELS = ["qwen3-30b-a3b", "mixtral-8x7b", "llama-3.1-8b", "deepseek-v3", "gpt-oss-120b"]
PACK_NAMES = ["model", "cluster", "context", "plan", "precision", "replicas", "popularity", "block_size", "lengths",
              "num_sequences", "seed", "threads", "num_gpus", "tp", "pp", "dp", "ep", "etp", "attn_dp", "workload",
              "tp*pp*dp", "ep*etp", "weights", "memory limit"]

_dist = st.builds(lambda v, w: ("dist", v, w), st.lists(st.integers(1, 100_000), min_size=1, max_size=4),
                  st.lists(st.floats(0.1, 10), min_size=1, max_size=4))
PACK_VALID = dict(
    model=st.sampled_from(MODELS),
    cluster=st.sampled_from(["8xh100", "8xh200", "1xh100", "16xh100", "4xmi300x", "72xgb200"]),
    context=st.one_of(st.integers(1, 300_000), st.sampled_from([4096, 32768, 131072])),
    plan=st.one_of(st.just("auto"), st.builds(lambda tp, ep: (tp, 1, 8 // tp, ep), st.sampled_from([1, 2, 4, 8]),
                                              st.sampled_from([1, 2, 8]))),
    precision=st.sampled_from([None, "bf16", "fp8", "fp4", "int8"]),
    replicas=st.one_of(st.just(0), st.integers(0, 40)),
    popularity=st.sampled_from([None, None, "ones"]),
    block_size=st.sampled_from([None, 16]),
    lengths=st.one_of(st.none(), st.none(), st.lists(st.integers(1, 200_000), min_size=1, max_size=50), _dist),
    num_sequences=st.one_of(st.none(), st.integers(1, 5000)),
    seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
)
PACK_BAD = dict(
    cluster=st.sampled_from(["0xh100", "3xh100", "1048577xh100", "9999999999999999999999xh100", "8xnope", "8x"]),
    context=st.sampled_from([0, -1, 2**40, 2**62, 2**64, 1.5, float("nan")]),
    plan=st.builds(lambda tp, pp, dp, ep: (tp, pp, dp, ep), st.sampled_from([1, 2, 4, 8, 3, 0, -1]),
                   st.sampled_from([1, 2, 0]), st.sampled_from([1, 2, 8]), st.sampled_from([1, 2, 8, 16])),
    precision=st.sampled_from(["fp7", "", "BF16 "]),
    replicas=st.sampled_from([-1, 2**62, 10**6]),
    popularity=st.sampled_from(["ones", [1.0, float("nan")], [], [[1.0]], "x"]),
    block_size=st.sampled_from([0, -1, 2**62]),
    lengths=st.one_of(st.lists(st.one_of(st.integers(-2, 200_000), st.sampled_from([2**62, 2**63 - 1])), max_size=50),
                      st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=5),
                      st.builds(lambda v, w: ("dist", v, w), st.lists(st.integers(-1, 100_000), max_size=4),
                                st.lists(st.floats(-1, 10), max_size=4))),
    num_sequences=st.sampled_from([0, -1, 10**7, 10**12, 2**63]),
    seed=st.sampled_from([-1, 2**128, 1.5]),
)


def _realize_plan(p):
    return q.Plan(tp=p[0], pp=p[1], dp=p[2], ep=p[3]) if isinstance(p, tuple) else p


def _realize_lengths(x):
    if isinstance(x, tuple) and x and x[0] == "dist":
        return q.Workload.distribution(x[1], x[2])
    return x


@fuzz_settings(200)
@given(args=call_args(PACK_VALID, PACK_BAD))
def test_fuzz_pack(args):
    kw, changed = args
    model = kw.pop("model")

    def call():
        m = q.load_model(model) if isinstance(model, str) else model
        if kw["popularity"] == "ones" and isinstance(m, q.Model):
            kw["popularity"] = np.ones(max(m.routed_experts, 1))
        kw["plan"] = _realize_plan(kw["plan"])
        kw["lengths"] = _realize_lengths(kw["lengths"])
        return q.pack(m, threads=1, **kw)

    with memory_limited(64 << 20):
        p = outcome("pack", call, PACK_NAMES, [model, kw["cluster"], kw["precision"]])
    if p is None:
        return
    assert isinstance(p.feasible, bool)
    if p.feasible:
        assert p.admissible_batch >= 1 and p.cluster_batch >= p.admissible_batch
    else:
        assert p.reason
    gm = p.gpu_map
    assert len(gm) == p.cluster.num_gpus
    num = gm.select_dtypes("number").to_numpy(dtype=float)
    assert np.isfinite(num).all()
    if p.paged is not None:
        assert p.paged.placed + p.paged.rejected == p.paged.offered
    p.summary()
    p.to_dict()


@fuzz_settings(100)
@given(model=maybe(st.sampled_from(MODELS)),
       accelerator=maybe(st.sampled_from(["h100", "h200", "mi300x", "b200", "8xh100", "nope"])),
       context=maybe(st.one_of(st.integers(1, 2_000_000), st.sampled_from([0, -5, 10**9, 2**62]))),
       precision=maybe(st.sampled_from([None, "bf16", "fp8", "fp4"])),
       max_gpus=maybe(st.one_of(st.integers(-1, 64), st.sampled_from([2**63, 10**30]))))
def test_fuzz_min_gpus(model, accelerator, context, precision, max_gpus):
    g = outcome("min_gpus", lambda: q.min_gpus(model, accelerator, context, precision=precision, max_gpus=max_gpus),
                PACK_NAMES + ["accelerator", "max_gpus"], [model, accelerator, precision])
    if g is None:
        return
    assert 1 <= g <= max_gpus
    acc = q.load_accelerator(accelerator) if accelerator != "8xh100" else q.load_cluster("8xh100").accelerator
    assert q.pack(model, q.Cluster(acc, g), context, precision=precision).feasible
    if g > 1:  # smallest: one fewer GPU never works
        assert not q.pack(model, q.Cluster(acc, g - 1), context, precision=precision).feasible


def test_paged_packing_refuses_huge_num_sequences_before_allocating():
    dist = q.Workload.distribution([500, 4000], [1, 1])
    with memory_limited(1 << 20):
        with pytest.raises(q.ResourceLimitError, match=r"num_sequences: 1000000 sequences .* memory limit"):
            q.pack("qwen3-30b-a3b", "8xh100", 4096, lengths=dist, num_sequences=10**6, seed=1)
    # the same request fits the default limit
    p = q.pack("qwen3-30b-a3b", "8xh100", 4096, lengths=dist, num_sequences=10**5, seed=1)
    assert p.paged.offered == 10**5


def test_cluster_size_and_counts_are_bounded():
    h100 = q.load_accelerator("h100")
    with pytest.raises(q.SpecError, match="num_gpus.*must be <= 1048576"):
        q.Cluster(h100, 2**20 + 1)
    with pytest.raises(ValueError, match="context=.*2\\^53"):
        q.pack("qwen3-30b-a3b", "8xh100", 2**60)
