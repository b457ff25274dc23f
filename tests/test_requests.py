"""Whole requests (decode/prefill.py, the ``output`` and ``prefill`` point
fields): the pipeline equals the slow oracle, prefill physics in closed form,
admission at the peak cache and reads at the running mean, decode-only
reproduced, colocated and disaggregated throughput rules, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import qsengine
import reference_simulate as ref
from _helpers import assert_matches_oracle, point_strategy, records
from qsengine import Plan
from qsengine.decode.prefill import prefill_ctx_flops, prefill_time
from qsengine.decode.step import StepOptions, step_params
from qsengine.specs.loaders import as_cluster, as_model, as_precision

EXACT = ("dense_model", "q", "qs", "moe_feasible", "moe_plan", "moe_batch", "moe_batch_limit", "moe_tokens_per_s",
         "moe_tpot_ms", "moe_tpot_p99_ms", "dense_feasible", "dense_plan", "dense_batch", "dense_batch_limit",
         "dense_tokens_per_s", "dense_tpot_ms", "dense_tpot_p99_ms", "verdict", "ratio_decode")
CLOSE = ("ratio", "moe_prefill_tokens_per_s_per_gpu", "moe_request_tokens_per_s_per_gpu",
         "dense_prefill_tokens_per_s_per_gpu", "dense_request_tokens_per_s_per_gpu")


def _close(a: float, b: float, rel: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=rel)


requests = point_strategy(
    context=st.one_of(st.sampled_from([1, 2048, 6144, 32768]), st.integers(1, 131072)),
    output=st.one_of(st.sampled_from([0, 1, 2048]), st.integers(1, 65536)),
    prefill=st.sampled_from(["none", "colocated", "disaggregated"]),
    q=st.one_of(st.just("sqrt"), st.floats(1.05, 12.0)),
    routing=st.sampled_from(["uniform", "powerlaw:1.01"]),
    twin_attention=st.sampled_from(["same", "gqa"]),
    batch=st.one_of(st.none(), st.none(), st.sampled_from([1, 48, 256])),
    options=st.sampled_from([None, StepOptions(overlap_comm=True)]),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(requests, min_size=1, max_size=3))
@example(pts=[dict(model="deepseek-v3", cluster="16xh200", context=6144, output=2048, prefill="colocated",
                   microbatches=0, precision="fp8"),
              dict(model="qwen3-235b-a22b", cluster="8xh200", context=6144, output=2048, prefill="disaggregated",
                   microbatches=0, break_even=True),
              dict(model="deepseek-r1", cluster="8xh200", context=4096, output=1024, prefill="colocated",
                   precision="fp8", microbatches=0, plan=Plan(tp=8, ep=8, attn_dp=True))])
@example(pts=[dict(model="gpt-oss-120b", cluster="8xh100", context=20000, output=300, prefill="colocated",
                   microbatches=0, break_even=False),
              dict(model="llama-4-scout", cluster="8xh100", context=20000, output=9000, prefill="disaggregated",
                   microbatches=0, break_even=False)])
def test_pipeline_equals_the_oracle_with_requests(pts):
    """Lanes with and without workloads in one call, each equal to the plain
    computation (decode columns exactly; prefill arithmetic, written twice, to 1e-9)."""
    pts = [{k: v for k, v in p.items() if v is not None or k in ("q", "slo_tpot", "batch")} for p in pts]
    assert_matches_oracle(pts, exact=EXACT, close=CLOSE, q_star_rtol=2e-3)


def _lane(model: str, cluster: str, prec: str, plan: Plan, options: StepOptions | None = None):
    m, c, pr = as_model(model), as_cluster(cluster), as_precision(prec)
    return m, step_params(m, pr, c.accelerator, plan, options), pr, c.accelerator


def test_prefill_closed_form_on_one_gpu():
    """tp = pp = dp = 1, compute-bound at I = 8192: every layer piece is FLOPs / (F·η):
    2·I·(attention + FFN parameters)·L + causal pairs·2·h·(d_qk + d_v)·L; the LM head computes the last
    token's logits only, so it reads its weights: V·d·b_w / (BW·η_bw). (The roofline kernels: the
    calibrated prefill is the oracle's, tests/reference_simulate.py.)"""
    m, p, pr, acc = _lane("llama-3.1-8b", "8xh100", "bf16", Plan(tp=1, dp=8), StepOptions(kernels="roofline"))
    n_tok = 8192.0
    att = m.attention
    flops = (2 * n_tok * (att.params(m.hidden_size) + m.dense_ffn_params) * m.num_layers
             + n_tok * (n_tok + 1) / 2 * 2 * att.num_heads * 2 * att.head_dim * m.num_layers)
    want = (flops / (acc.peak_flops("bf16") * acc.flops_efficiency)
            + m.vocab_size * m.hidden_size * 2 / (acc.hbm_bandwidth * acc.bandwidth_efficiency))
    got = prefill_time(p, np.array([n_tok]), np.array([prefill_ctx_flops(m)]))[0]
    assert got == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("model", ["deepseek-v3", "qwen3-235b-a22b", "grok-1"])
def test_twin_prefill_costs_about_q_times_the_moe(model):
    """Compute-bound (one GPU, no communication, I = 8192 so the MoE's experts are
    past the roofline ridge): a request's prefill of the twin costs ≈ q× the MoE's.
    The shared causal attention (same for both sides) pulls the ratio below q."""
    moe = as_model(model)
    q = 1 / math.sqrt(moe.sparsity)
    twin = moe.dense_twin(q)
    n_tok = np.array([8192.0])
    acc, pr = as_cluster("8xh200").accelerator, as_precision("fp8")

    def ratio(kernels: str) -> float:
        opt = StepOptions(kernels=kernels)  # type: ignore[arg-type]
        t_moe = prefill_time(step_params(moe, pr, acc, Plan(tp=1), opt), n_tok, np.array([prefill_ctx_flops(moe)]))
        t_dense = prefill_time(step_params(twin, pr, acc, Plan(tp=1), opt), n_tok,
                               np.array([prefill_ctx_flops(twin)]))
        return float(t_dense[0] / t_moe[0])

    assert 0.8 * q <= ratio("roofline") <= 1.02 * q, (ratio("roofline"), q)
    # measured kernels: the MoE's grouped GEMMs at prefill sizes (I·k/E tokens per expert) run below the dense
    # GEMMs' efficiency, and the shared attention core runs at bf16, so the twin costs less than q x, still more
    assert 1.0 < ratio("calibrated") < ratio("roofline"), (ratio("calibrated"), ratio("roofline"))


def test_causal_attention_is_quadratic_in_the_prompt():
    m, p, _, acc = _lane("llama-3.1-8b", "8xh100", "bf16", Plan(tp=1, dp=8))
    big = np.array([131072.0, 262144.0])
    t = prefill_time(p, big, np.full(2, prefill_ctx_flops(m)))
    per_token = t / big
    assert 1.7 < per_token[1] / per_token[0] < 2.0  # attention dominates: time per token ~ I


def test_admission_at_the_peak_reads_at_the_mean():
    from qsengine.decode.step import decode_step

    kw = dict(model="qwen3-235b-a22b", cluster="8xh200", precision="fp8", microbatches=0, break_even=False,
              slo_tpot=None)  # each side at its HBM maximum: the batch is the admission's
    res = qsengine.simulate(context=6144, output=2048, **kw)
    peak = qsengine.simulate(context=6144 + 2048, **kw)
    for side, at_peak in ((res.moe, peak.moe), (res.dense, peak.dense)):
        assert side.cluster_batch == at_peak.cluster_batch and side.plan == at_peak.plan  # admitted at I + O
        assert side.packing.admissible_batch == at_peak.packing.admissible_batch
        assert side.step.context == 6144 + (2048 + 1) / 2  # reads the running mean
        want = decode_step(side.model, as_precision("fp8"), as_cluster("8xh200").accelerator, side.plan,
                           side.batch, 6144 + 1024.5,
                           popularity=None)
        assert side.step.time == want.time
        assert side.tokens_per_second > at_peak.tokens_per_second  # reads fewer tokens than at the peak
    rec = res.to_record()
    assert rec["ratio_basis"] == "decode" and rec["ratio"] == rec["ratio_decode"] and rec["why_prefill"] == 1.0


def test_decode_only_is_todays_model():
    """output = 0 with prefill "none" (the defaults) is the decode-only record, column by column."""
    kw = dict(model="deepseek-v3", cluster="16xh200", context=8192, precision="fp8", microbatches=0)
    base, explicit = records([kw, dict(kw, output=0, prefill="none")])
    assert ref.same(base, explicit) == []
    assert base["ratio"] == base["ratio_decode"] and base["why_prefill"] == 1.0 and base["ratio_basis"] == "decode"
    assert math.isnan(base["moe_prefill_tokens_per_s_per_gpu"]) and math.isnan(base["dense_request_tokens_per_s_per_gpu"])
    want = ref.record(**kw)
    assert ref.same({k: want[k] for k in EXACT + ("ratio", "break_even_q")}, base) == []


@pytest.mark.parametrize("model,cluster", [("deepseek-v3", "16xh200"), ("qwen3-235b-a22b", "8xh200"),
                                           ("grok-1", "8xh200"), ("mixtral-8x7b", "8xh100")])
def test_colocated_and_disaggregated_throughput(model, cluster):
    pts = [dict(model=model, cluster=cluster, context=6144, output=2048, prefill=mode, microbatches=0,
                break_even=False) for mode in ("none", "colocated", "disaggregated")]
    none, col, dis = records(pts)
    for s in ("moe", "dense"):
        if not none[f"{s}_feasible"]:
            continue
        dec = none[f"{s}_tokens_per_s_per_gpu"]
        # colocated: prefill takes decode time, never adds throughput
        assert col[f"{s}_request_tokens_per_s_per_gpu"] <= dec * (1 + 1e-12)
        assert col[f"{s}_request_tokens_per_s_per_gpu"] <= col[f"{s}_tokens_per_s_per_gpu"] * (1 + 1e-12)
        # disaggregated: both pools at their best plans, combined harmonically (GPUs of both pools count)
        d, pf = dis[f"{s}_tokens_per_s_per_gpu"], dis[f"{s}_prefill_tokens_per_s_per_gpu"]
        assert d == dec
        assert dis[f"{s}_request_tokens_per_s_per_gpu"] == pytest.approx(1 / (1 / d + (6144 / 2048) / pf), rel=1e-12)
        assert dis[f"{s}_request_tokens_per_s_per_gpu"] >= col[f"{s}_request_tokens_per_s_per_gpu"] * (1 - 1e-12)
        assert pf >= col[f"{s}_prefill_tokens_per_s_per_gpu"] * (1 - 1e-12)
    for r in (col, dis):
        if not math.isnan(r["ratio"]):
            assert r["ratio_basis"] == "end-to-end"
            assert r["ratio"] == pytest.approx(r["dense_request_tokens_per_s_per_gpu"]
                                               / r["moe_request_tokens_per_s_per_gpu"], rel=1e-12)
            assert r["ratio"] == pytest.approx(r["ratio_decode"] * r["why_prefill"], rel=1e-12)


def test_end_to_end_favours_the_moe_through_prefill():
    """The twin's prefill costs ~q× the MoE's: counting it lowers the dense/MoE ratio (DeepSeek-V3, 6K in / 2K out)."""
    rec = records([dict(model="deepseek-v3", cluster="16xh200", context=6144, output=2048, prefill="colocated",
                         microbatches=0, break_even=False)])[0]
    assert rec["ratio"] < rec["ratio_decode"] and rec["why_prefill"] < 1


def test_summary_says_which_ratio():
    res = qsengine.simulate("qwen3-235b-a22b", "8xh200", 6144, output=2048, prefill="colocated", microbatches=0,
                            break_even=False)
    text = res.summary()
    assert "end-to-end" in text and "decode only" in text and "6,144 in / 2,048 out" in text
    plain = qsengine.simulate("qwen3-235b-a22b", "8xh200", 6144, microbatches=0, break_even=False).summary()
    assert "ratio dense/MoE (decode only)" in plain


def test_sweep_takes_the_workload_fields():
    pts = [dict(model="qwen3-30b-a3b", cluster="8xh100", context=4096, output=o, prefill=m, microbatches=0,
                break_even=False) for o, m in ((0, "none"), (1024, "none"), (1024, "colocated"),
                                               (1024, "disaggregated"))]
    df = qsengine.sweep(pts, progress=False, seed=1)
    assert list(df["prefill"]) == ["none", "none", "colocated", "disaggregated"]
    assert list(df["ratio_basis"]) == ["decode", "decode", "end-to-end", "end-to-end"]
    for i, p in enumerate(pts):
        rec = qsengine.simulate(**p).to_record()
        for k, v in rec.items():
            assert df[k][i] == v or (isinstance(v, float) and math.isnan(v) and math.isnan(df[k][i])), (k, p)


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(output=-1), ValueError, r"field 'output' = -1: must be >= 0"),
    (dict(output=1.5), TypeError, r"field 'output' = 1.5: must be an int"),
    (dict(output=True), TypeError, r"field 'output' = True: must be an int"),
    (dict(output=2**54), ValueError, r"field 'output' = 18014398509481984: must be >= 0 .* <= 2\^53"),
    (dict(prefill="both", output=10), ValueError, r"field 'prefill' = 'both': must be one of \['none', "),
    (dict(prefill=1, output=10), TypeError, r"field 'prefill' = 1: must be one of"),
    (dict(prefill="colocated"), ValueError, r"fields 'prefill' = 'colocated' and 'output' = 0: .*output >= 1"),
])
def test_bad_workloads_are_refused(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        qsengine.simulate("qwen3-30b-a3b", "8xh100", 4096, microbatches=0, **kw)
    with pytest.raises(exc, match="grid.*" + msg):
        qsengine.sweep([dict(model="qwen3-30b-a3b", cluster="8xh100", context=4096, microbatches=0, **kw)],
                       progress=False)


def test_peak_cache_beyond_max_context_warns():
    with pytest.warns(qsengine.ContextWarning, match="'context' = 30000 and 'output' = 4000: the peak cache"):
        qsengine.simulate("mixtral-8x7b", "8xh100", 30000, output=4000, microbatches=0, break_even=False)


def test_monte_carlo_point_with_a_workload():
    res = qsengine.simulate("qwen3-30b-a3b", "8xh100", 4096, output=1024, prefill="colocated", microbatches=200,
                            seed=1, break_even=False)
    rec = res.to_record()
    assert rec["mc_microbatches"] == 200 and res.moe.step.context == 4096 + 512.5
    d, pf = rec["moe_tokens_per_s_per_gpu"], rec["moe_prefill_tokens_per_s_per_gpu"]
    assert rec["moe_request_tokens_per_s_per_gpu"] == pytest.approx(1 / (1 / d + 4 / pf), rel=1e-12)
