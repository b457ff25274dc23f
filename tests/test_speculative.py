"""Speculative decoding with an MTP / draft module (docs/model.md, "Speculative
decoding"): the specs, the point fields, the packing of the draft module, the
step model's verify and draft passes (calibrated and roofline kernels, every
overlap), and the pipeline against the slow reference
(tests/reference_simulate.py: a scalar verify pass of d + 1 rows and a
one-block draft model, written independently of qsengine.decode.step)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import qsengine
import reference_simulate as ref
from _helpers import point_strategy, records
from qsengine import Plan, StepOptions
from qsengine.decode.step import StepParams, accepted_tokens, decode_step, step_params, step_time
from qsengine.packing import pack
from qsengine.specs.loaders import as_cluster, as_model, as_precision, load_model

DATA = Path(__file__).parent / "data" / "hf"
MOE_MODELS = ["deepseek-v3", "qwen3-235b-a22b", "grok-1", "switch-c-2048", "qwen3-30b-a3b", "mixtral-8x7b",
              "gpt-oss-120b", "llama-4-scout"]
OPTIONS = [None, None, StepOptions(overlap="tbo"), StepOptions(kernels="roofline"), StepOptions(overlap="full"),
           StepOptions(kernels="roofline", overlap="tbo")]


def _valid(p) -> bool:
    """A valid point whose explicit plan (if any) fits the model's shape (heads, experts, layers)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", qsengine.ContextWarning)
            pt = qsengine.Point.make(strict=False, **p)
            if isinstance(pt.plan, Plan):
                pack(pt.model, pt.cluster, 1, plan=pt.plan, precision=pt.precision)
        return True
    except ValueError:
        return False


# ------------------------------------------------------------------ specs
def test_hf_config_reads_num_nextn_predict_layers(tmp_path):
    assert load_model(DATA / "deepseek-v3.json").mtp_layers == 1
    assert load_model(DATA / "qwen3-235b-a22b.json").mtp_layers == 0  # the key is absent
    cfg = json.loads((DATA / "deepseek-v3.json").read_text())
    cfg["num_nextn_predict_layers"] = 2
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_model(tmp_path / "config.json").mtp_layers == 2
    for bad in (-1, 1.5, "one"):
        cfg["num_nextn_predict_layers"] = bad
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        with pytest.raises((ValueError, TypeError), match="num_nextn_predict_layers"):
            load_model(tmp_path / "config.json")


def test_mtp_module_is_outside_the_counted_parameters():
    m = as_model("deepseek-v3")
    assert m.mtp_layers == 1 and as_model("deepseek-r1").mtp_layers == 1
    without = m.replace(mtp_layers=0)
    assert (without.total_params, without.active_params, without.sparsity) == (m.total_params, m.active_params,
                                                                               m.sparsity)
    # HF checkpoint 685B = 671B main + 14B MTP, the 14B holding its own copies of the embedding and head
    # (reference/SOURCES.md); both published figures are rounded to 1B
    assert abs(m.mtp_params + m.embedding_params + m.lm_head_params - 14e9) <= 1e9
    # one block of the model's kind: for a dense model its dense layer, attention and norms + 2d^2 + 3d
    d = as_model("llama-3.1-8b")
    h = d.hidden_size
    assert d.mtp_layers == 0 and d.mtp_params == 0
    assert d.mtp_module_params == d.attention_params + d.dense_ffn_params + 2 * h + 2 * h * h + 3 * h
    with pytest.raises(ValueError, match="mtp_layers"):
        m.replace(mtp_layers=-1)
    assert qsengine.Model.from_toml(m.to_toml()) == m  # round trip keeps mtp_layers


# ------------------------------------------------------------------ inputs
@pytest.mark.parametrize("kw, exc, match", [
    (dict(draft_tokens=-1), ValueError, "field 'draft_tokens' = -1: must be in"),
    (dict(draft_tokens=1.0), TypeError, "field 'draft_tokens' = 1.0: must be an int"),
    (dict(draft_tokens=True), TypeError, "field 'draft_tokens' = True"),
    (dict(draft_tokens=99), ValueError, "field 'draft_tokens' = 99"),
    (dict(draft_tokens=1, acceptance=1.2), ValueError, "field 'acceptance' = 1.2: must be in \\[0, 1\\]"),
    (dict(draft_tokens=1, acceptance=float("nan")), ValueError, "field 'acceptance' = nan"),
    (dict(draft_tokens=1, acceptance="0.8"), TypeError, "field 'acceptance' = '0.8'"),
    (dict(options=StepOptions(draft_tokens=1)), ValueError, "point fields 'draft_tokens' and 'acceptance'"),
])
def test_bad_speculation_is_refused(kw, exc, match):
    with pytest.raises(exc, match=match):
        qsengine.simulate("deepseek-v3", "8xh200", 4096, microbatches=0, **kw)


def test_bad_step_options_are_refused():
    with pytest.raises(ValueError, match="field 'StepOptions.draft_tokens' = -2"):
        StepOptions(draft_tokens=-2)
    with pytest.raises(ValueError, match="field 'StepOptions.acceptance' = -0.1"):
        StepOptions(draft_tokens=1, acceptance=-0.1)
    with pytest.raises(ValueError, match="grid: field 'acceptance' = 2"):
        qsengine.sweep({"model": ["deepseek-v3"], "cluster": ["8xh200"], "context": [4096], "microbatches": [0],
                        "draft_tokens": [1], "acceptance": [0.5, 2]})


# ------------------------------------------------------------------ closed forms
@given(st.integers(0, 16), st.floats(0.0, 1.0))
def test_accepted_tokens_is_the_geometric_sum(d, a):
    want = sum(a ** i for i in range(d + 1))
    assert float(accepted_tokens(d, a)) == pytest.approx(want, rel=1e-12)
    assert 1.0 <= float(accepted_tokens(d, a)) <= d + 1


def test_draft_module_hbm_is_one_block_and_its_kv():
    """Under pure tensor parallelism every weight is split evenly over the GPUs, so the cluster holds
    exactly one more module (block + projection + norms); each sequence caches one more layer."""
    for name in ("deepseek-v3", "qwen3-235b-a22b", "llama-3.1-70b"):
        m, c = as_model(name), as_cluster("8xh200")
        plan = Plan(tp=8)
        a = pack(m, c, 8192, plan=plan, precision="bf16")
        b = pack(m, c, 8192, plan=plan, precision="bf16", draft_module=True)
        cols = [k for k in a.gpu_map.columns if k in qsengine.packing.COMPONENTS]
        extra = float(b.gpu_map[cols].to_numpy().sum() - a.gpu_map[cols].to_numpy().sum())
        assert extra == pytest.approx(m.mtp_module_params * 2.0, rel=1e-12), name
        kv_seq = m.kv_bytes_per_sequence(8192, 2.0) * (m.decode_layers + 1 - m.attention.local_layers) / (
            m.decode_layers - m.attention.local_layers) if not m.attention.local_layers else None
        if kv_seq is not None and b.admissible_batch > 0:
            per_gpu = float(b.gpu_map["kv"].iloc[0]) / b.admissible_batch
            assert per_gpu == pytest.approx(kv_seq / (1 if m.attention.kind == "mla" else min(8, m.attention.num_kv_heads)), rel=1e-9), name
    with pytest.raises(TypeError, match="draft_module"):
        pack("deepseek-v3", "8xh200", 8192, draft_module=1)


# ------------------------------------------------------------------ the step
@pytest.mark.parametrize("kernels", ["calibrated", "roofline"])
@pytest.mark.parametrize("overlap", ["none", "tbo", "full"])
@pytest.mark.parametrize("name, plan", [("deepseek-v3", Plan(tp=8, ep=8)), ("deepseek-v3", Plan(tp=8, ep=8, attn_dp=True)),
                                        ("llama-3.1-70b", Plan(tp=4, pp=2)), ("llama-3.1-70b", Plan(tp=8, attn_dp=True))])
def test_step_bounds_and_d0_identity(kernels, overlap, name, plan):
    m, c, pr = as_model(name), as_cluster("8xh200"), as_precision("fp8")
    opt = StepOptions(kernels=kernels, overlap=overlap)
    base = decode_step(m, pr, c.accelerator, plan, 64, 32768, options=opt)
    same = decode_step(m, pr, c.accelerator, plan, 64, 32768, options=StepOptions(kernels=kernels, overlap=overlap,
                                                                                  acceptance=0.7))
    assert same == base  # d = 0: acceptance is ignored, bit for bit
    for d in (1, 2, 3):
        zero = decode_step(m, pr, c.accelerator, plan, 64, 32768,
                           options=StepOptions(kernels=kernels, overlap=overlap, draft_tokens=d))
        full = decode_step(m, pr, c.accelerator, plan, 64, 32768,
                           options=StepOptions(kernels=kernels, overlap=overlap, draft_tokens=d, acceptance=1.0))
        assert zero.time > base.time and zero.time_p99 > base.time_p99  # acceptance 0: only the costs
        assert full.time >= base.time / (d + 1)  # at most (d+1)x
        assert full.time * (d + 1) == pytest.approx(zero.time, rel=1e-12)
        names = [p.name for p in zero.pieces]
        assert "draft: mtp projection" in names and "draft: lm head" in names
        assert ("draft: routed experts (straggler)" in names) == m.is_moe
        assert "draft: pp send" not in names  # the draft module sits on the last stage
        if overlap == "none":  # pieces are per accepted token like the time, and sum to it
            assert sum(p.time for p in full.pieces) == pytest.approx(full.time, rel=1e-12)
        assert zero.moe_tokens == pytest.approx(base.moe_tokens * (d + 1), rel=1e-12)


def test_lanes_with_and_without_drafts_are_independent():
    """Mixing d = 0 and d > 0 lanes in one step_time call changes neither (d = 0 bit for bit)."""
    m, c, pr = as_model("qwen3-235b-a22b"), as_cluster("8xh200"), as_precision("fp8")
    plan = Plan(tp=8, ep=8)
    lanes = [step_params(m, pr, c.accelerator, plan, StepOptions(draft_tokens=d, acceptance=0.8, kernels=k))
             for d in (0, 2) for k in ("calibrated", "roofline")]
    both = step_time(StepParams.stack(lanes), np.full(4, 96.0), np.full(4, 8192.0))
    for i, p in enumerate(lanes):
        alone = step_time(p, np.array([96.0]), np.array([8192.0]))
        assert both.time[i] == alone.time[0] and both.p99[i] == alone.p99[0]


# ------------------------------------------------------------------ the pipeline
spec_points = point_strategy(
    model=st.sampled_from(MOE_MODELS),
    context=st.one_of(st.sampled_from([1, 4096, 32768, 131072]), st.integers(1, 200000)),
    routing=st.sampled_from(["uniform", "powerlaw:1.01"]),
    break_even=st.just(False),  # q* (dozens of reference sides per point) in the explicit examples
    batch=st.one_of(st.none(), st.none(), st.sampled_from([1, 8, 64, 256])),
    options=st.sampled_from(OPTIONS),
    draft_tokens=st.sampled_from([1, 1, 2, 3]),
    acceptance=st.one_of(st.sampled_from([0.0, 0.85, 1.0]), st.floats(0.0, 1.0)),
)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(spec_points, min_size=1, max_size=2))
@example(pts=[dict(model="deepseek-v3", cluster="8xh200", context=32768, microbatches=0, draft_tokens=1,
                   acceptance=0.85, plan=Plan(tp=8, ep=8, attn_dp=True)),
              dict(model="qwen3-235b-a22b", cluster="16xh100", context=4096, dense="llama-3.1-70b",
                   microbatches=0, draft_tokens=2, acceptance=0.6, slo_tpot=0.03)])
@example(pts=[dict(model="qwen3-30b-a3b", cluster="8xh100", context=8192, microbatches=0, draft_tokens=3,
                   acceptance=0.7, options=StepOptions(overlap="tbo"), plan=Plan(tp=4, pp=2, ep=4), break_even=False),
              dict(model="mixtral-8x7b", cluster="8xa100", context=2048, microbatches=0, draft_tokens=1,
                   acceptance=0.9, options=StepOptions(kernels="roofline"), slo_tpot=None, break_even=False)])
@example(pts=[dict(model="deepseek-v3", cluster="8xh200", context=16384, microbatches=0, draft_tokens=2,
                   acceptance=0.8, routing="powerlaw:1.01", plan=Plan(tp=2, dp=4, ep=8, redundant=8),
                   options=StepOptions(overlap="full"), break_even=False),
              dict(model="qwen3-235b-a22b", cluster="8xh200", context=4096, microbatches=0, draft_tokens=1,
                   acceptance=0.85, batch=64, options=StepOptions(kernels="roofline", overlap="tbo"),
                   plan=Plan(tp=4, pp=2, ep=4), break_even=False)])
def test_speculative_pipeline_equals_the_slow_reference(pts):
    """The reference builds the verify pass as a scalar calibrated step of d + 1 rows per sequence (roofline:
    a plain step of B(d+1) sequences with the KV bytes divided by d + 1) and the draft pass from a one-layer
    model: the same physics written another way, so floats agree to rounding (1e-9), not bit for bit."""
    pts = [p for p in pts if _valid(p)]
    if not pts:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qsengine.ContextWarning)
        got = records(pts)
        for p, g in zip(pts, got):
            assert ref.same(ref.record(**p), g) == [], p


def _side_tps(recs):
    return np.array([[r["moe_tokens_per_s"], r["dense_tokens_per_s"]] for r in recs])


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(spec_points, min_size=1, max_size=3))
def test_acceptance_bounds_the_gain(pts):
    """Acceptance 0: no speedup, only the draft module's HBM and time (throughput <= without);
    full acceptance with d drafts: at most (d+1)x (without a TPOT target); d = 0 is today's record
    exactly, whatever the acceptance."""
    pts = [dict(p, break_even=False) for p in pts if _valid(p)]
    if not pts:
        return
    off = records([dict(p, draft_tokens=0, acceptance=0.0) for p in pts])
    plain = records([{k: v for k, v in p.items() if k not in ("draft_tokens", "acceptance")} for p in pts])
    for want, got in zip(plain, records([dict(p, draft_tokens=0) for p in pts])):
        assert ref.same({k: v.item() if isinstance(v, np.generic) else v for k, v in want.items()},
                        {k: v.item() if isinstance(v, np.generic) else v for k, v in got.items()}, rtol=0.0) == []
    zero = records([dict(p, acceptance=0.0) for p in pts])
    full = records([dict(p, acceptance=1.0) for p in pts])
    d = np.array([[p["draft_tokens"]] * 2 for p in pts], dtype=float)
    t_off, t_zero, t_full = _side_tps(off), _side_tps(zero), _side_tps(full)
    assert np.all(t_zero <= t_off * (1 + 1e-12))
    # at most (d+1)x at the HBM-maximum batch; under a TPOT target speculation may admit a larger batch (or
    # make a side feasible at all), since it lowers the TPOT: the bound is the throughput at the same target
    free = np.array([p.get("slo_tpot", 0.05) is None for p in pts])
    assert np.all(t_full[free] <= (d + 1)[free] * t_off[free] * (1 + 1e-12))


def test_monte_carlo_routes_the_verify_rows():
    """The routing Monte Carlo of a speculative point routes B(d+1) tokens per EP group and agrees with
    the closed form (uniform routing) to its standard error."""
    kw = dict(model="qwen3-235b-a22b", cluster="8xh200", context=8192, precision="fp8", plan=Plan(tp=8, ep=8),
              break_even=False, draft_tokens=2, acceptance=0.7, slo_tpot=None)
    cf = qsengine.simulate(microbatches=0, **kw)
    mc = qsengine.simulate(microbatches=400, seed=3, **kw)
    assert mc.moe.batch == cf.moe.batch
    assert mc.moe.step.moe_tokens == cf.moe.step.moe_tokens == pytest.approx(cf.moe.batch * 3)
    assert mc.moe.tokens_per_second == pytest.approx(cf.moe.tokens_per_second, rel=0.02)
    assert math.isclose(mc.moe.step.time, cf.moe.step.time, rel_tol=0.02)


def test_summary_states_the_speculation():
    """A result computed with drafts says so in its settings line (and one without says there are none)."""
    kw = dict(model="qwen3-30b-a3b", cluster="8xh100", context=4096, microbatches=0, break_even=False)
    spec = qsengine.simulate(**kw, draft_tokens=2, acceptance=0.7)
    assert "speculative decoding: 2 draft token(s) per step at acceptance 0.7" in spec.summary()
    assert "no speculative decoding" in qsengine.simulate(**kw).settings_line()
