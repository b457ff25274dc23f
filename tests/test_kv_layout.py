"""The KV cache's layout (issue #14 item 5): FlashMLA's fp8 MLA cache stores 656 B per
token and layer for DeepSeek-V3 (512 fp8 latent + 4 fp32 scales + 64 bf16 RoPE values;
deepseek-ai/FlashMLA README, "FP8 KV Cache"), where a plain fp8 cache stores 576. Closed
forms, the plain layout unchanged, every consumer (admission, the step's KV read, the
record columns, the dense twin) moved by 656/576, bad input named, and the pipeline
against the scalar oracle on the new preset."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qsengine
from qsengine import Plan, Precision, SpecError
from qsengine.decode import kernels as K
from qsengine.decode.params import StepOptions, step_params
from qsengine.decode.step import decode_step
from qsengine.specs.loaders import as_cluster, as_model, as_precision
from qsengine.specs.precision import KV_LAYOUTS, PRESETS, mla_kv_bytes

from _helpers import MOE_MODELS, assert_matches_oracle, records

FLASH = "fp8-flashmla"
RATIO = 656 / 576


def test_flashmla_fp8_is_656_bytes_for_deepseek_v3():
    # the README's layout: 512 fp8 values + 4 fp32 scales (one per 128) + 64 bf16 values
    assert mla_kv_bytes(512, 64, 1.0, "flashmla-fp8") == 512 * 1 + 4 * 4 + 64 * 2 == 656
    assert mla_kv_bytes(512, 64, 1.0, "plain") == 576
    assert mla_kv_bytes(200, 64, 1.0, "flashmla-fp8") == 200 + 2 * 4 + 128  # a partial last group has a scale
    m = as_model("deepseek-v3")
    p = as_precision(FLASH)
    assert m.kv_bytes_per_token_per_layer(p.kv_bytes, p.kv_layout) == 656
    assert m.kv_bytes_per_token(p.kv_bytes, p.kv_layout) == m.decode_layers * 656
    assert m.kv_bytes_per_token_long(p.kv_bytes, p.kv_layout) == m.decode_layers * 656
    assert m.kv_bytes_per_sequence(1000, p.kv_bytes, p.kv_layout) == m.decode_layers * 656 * 1000
    # the preset is the fp8 preset with FlashMLA's layout; the layout takes part in equality and hash
    fp8 = PRESETS["fp8"]
    assert dataclasses.replace(p, name="fp8", kv_layout="plain") == fp8
    assert p != dataclasses.replace(p, kv_layout="plain")
    assert hash(dataclasses.replace(fp8, kv_layout="flashmla-fp8", name=FLASH)) == hash(p)
    assert fp8.kv_layout == "plain" and Precision().kv_layout == "plain"


@pytest.mark.parametrize("name", ["deepseek-v3", "kimi-k2", "mixtral-8x7b", "gpt-oss-120b", "llama-3.1-70b"])
def test_plain_layout_is_the_elements_at_kv_bytes(name):
    """The plain layout is today's arithmetic bit for bit; a GQA/MHA cache ignores the layout."""
    m = as_model(name)
    for b in (0.5, 1.0, 2.0):
        assert m.kv_bytes_per_token_per_layer(b, "plain") == m.attention.kv_elements_per_token() * b
        assert m.kv_bytes_per_token_per_layer(b) == m.kv_bytes_per_token_per_layer(b, "plain")
    if m.attention.kind != "mla":
        assert m.kv_bytes_per_token_per_layer(1.0, "flashmla-fp8") == m.kv_bytes_per_token_per_layer(1.0)


def test_plain_records_equal_the_default():
    """An fp8 precision spelled out with kv_layout='plain' gives the fp8 preset's records exactly, and its
    step inputs are the pre-layout formulas (elements x kv_bytes; the calibrated kernel at kv_bytes)."""
    fp8 = PRESETS["fp8"]
    spelled = Precision(fp8.weight_bytes, fp8.expert_bytes, 1.0, 2.0, "fp8", "fp8", dispatch_bytes=fp8.dispatch_bytes,
                        combine_bytes=2.0, kv_layout="plain")
    assert spelled == fp8
    pts = [dict(model="deepseek-v3", cluster="8xh200", context=32768, precision=fp8, microbatches=0),
           dict(model="qwen3-235b-a22b", cluster="8xh200", context=8192, precision=fp8, microbatches=0)]
    a = records(pts)
    b = records([dict(p, precision=spelled) for p in pts])
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:  # bit for bit (nan equals nan)
            assert ra[k] == rb[k] or (isinstance(ra[k], float) and math.isnan(ra[k]) and math.isnan(rb[k])), k
    m, acc = as_model("deepseek-v3"), as_cluster("8xh200").accelerator
    sp = step_params(m, fp8, acc, Plan(tp=8, ep=8))
    assert sp.kv_layer[0] == 576.0 and sp.at_kvb[0] == 1.0 and sp.at_el[0] == 576.0


def test_flashmla_admits_576_656_of_the_kv_tokens():
    """Same weights, same free HBM: the admitted KV tokens scale by 576/656 (whole sequences: rounding)."""
    plan = Plan(tp=8, ep=8)
    a = qsengine.pack("deepseek-v3", "8xh200", 4096, plan=plan, precision="fp8")
    b = qsengine.pack("deepseek-v3", "8xh200", 4096, plan=plan, precision=FLASH)
    assert a.admissible_batch > 100  # KV-bound: hundreds of sequences
    want = a.admissible_batch / RATIO
    assert b.admissible_batch < a.admissible_batch
    assert abs(b.admissible_batch - want) <= 1.0  # whole sequences: at most one of rounding
    # the KV tokens the cluster admits, x 576/656 within that rounding
    assert abs(b.cluster_batch * 4096 / (a.cluster_batch * 4096) - 1 / RATIO) <= 1.0 / b.cluster_batch


@pytest.mark.parametrize("kernels", ["roofline", "calibrated"])
def test_step_reads_656_576_more_kv_bytes(kernels):
    m, acc, plan = as_model("deepseek-v3"), as_cluster("8xh200").accelerator, Plan(tp=8, ep=8)
    B, T = 64, 32768
    opts = StepOptions(kernels=kernels)
    s8 = decode_step(m, PRESETS["fp8"], acc, plan, B, T, options=opts)
    sf = decode_step(m, PRESETS[FLASH], acc, plan, B, T, options=opts)
    # the attention piece's bytes: the same weights, the KV read x 656/576 (exact: 80 B more per cached token)
    assert sf.piece("attention").bytes - s8.piece("attention").bytes == B * T * m.decode_layers * (656 - 576)
    assert sf.piece("attention").time > s8.piece("attention").time
    # the pieces that do not read the KV cache are unchanged
    for p8, pf in zip(s8.pieces, sf.pieces):
        if p8.name != "attention":
            assert p8.time == pf.time, p8.name
    # the calibrated attention core streams 656 B per cached token where fp8 streams 576: its bandwidth term
    # minus Q/O is x 656/576
    p8, pf = (step_params(m, PRESETS[n], acc, plan, opts) for n in ("fp8", FLASH))
    assert p8.at_el[0] * p8.at_kvb[0] == 576 and pf.at_el[0] * pf.at_kvb[0] == pytest.approx(656, rel=1e-15)
    seqs, ctx = np.array([float(B)]), np.array([float(T)])
    kv = [(K._attn_core(p, seqs, ctx)[1] * p.at_bw - seqs * p.at_h * p.at_qo)[0] for p in (p8, pf)]
    assert kv[1] / kv[0] == pytest.approx(RATIO, rel=1e-12)
    # prefill's KV write and the roofline's KV read both use the layout's token size
    assert pf.kv_layer[0] == 656 and p8.kv_layer[0] == 576


def test_record_columns_and_the_dense_twin():
    m = as_model("deepseek-v3")
    base = dict(model="deepseek-v3", cluster="8xh200", context=32768, microbatches=0)
    same8, samef, gqa8, gqaf = records([dict(base, precision="fp8"), dict(base, precision=FLASH),
                                        dict(base, precision="fp8", twin_attention="gqa"),
                                        dict(base, precision=FLASH, twin_attention="gqa")])
    assert same8["moe_kv_bytes_per_token"] == m.decode_layers * 576
    assert samef["moe_kv_bytes_per_token"] == m.decode_layers * 656
    # an MLA twin stores its cache the same way; a GQA twin is plain whatever the layout
    assert samef["dense_kv_bytes_per_token"] / same8["dense_kv_bytes_per_token"] == pytest.approx(RATIO, rel=1e-15)
    assert gqaf["dense_kv_bytes_per_token"] == gqa8["dense_kv_bytes_per_token"]
    assert gqaf["moe_kv_bytes_per_token"] == m.decode_layers * 656
    assert samef["moe_batch"] < same8["moe_batch"]


@pytest.mark.parametrize("kwargs, field, text", [
    (dict(kv_layout="paged"), "kv_layout", "must be one of ['plain', 'flashmla-fp8']"),
    (dict(kv_layout="flashmla"), "kv_layout", "did you mean 'flashmla-fp8'"),
    (dict(kv_layout="flashmla-fp8"), "kv_layout", "needs kv_bytes = 1, got kv_bytes = 2"),  # bf16 KV
    (dict(kv_layout=3), "kv_layout", "must be"),
])
def test_bad_layouts_are_named(kwargs, field, text):
    with pytest.raises((SpecError, TypeError)) as e:
        Precision(name="bad", **kwargs)
    assert f"field '{field}'" in str(e.value) and text in str(e.value)


def test_the_layout_is_refused_for_a_model_without_mla():
    with pytest.raises(ValueError, match=r"field 'precision' = 'fp8-flashmla': its kv_layout 'flashmla-fp8' "
                                         r"stores MLA caches; model mixtral-8x7b has gqa attention"):
        qsengine.simulate("mixtral-8x7b", "8xh100", 4096, precision=FLASH)
    with pytest.raises(SpecError, match=r"field 'kv_layout' = 'x'"):
        as_model("deepseek-v3").kv_bytes_per_token_per_layer(1.0, "x")
    with pytest.raises(SpecError, match=r"field 'kv_layout' = 'x'"):
        as_model("mixtral-8x7b").kv_bytes_per_token_per_layer(1.0, "x")
    assert KV_LAYOUTS == ("plain", "flashmla-fp8")


def test_list_precisions_shows_the_layout():
    from qsengine.specs.cli import _list_precisions

    out = _list_precisions()
    assert "KV layout" in out
    line = next(ln for ln in out.splitlines() if ln.split() and ln.split()[0] == FLASH)
    assert "flashmla-fp8" in line


MLA_MOE = [m for m in MOE_MODELS if as_model(m).attention.kind == "mla"]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.fixed_dictionaries({
    "model": st.sampled_from(MLA_MOE),
    "cluster": st.sampled_from(["8xh200", "8xb200", "16xh100", "8xa100"]),
    "context": st.sampled_from([4096, 32768, 131072]),
    "precision": st.just(FLASH),
    "twin_attention": st.sampled_from(["same", "gqa"]),
    "microbatches": st.just(0),
    "options": st.sampled_from([None, StepOptions(kernels="roofline"), StepOptions(overlap="tbo")]),
    "draft_tokens": st.sampled_from([0, 0, 2]),
    "acceptance": st.just(0.7),
}), min_size=1, max_size=2))
def test_pipeline_equals_the_oracle_on_the_flashmla_layout(pts):
    """Decode (roofline, calibrated, speculative) with FlashMLA's cache equals the scalar oracle."""
    pts = [dict(p, acceptance=p["acceptance"] if p["draft_tokens"] else 0.0) for p in pts]
    assert assert_matches_oracle(pts)  # every drawn point is valid and compared


def test_prefill_writes_the_layout_bytes_as_the_oracle_does():
    """Whole requests (the prompt's cache written at the layout's bytes): decode columns exactly, the
    prefill arithmetic (written twice) to 1e-9, as test_requests compares them."""
    from test_requests import CLOSE, EXACT

    pts = [dict(model="deepseek-v3", cluster="16xh200", context=6144, output=2048, prefill=mode, precision=FLASH,
                microbatches=0) for mode in ("colocated", "disaggregated")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qsengine.ContextWarning)
        assert assert_matches_oracle(pts, exact=EXACT, close=CLOSE)
