"""Per-component numeric formats (issue #14 items 1 and 3): the EP all-to-all's
dispatch and combine in their own formats, the routed experts' own compute
dtype; presets as engines deploy them, bad input named, and the step model's
all-to-all and expert pieces against closed forms."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qsengine
from qsengine import Plan, Precision, SpecError, as_cluster, as_model, as_precision
from qsengine.decode import kernels as K
from qsengine.decode.params import StepOptions, step_params
from qsengine.decode.step import decode_step
from qsengine.specs.precision import FP8_TOKEN_GROUP_BYTES, NVFP4_BYTES, PRESETS

ROOF = StepOptions(kernels="roofline")


def test_presets_move_the_all_to_all_as_engines_do():
    fp8 = PRESETS["fp8"]
    assert fp8.dispatch_bytes == 1.0 + 4.0 / 128 == FP8_TOKEN_GROUP_BYTES  # DeepEP: fp8 + fp32 scale per 128
    assert fp8.combine_bytes == 2.0  # bf16 combine
    assert PRESETS["fp4"].dispatch_bytes == NVFP4_BYTES == 0.5625  # TensorRT-LLM post-quant all-to-all
    for name in ("bf16", "mxfp4-experts", "int8"):  # activations stay bf16
        p = PRESETS[name]
        assert p.dispatch_bytes == p.combine_bytes == p.activation_bytes == 2.0
    nv = PRESETS["nvfp4-experts"]
    assert (nv.compute, nv.expert_compute, nv.expert_bytes, nv.weight_bytes) == ("fp8", "fp4", NVFP4_BYTES,
                                                                                PRESETS["fp8"].weight_bytes)
    for p in PRESETS.values():  # every preset states its experts' compute dtype
        assert p.expert_compute in ("bf16", "fp8", "fp4", "int8")


def test_defaults_follow_activation_and_compute():
    p = Precision(weight_bytes=1.0, expert_bytes=1.0, kv_bytes=1.0, activation_bytes=1.5, compute="fp8", name="x")
    assert (p.dispatch_bytes, p.combine_bytes, p.expert_compute) == (1.5, 1.5, "fp8")
    # explicit values equal to the defaults give an equal (and equally hashed) spec
    q = Precision(weight_bytes=1.0, expert_bytes=1.0, kv_bytes=1.0, activation_bytes=1.5, compute="fp8", name="x",
                  dispatch_bytes=1.5, combine_bytes=1.5, expert_compute="fp8")
    assert p == q and hash(p) == hash(q)


@pytest.mark.parametrize("kwargs, field", [
    (dict(dispatch_bytes=-1.0), "dispatch_bytes"),
    (dict(combine_bytes=float("nan")), "combine_bytes"),
    (dict(dispatch_bytes=9.0), "dispatch_bytes"),
    (dict(expert_compute="fp9"), "expert_compute"),
    # 1-byte experts cannot run as fp4 (0.5 B + at most 1/8 of scales)
    (dict(expert_bytes=1.0, weight_bytes=1.0, compute="fp8", expert_compute="fp4"), "expert_bytes"),
])
def test_bad_formats_are_named(kwargs, field):
    with pytest.raises((SpecError, TypeError)) as e:
        Precision(name="bad", **kwargs)
    assert f"'{field}'" in str(e.value)


def test_nvfp4_experts_pick_their_own_kernels():
    nv = as_precision("nvfp4-experts")
    assert K.kernel_dtypes(nv) == {"gemm": "fp8_block", "grouped_gemm": "nvfp4", "attention": "fp8"}
    assert K.kernel_dtypes(as_precision("fp8"))["grouped_gemm"] == "fp8_block"
    # roofline kernels: the routed experts' FLOPs at the fp4 peak (fp8's where the accelerator has none),
    # every other matmul at the fp8 peak
    m, plan = as_model("deepseek-v3"), Plan(tp=8, ep=8)
    b200 = qsengine.as_accelerator("b200")
    assert b200.peak_flops("fp4") > b200.peak_flops("fp8")  # the test can tell the two apart
    for acc_name in ("b200", "h200-sxm"):
        acc = qsengine.as_accelerator(acc_name)
        p = step_params(m, nv, acc, plan, ROOF)
        want = 2.0 * m.expert_params / plan.expert_tp / (acc.peak_flops("fp4") * acc.flops_efficiency)
        assert float(p.moe_b[0]) == pytest.approx(want, rel=1e-12)
        assert float(p.flops[0]) == pytest.approx(acc.peak_flops("fp8") * acc.flops_efficiency, rel=1e-12)


def _ep_piece(model, cluster, prec, plan, batch, ctx, options=ROOF):
    st_ = decode_step(as_model(model), prec, as_cluster(cluster).accelerator, plan, batch, ctx, options=options)
    return next(p for p in st_.pieces if p.name == "ep all-to-all"), st_


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["deepseek-v3", "qwen3-235b-a22b", "mixtral-8x7b"]),
       st.sampled_from(["8xh200", "16xh100", "8xmi300x"]),
       st.floats(0.25, 4.0), st.floats(0.25, 4.0), st.integers(1, 512), st.sampled_from([2, 4, 8]))
def test_all_to_all_is_dispatch_plus_combine(model, cluster, disp, comb, batch, ep):
    """Link model (roofline kernels): the all-to-all's bytes are (b_disp + b_comb)
    per element, and its time less two latencies is linear in them."""
    c = as_cluster(cluster)
    plan = Plan(tp=ep, ep=ep, dp=c.num_gpus // ep)
    base = Precision(1.0, 1.0, 1.0, 2.0, "fp8", "base")
    new = dataclasses.replace(base, dispatch_bytes=disp, combine_bytes=comb, name="new")
    p0, s0 = _ep_piece(model, cluster, base, plan, batch, 4096)
    p1, s1 = _ep_piece(model, cluster, new, plan, batch, 4096)
    layers = as_model(model).decode_moe_layers
    lat = 2 * layers * ROOF.collective_latency
    assert p1.bytes == pytest.approx(p0.bytes * (disp + comb) / 4.0, rel=1e-12)
    assert p1.time - lat == pytest.approx((p0.time - lat) * (disp + comb) / 4.0, rel=1e-9)
    # nothing else moves
    others0 = {p.name: p.time for p in s0.pieces if p.name != "ep all-to-all"}
    others1 = {p.name: p.time for p in s1.pieces if p.name != "ep all-to-all"}
    assert others0 == others1


def test_fitted_all_to_all_takes_each_half_at_its_size():
    """Calibrated kernels inside NVLink: dispatch and combine are two fitted
    calls at their own message sizes (the runtime's alltoall_time)."""
    from qsengine.calibration import runtime as rt

    m, c = as_model("deepseek-v3"), as_cluster("8xh200")
    plan, batch = Plan(tp=8, ep=8), 64
    fp8 = as_precision("fp8")
    piece, _ = _ep_piece("deepseek-v3", "8xh200", fp8, plan, batch, 4096, options=StepOptions())
    elems = batch / 8 * m.top_k * m.hidden_size  # tokens_src · k · d
    want = sum(float(np.asarray(rt.alltoall_time(c.accelerator, 8, elems * b))) for b in (fp8.dispatch_bytes,
                                                                                           fp8.combine_bytes))
    assert piece.time == pytest.approx(m.decode_moe_layers * want, rel=1e-12)


def test_fp8_dispatch_speeds_the_moe_and_leaves_the_twin():
    """The fp8 preset's fp8 dispatch makes an EP-bound MoE faster than the same
    preset with a bf16 dispatch; a dense twin (no EP) is unchanged."""
    fp8 = as_precision("fp8")
    bf = dataclasses.replace(fp8, dispatch_bytes=2.0, name="fp8, bf16 dispatch")
    kw = dict(model="deepseek-v3", cluster="16xh200", context=8192, q=4.0, microbatches=0, slo_tpot=None,
              plan=Plan(tp=8, ep=16, dp=2, attn_dp=True), break_even=False)
    a = qsengine.simulate(precision=fp8, **kw)
    b = qsengine.simulate(precision=bf, **kw)
    assert a.moe.tokens_per_second > b.moe.tokens_per_second
    assert a.dense.tokens_per_second == b.dense.tokens_per_second
