"""Kernel calibration: achievable kernel time as a function of the work's shape.

* :mod:`qsengine.calibration.models`: the parametric models (one implementation);
* :mod:`qsengine.calibration.runtime`: vectorised kernel times from the shipped
  fitted parameters (``cluster_specs/calibration/*.json``), with the transfer
  rule for accelerators without measured data;
* :mod:`qsengine.calibration.fit`: the fit against NVIDIA AIConfigurator's
  measured tables (optional extra ``qsengine[calibrate]``).

See ``docs/calibration.md``.
"""

from qsengine.calibration.runtime import (
    TRANSFER,
    CalibrationInfo,
    allreduce_time,
    alltoall_time,
    attention_time,
    calibration_dir,
    calibration_info,
    gemm_time,
    grouped_gemm_time,
)

__all__ = [
    "TRANSFER",
    "CalibrationInfo",
    "allreduce_time",
    "alltoall_time",
    "attention_time",
    "calibration_dir",
    "calibration_info",
    "gemm_time",
    "grouped_gemm_time",
]
