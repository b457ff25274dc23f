"""Spec corrections that come with the calibration work (each with its source
in the TOML): GB200 HBM, H800, one fp4/nvfp4 lookup, per-dtype FLOP efficiency."""

from __future__ import annotations

import pytest

from qsengine import load_accelerator
from qsengine.specs import Accelerator
from qsengine.specs.loaders import accelerator_from_dict


def test_gb200_hbm_is_192_gb():
    assert load_accelerator("gb200").hbm_bytes == 192e9


def test_h800_is_h100_with_capped_nvlink():
    h800, h100 = load_accelerator("h800-sxm"), load_accelerator("h100-sxm")
    assert h800.scaleup_bandwidth == 200e9
    assert (h800.hbm_bytes, h800.hbm_bandwidth, h800.flops) == (h100.hbm_bytes, h100.hbm_bandwidth, h100.flops)


@pytest.mark.parametrize("acc", ["b300", "gb300"])
def test_fp4_and_nvfp4_read_one_entry(acc):
    a = load_accelerator(acc)
    assert a.peak_flops("fp4") == a.peak_flops("nvfp4") == 15000e12


def test_b200_fp4_is_the_hgx_figure():
    b = load_accelerator("b200")
    assert b.peak_flops("fp4") == b.peak_flops("nvfp4") == 9000e12
    assert load_accelerator("gb200").peak_flops("nvfp4") == 10000e12


def test_blackwell_ultra_fp4_agrees():
    assert load_accelerator("b300").peak_flops("fp4") == load_accelerator("gb300").peak_flops("fp4")


def test_fp4_falls_back_below_blackwell():
    h = load_accelerator("h100-sxm")
    assert h.peak_flops("fp4") == h.peak_flops("nvfp4") == h.flops["fp8"]
    assert h.peak_flops_dtype("nvfp4") == "fp8"


def test_per_dtype_flops_efficiency():
    h = load_accelerator("h200-sxm")
    assert h.flops_efficiency_for("fp8") == pytest.approx(0.734)
    assert h.flops_efficiency_for("bf16") == h.flops_efficiency == pytest.approx(0.803)
    assert h.achievable_flops("fp8") == pytest.approx(1978.9e12 * 0.734)
    # fp4 falls back to the fp8 peak on Hopper, so it takes fp8's efficiency
    assert h.flops_efficiency_for("fp4") == pytest.approx(0.734)


def _base(**kw):
    d = dict(id="x", hbm_gb=80, hbm_bandwidth_tbps=3.35, scaleup_bandwidth_gb_s=450, internode_bandwidth_gbit_s=400,
             gpus_per_node=8, scaleup_domain=8, flops_tflops={"bf16": 989.4, "fp8": 1978.9})
    d.update(kw)
    return d


def test_flops_efficiency_by_dtype_is_validated():
    a = accelerator_from_dict(_base(flops_efficiency_by_dtype={"fp8": 0.5}), "t")
    assert a.flops_efficiency_for("fp8") == 0.5
    with pytest.raises(ValueError, match=r"flops_efficiency_by_dtype.fp8.*1.5"):
        accelerator_from_dict(_base(flops_efficiency_by_dtype={"fp8": 1.5}), "t")
    with pytest.raises(ValueError, match=r"flops_efficiency_by_dtype.fp9"):
        accelerator_from_dict(_base(flops_efficiency_by_dtype={"fp9": 0.5}), "t")
    with pytest.raises(TypeError, match=r"flops_efficiency_by_dtype"):
        Accelerator(id="x", name="x", hbm_bytes=1e11, hbm_bandwidth=1e12, flops={"bf16": 1e15},
                    scaleup_bandwidth=1e11, internode_bandwidth=1e10, gpus_per_node=8, scaleup_domain=8,
                    flops_efficiency_by_dtype=[0.5])


def test_unknown_dtype_is_an_error():
    with pytest.raises(ValueError, match=r"dtype='fp6'"):
        load_accelerator("b200").peak_flops("fp6")
