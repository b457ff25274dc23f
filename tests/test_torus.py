"""TPU tori in the EP all-to-all (issue #14, item 3; docs/model.md "Torus all-to-all").

* the closed form ``torus_alltoall_factor`` equals an explicit dimension-ordered
  routing of every (source, destination) pair's bytes on small tori and meshes
  (the maximum directed-link load over the link bandwidth);
* switch accelerators are bit-identical to the code before tori (pinned records);
* the step model's EP all-to-all piece on a torus is the crossbar's times the
  factor (link model) or the larger of the fit and the torus (calibrated);
* TPU points equal the slow oracle (tests/reference_simulate.py writes the
  bisection argument again, scalar);
* bad topology specs are refused with the field, the value and the rule.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

import qsengine
import reference_simulate as ref
from _helpers import records
from qsengine import Plan, SpecError
from qsengine.decode.kernels import torus_alltoall_factor, torus_shape
from qsengine.specs.loaders import accelerators, as_accelerator, as_cluster, load_accelerator

# ------------------------------------------------------------ routing reference


def routed_max_load(shape: tuple[int, ...], wraparound: bool, ties: str = "split") -> float:
    """The largest load (bytes) on any directed link when every chip of a torus
    (or mesh, without wraparound) of ``shape`` sends one byte to every other
    chip by dimension-ordered routing: dimension 0 first, then 1, ...; on a
    ring the shorter way round; a tie (distance k/2) split evenly between both
    ways (``ties="split"``) or always the + way (``"plus"``)."""
    load: dict[tuple[tuple[int, ...], int, int], float] = {}

    def walk(cur: list[int], dim: int, step: int, hops: int, weight: float) -> None:
        k = shape[dim]
        for _ in range(hops):
            key = (tuple(cur), dim, step)
            load[key] = load.get(key, 0.0) + weight
            cur[dim] = (cur[dim] + step) % k

    nodes = list(itertools.product(*(range(k) for k in shape)))
    for src in nodes:
        for dst in nodes:
            if src == dst:
                continue
            cur = list(src)
            for dim, k in enumerate(shape):
                if cur[dim] == dst[dim]:
                    continue
                if not wraparound:  # a line: one way only
                    delta = dst[dim] - cur[dim]
                    walk(cur, dim, 1 if delta > 0 else -1, abs(delta), 1.0)
                    continue
                fwd = (dst[dim] - cur[dim]) % k
                if 2 * fwd < k:
                    walk(cur, dim, 1, fwd, 1.0)
                elif 2 * fwd > k:
                    walk(cur, dim, -1, k - fwd, 1.0)
                elif ties == "split":
                    walk(list(cur), dim, 1, fwd, 0.5)
                    walk(cur, dim, -1, fwd, 0.5)
                else:
                    walk(cur, dim, 1, fwd, 1.0)
                cur[dim] = dst[dim]
            assert tuple(cur) == dst
    return max(load.values())


def routed_factor(shape: tuple[int, ...], wraparound: bool, ties: str = "split") -> float:
    """Routed all-to-all time over the crossbar time: one byte per pair, so a
    chip sends g - 1 bytes (crossbar: (g - 1)/W); a link carries W/(2D) one way."""
    g, dims = math.prod(shape), len(shape)
    return routed_max_load(shape, wraparound, ties) * 2 * dims / (g - 1)


@pytest.mark.parametrize("chips,dims", [(16, 2), (64, 2), (12, 2), (9, 2), (8, 3), (27, 3), (32, 3), (64, 3),
                                        (16, 3), (6, 1), (7, 1)])
@pytest.mark.parametrize("wraparound", [True, False])
def test_closed_form_equals_dimension_ordered_routing(chips, dims, wraparound):
    shape = torus_shape(chips, dims)
    assert math.prod(shape) == chips and len(shape) == dims
    got = torus_alltoall_factor(chips, dims, wraparound)
    assert got == pytest.approx(routed_factor(shape, wraparound), rel=1e-12)


def test_shapes_are_the_most_cubic_slices():
    assert torus_shape(64, 3) == (4, 4, 4)
    assert torus_shape(32, 3) == (4, 4, 2)
    assert torus_shape(8, 3) == (2, 2, 2)
    assert torus_shape(128, 3) == (8, 4, 4)
    assert torus_shape(256, 2) == (16, 16)
    assert torus_shape(12, 2) == (4, 3)
    assert torus_shape(7, 3) == (7, 1, 1)
    for g, dims in itertools.product(range(1, 49), (1, 2, 3)):  # no shorter longest side (brute force)
        best = min(max(s) for s in itertools.product(range(1, g + 1), repeat=dims) if math.prod(s) == g)
        assert torus_shape(g, dims)[0] == best


def test_factor_values_and_what_wraparound_and_ties_cost():
    # cube of side k, D dims, wraparound: D·g·floor(k²/4) / (k·(g - 1)) ~ D·k/4
    assert torus_alltoall_factor(64, 3) == pytest.approx(3 * 64 * 4 / (4 * 63))
    assert torus_alltoall_factor(256, 2) == pytest.approx(2 * 256 * 64 / (16 * 255))
    assert torus_alltoall_factor(1, 3) == 1.0
    for chips, dims in ((16, 2), (64, 3), (8, 3)):  # a mesh has half the bisection links
        assert torus_alltoall_factor(chips, dims, False) == pytest.approx(2 * torus_alltoall_factor(chips, dims))
    # ties always taken the + way: the + links carry k/4 more per ring, a bound 1 + 2/k above the split
    for shape in ((8, 8), (4, 4, 4)):
        k = shape[0]
        assert routed_factor(shape, True, "plus") == pytest.approx((1 + 2 / k) * routed_factor(shape, True))


def test_bisection_bandwidth_of_a_v6e_pod_is_googles():
    """Google lists 3.2 TB/s bisection bandwidth per v6e pod (16x16,
    https://docs.cloud.google.com/tpu/docs/v6e): 2·16 links across the cut,
    each of the chip's one-way 400 GB/s over its 4 links."""
    a = as_accelerator("tpu-v6e")
    k = torus_shape(a.scaleup_domain, a.torus_dims)[0]
    links = 2 * a.scaleup_domain // k
    assert links * a.scaleup_bandwidth / (2 * a.torus_dims) == pytest.approx(3.2e12)


# ------------------------------------------------------------------------- spec


def test_shipped_topologies():
    v5p, v6e = as_accelerator("tpu-v5p"), as_accelerator("tpu-v6e")
    assert (v5p.scaleup_topology, v5p.torus_dims, v5p.torus_wraparound) == ("torus", 3, 64)
    assert (v6e.scaleup_topology, v6e.torus_dims, v6e.torus_wraparound) == ("torus", 2, 256)
    for name in accelerators():
        a = as_accelerator(name)
        if not a.id.startswith("tpu"):
            assert (a.scaleup_topology, a.torus_dims, a.torus_wraparound) == ("switch", None, None), name


def test_show_prints_the_topology():
    from qsengine.specs.cli import show_accelerator

    assert "torus, 3D (wraparound from 64 chips)" in show_accelerator(as_accelerator("tpu-v5p"))
    assert "scale-up topology     switch" in show_accelerator(as_accelerator("h200"))


@pytest.mark.parametrize("change,field,message", [
    (dict(scaleup_topology="tours"), "scaleup_topology", "'tours': must be one of ['switch', 'torus']"),
    (dict(torus_dims=0), "torus_dims", "0: must be positive"),
    (dict(torus_dims=-2), "torus_dims", "-2: must be positive"),
    (dict(torus_dims=None), "torus_dims", "None: a torus needs its number of dimensions"),
    (dict(torus_wraparound=0), "torus_wraparound", "0: must be positive"),
    (dict(scaleup_topology="switch"), "torus_dims", "3: only for scaleup_topology = 'torus'"),
])
def test_bad_topology_names_field_value_and_rule(change, field, message):
    with pytest.raises(SpecError) as e:
        dataclasses.replace(as_accelerator("tpu-v5p"), **change)
    assert f"Accelerator 'tpu-v5p': field '{field}' = {message}" in str(e.value)


def test_bad_topology_in_a_file_names_the_file(tmp_path):
    text = (Path(qsengine.specs.loaders.spec_dir()) / "accelerators" / "tpu-v6e.toml").read_text()
    bad = tmp_path / "my-tpu.toml"
    bad.write_text(text.replace('scaleup_topology = "torus"', 'scaleup_topology = "ring"'))
    with pytest.raises(SpecError, match=r"my-tpu.toml: field 'scaleup_topology' = 'ring': must be one of"):
        load_accelerator(bad)
    bad.write_text(text.replace("torus_dims = 2\n", "torus_dims = 2.5\n"))
    with pytest.raises(TypeError, match=r"my-tpu.toml: field 'torus_dims' = 2.5: must be an integer"):
        load_accelerator(bad)


# ----------------------------------------------------------------- step model


def _switch(cluster: str) -> qsengine.Cluster:
    """The cluster with its accelerator's scale-up taken as a crossbar."""
    c = as_cluster(cluster)
    acc = dataclasses.replace(c.accelerator, scaleup_topology="switch", torus_dims=None, torus_wraparound=None)
    return dataclasses.replace(c, accelerator=acc)


def _ep_piece(cluster, plan, options):
    from qsengine.decode.step import decode_step

    c = cluster if isinstance(cluster, qsengine.Cluster) else as_cluster(cluster)
    m = qsengine.specs.loaders.as_model("qwen3-235b-a22b")
    st = decode_step(m, qsengine.specs.loaders.as_precision("bf16"), c.accelerator, plan, 256, 8192, options=options)
    (piece,) = [p for p in st.pieces if p.name == "ep all-to-all"]
    return piece.time, m.decode_moe_layers


@pytest.mark.parametrize("cluster,plan,chips,wrap", [
    ("64xtpu-v5p", Plan(dp=64, ep=64, attn_dp=True), 64, True),
    ("64xtpu-v5p", Plan(tp=4, dp=4, ep=16), 16, False),
    ("256xtpu-v6e", Plan(dp=256, ep=256, attn_dp=True), 256, True),
    ("256xtpu-v6e", Plan(tp=2, dp=32, ep=64, attn_dp=True), 64, False),
])
def test_link_model_is_the_crossbar_times_the_factor(cluster, plan, chips, wrap):
    opt = qsengine.StepOptions(kernels="roofline")
    lat = opt.collective_latency
    t_torus, n = _ep_piece(cluster, plan, opt)
    t_switch, _ = _ep_piece(_switch(cluster), plan, opt)
    acc = as_cluster(cluster).accelerator
    f = torus_alltoall_factor(chips, acc.torus_dims, wrap)
    assert f > 1.5
    assert (t_torus - 2 * n * lat) / (t_switch - 2 * n * lat) == pytest.approx(f, rel=1e-12)


def test_calibrated_is_the_larger_of_the_transferred_fit_and_the_torus():
    from qsengine.calibration import runtime

    plan = Plan(dp=64, ep=64, attn_dp=True)
    t_cal, n = _ep_piece("64xtpu-v5p", plan, qsengine.StepOptions())
    t_fit, _ = _ep_piece(_switch("64xtpu-v5p"), plan, qsengine.StepOptions())
    t_link, _ = _ep_piece("64xtpu-v5p", plan, qsengine.StepOptions(kernels="roofline"))
    acc = as_accelerator("tpu-v5p")
    assert runtime.calibration_info(acc).status == "transferred"  # an NVSwitch fit, scaled: a crossbar
    assert t_cal == pytest.approx(max(t_fit, t_link), rel=1e-12)
    assert t_cal > 1.5 * t_fit


# ----------------------------------------------------- switch: unchanged, bit for bit

R = qsengine.StepOptions(kernels="roofline")
T = qsengine.StepOptions(overlap="tbo")
#: switch points (NVSwitch, Infinity Fabric, across nodes, NVL72, prefill) whose records were pinned
#: before tori existed (tests/data/switch_golden.json, float.hex; re-pinned once since, when the EP
#: all-to-all buffers entered the admission, docs/packing.md "All-to-all buffers", a change of the
#: packer, not of the torus code)
GOLDEN_POINTS = [
    dict(model="deepseek-v3", cluster="16xh200", context=8192, microbatches=0),
    dict(model="deepseek-v3", cluster="16xh200", context=32768, microbatches=0, options=R),
    dict(model="qwen3-235b-a22b", cluster="8xh200", context=4096, microbatches=0, slo_tpot=None),
    dict(model="qwen3-235b-a22b", cluster="16xh100", context=8192, microbatches=0, options=T),
    dict(model="qwen3-235b-a22b", cluster="16xh100", context=2048, microbatches=0, plan=Plan(tp=1, dp=16, ep=16)),
    dict(model="mixtral-8x7b", cluster="8xmi300x", context=16384, microbatches=0),
    dict(model="gpt-oss-120b", cluster="8xb200", context=4096, microbatches=0, options=R, slo_tpot=None),
    dict(model="deepseek-v3", cluster="72xgb200", context=8192, microbatches=0),
    dict(model="qwen3-30b-a3b", cluster="8xh100", context=1024, microbatches=0, output=512, prefill="colocated"),
    dict(model="qwen3-235b-a22b", cluster="16xh200", context=4096, microbatches=0, output=1024,
         prefill="disaggregated", options=R),
    dict(model="kimi-k2", cluster="16xh200", context=8192, microbatches=0, slo_tpot=0.1),
    dict(model="dbrx", cluster="8xa100", context=4096, microbatches=0, batch=64),
]


def test_switch_records_are_bit_identical_to_before_tori():
    want = json.loads((Path(__file__).parent / "data" / "switch_golden.json").read_text())
    got = records(GOLDEN_POINTS)
    assert len(want) == len(got)
    for p, w, g in zip(GOLDEN_POINTS, want, got):
        assert g["moe_plan"] == w["moe_plan"], p
        for col, hx in w.items():
            if col == "moe_plan":
                continue
            v = g[col]
            if hx is None or (isinstance(v, float) and math.isnan(v)):
                assert v is None or math.isnan(v), (p, col)
            else:
                assert float(v) == float.fromhex(hx), (p, col, v, float.fromhex(hx))


# --------------------------------------------------------------- TPU vs the oracle

TPU_POINTS = [
    dict(model="qwen3-235b-a22b", cluster="64xtpu-v5p", context=8192, microbatches=0, break_even=False),
    dict(model="qwen3-235b-a22b", cluster="64xtpu-v5p", context=2048, microbatches=0, break_even=False,
         plan=Plan(tp=4, dp=16, ep=16)),
    dict(model="mixtral-8x7b", cluster="64xtpu-v5p", context=4096, microbatches=0, break_even=False,
         options=R, output=256, prefill="colocated"),
    dict(model="deepseek-v3", cluster="256xtpu-v6e", context=4096, microbatches=0, break_even=False,
         plan=Plan(dp=256, ep=256, attn_dp=True)),
    dict(model="qwen3-30b-a3b", cluster="256xtpu-v6e", context=2048, microbatches=0, break_even=False,
         plan=Plan(tp=2, dp=128, ep=64, attn_dp=True), output=128, prefill="colocated", slo_tpot=None),
]


@pytest.mark.parametrize("i", range(len(TPU_POINTS)))
def test_tpu_points_equal_the_oracle(i):
    p = TPU_POINTS[i]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qsengine.ContextWarning)
        (got,) = records([p])
        assert ref.same(ref.record(**p), got) == [], p
    assert got["moe_feasible"]


def test_tori_make_the_moe_slower_not_the_dense():
    """The EP all-to-all is the MoE's: on a torus every MoE plan slows (so its best does), the dense twin's
    do not."""
    p = dict(model="qwen3-235b-a22b", context=8192, microbatches=0, break_even=False, slo_tpot=None)
    torus = qsengine.simulate(cluster="64xtpu-v5p", **p).to_record()
    switch = qsengine.simulate(cluster=_switch("64xtpu-v5p"), **p).to_record()
    assert torus["moe_tokens_per_s"] < switch["moe_tokens_per_s"]
    assert torus["dense_tokens_per_s"] == switch["dense_tokens_per_s"]
    assert np.isfinite(torus["ratio"]) and torus["ratio"] > switch["ratio"]
