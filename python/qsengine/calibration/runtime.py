"""Fitted kernel times at run time: vectorised, reading only the shipped files.

Each function takes arrays (broadcast together) and returns seconds as a
float64 array; one call evaluates any number of lanes with no Python loop per
element. Parameters come from ``qsengine/cluster_specs/calibration/<id>.json``
written by :mod:`qsengine.calibration.fit` (AIConfigurator's measured tables,
Apache-2.0); aiconfigurator is never imported here.

Accelerators without a fitted file get the **transfer rule**
(:data:`TRANSFER`): the achievable fractions (η_bw, η_f, p) and fixed costs
(c0, c1) of a named NVIDIA reference of the same memory generation are applied
to the target's *own* spec peaks (its HBM bandwidth and per-dtype FLOP/s), and
collective bandwidths are scaled by the ratio of scale-up link bandwidths
(latencies kept). Such results are marked ``transferred`` in
:func:`calibration_info`; they are a documented assumption, not a fit, and no
measured kernel data validates them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np

from qsengine.calibration import models as M
from qsengine.specs import Accelerator, load_accelerator

__all__ = [
    "TRANSFER",
    "CalibrationInfo",
    "calibration_info",
    "calibration_dir",
    "gemm_time",
    "grouped_gemm_time",
    "attention_time",
    "allreduce_time",
    "alltoall_time",
    "collective_lines",
    "kernel_params",
]

#: target accelerator id -> (reference with fitted data, why that reference).
TRANSFER: dict[str, tuple[str, str]] = {
    "h800-sxm": ("h100-sxm", "same GH100 die and HBM3 as H100; only NVLink differs (collectives scaled)"),
    "mi300x": ("h200-sxm", "HBM3-generation GPU of the same era; no measured MI300X kernel tables available"),
    "mi325x": ("h200-sxm", "HBM3e-generation GPU of the H200 era; no measured MI325X kernel tables available"),
    "mi355x": ("b200", "HBM3e 8 TB/s-class GPU of the B200 era; no measured MI355X kernel tables available"),
    "tpu-v5p": ("h100-sxm", "HBM2e/HBM3-era accelerator; no measured TPU kernel tables available"),
    "tpu-v6e": ("h100-sxm", "no measured TPU kernel tables available"),
}

Family = Literal["gemm", "grouped_gemm", "attention_gqa", "attention_mha", "attention_mla", "allreduce", "alltoall"]


@lru_cache(maxsize=1)
def calibration_dir() -> Path:
    """Directory of the shipped fitted parameters.

    It depends only on where this module is installed (no environment
    variable), so it is resolved once per process: resolving it per kernel
    lookup cost ~1 s of a 72-GPU family build (issue #11)."""
    return Path(__file__).resolve().parent.parent / "cluster_specs" / "calibration"


@dataclass(frozen=True)
class CalibrationInfo:
    """Where an accelerator's kernel parameters come from.

    Attributes:
        accelerator: the accelerator asked about.
        status: ``"fitted"`` (own measured tables) or ``"transferred"``
            (a reference's fitted fractions applied to this spec's peaks).
        reference: the accelerator whose fit is used (itself when fitted).
        reason: why that reference (transfer rule) or the data source.
        link_scale: factor applied to collective bandwidths (1 when fitted).
    """

    accelerator: str
    status: Literal["fitted", "transferred"]
    reference: str
    reason: str
    link_scale: float


# The fitted files are read once per process: both caches below are keyed on the
# directory as well as the accelerator, so a caller that points calibration_dir
# elsewhere (e.g. a test's monkeypatch) gets that directory's files, never a
# stale entry of another. Files written into a directory after it was read
# (python -m qsengine.calibration.fit) are seen by the next process.
@lru_cache(maxsize=None)
def _read(directory: Path, acc_id: str) -> dict[str, Any]:
    with open(directory / f"{acc_id}.json", encoding="utf-8") as fh:
        return json.load(fh)


@lru_cache(maxsize=None)
def _exists(directory: Path, acc_id: str) -> bool:
    return (directory / f"{acc_id}.json").is_file()


def _load(acc_id: str) -> dict[str, Any]:
    return _read(calibration_dir(), acc_id)


def _acc(acc: Accelerator | str) -> Accelerator:
    if isinstance(acc, Accelerator):
        return acc
    if isinstance(acc, str):
        return load_accelerator(acc)
    raise TypeError(f"acc={acc!r}: must be an Accelerator or a shipped accelerator name")


def _has_fit(acc_id: str) -> bool:
    return _exists(calibration_dir(), acc_id)


def calibration_info(acc: Accelerator | str) -> CalibrationInfo:
    """Whether ``acc``'s kernel times are fitted or transferred, and from what."""
    a = _acc(acc)
    if _has_fit(a.id):
        rec = _load(a.id)
        prov = rec["provenance"]
        return CalibrationInfo(a.id, "fitted", a.id,
                               f"{prov['package']} {prov['package_version']} ({prov['framework']}, {prov['system']})", 1.0)
    if a.id not in TRANSFER:
        raise ValueError(f"acc={a.id!r}: no fitted kernel parameters and no transfer rule; "
                         f"fitted: {sorted(p.stem for p in calibration_dir().glob('*.json'))}, "
                         f"transferable: {sorted(TRANSFER)}")
    ref, why = TRANSFER[a.id]
    scale = a.scaleup_bandwidth / load_accelerator(ref).scaleup_bandwidth
    return CalibrationInfo(a.id, "transferred", ref, why, scale)


def _family(a: Accelerator, family: Family, dtype: str | None) -> tuple[dict[str, Any], CalibrationInfo]:
    info = calibration_info(a)
    fam = _load(info.reference)["families"][family]
    if dtype is None:
        return fam, info
    if dtype not in fam:
        raise ValueError(f"dtype={dtype!r}: no {family} calibration for {info.reference!r} (has {sorted(fam)})")
    return fam[dtype], info


def _peak(a: Accelerator, dtype: str) -> float:
    return a.peak_flops(M.PEAK_DTYPE.get(dtype, dtype))


def _roof(p: dict[str, float], nbytes: np.ndarray, flops: np.ndarray, bw: float, peak: float,
          x: np.ndarray | float = 0.0) -> np.ndarray:
    return M.roofline_time(nbytes, flops, bw, peak, p["eta_bw"], p["eta_f"], p["p"], p["c0"], p.get("c1", 0.0), x)


def gemm_time(acc: Accelerator | str, dtype: str, m: Any, n: Any, k: Any) -> np.ndarray:
    """Seconds of a dense GEMM ``[m,k] x [k,n]`` (m = tokens, k x n = weight) in
    ``dtype`` (``"bf16"``, ``"fp8"``, ``"fp8_block"``, ``"nvfp4"``)."""
    a = _acc(acc)
    rec, _ = _family(a, "gemm", dtype)
    p = rec["params"]
    nb, fl = M.gemm_work(m, n, k, dtype, p["n_pad"])
    return _roof(p, nb, fl, a.hbm_bandwidth, _peak(a, dtype))


def grouped_gemm_time(acc: Accelerator | str, dtype: str, tokens_per_expert: Any, experts_local: Any,
                      hidden: Any, inter: Any) -> np.ndarray:
    """Seconds of one GPU's routed experts in one MoE layer (gated FFN).

    Args:
        tokens_per_expert: token-expert assignments per local expert on this
            GPU (the busiest GPU's value for the straggler; may be < 1 when
            only some experts are touched).
        experts_local: experts held by this GPU.
        hidden, inter: model width and the expert's intermediate size on this
            GPU (after expert tensor parallelism).
    """
    a = _acc(acc)
    rec, _ = _family(a, "grouped_gemm", dtype)
    assign = np.asarray(tokens_per_expert, dtype=np.float64) * np.asarray(experts_local, dtype=np.float64)
    p = rec["params"]
    nb, fl, touched = M.grouped_gemm_work(assign, experts_local, hidden, inter, dtype, p["width_pad"])
    return _roof(p, nb, fl, a.hbm_bandwidth, _peak(a, dtype), assign) + p["c_expert"] * touched


def attention_time(acc: Accelerator | str, kind: Literal["gqa", "mla"], batch: Any, context: Any, heads: Any,
                   kv_heads: Any = 1, head_dim: Any = 128, kv_dtype: str = "bf16") -> np.ndarray:
    """Seconds of one decode step of attention for one layer on one GPU.

    ``kind="gqa"`` (also MHA/MQA): ``heads``/``kv_heads`` on this GPU,
    ``head_dim``; lanes with ``heads == kv_heads`` use the separately fitted
    MHA kernel; ``kind="mla"``: absorbed MLA with the DeepSeek-V3 latent
    (512 + 64), ``heads`` on this GPU. ``context``: cached tokens per sequence.
    """
    a = _acc(acc)
    rows = np.asarray(batch, dtype=np.float64) * np.asarray(heads, dtype=np.float64)
    peak = a.peak_flops("bf16")
    if kind == "gqa":
        rec, info = _family(a, "attention_gqa", kv_dtype)
        p = rec["params"]
        nb, fl = M.gqa_work(batch, context, heads, kv_heads, head_dim, kv_dtype, p["stream_pad"], p["split"])
        t = _roof(p, nb, fl, a.hbm_bandwidth, peak, rows)
        mha = _load(info.reference)["families"].get("attention_mha", {}).get(kv_dtype)
        if mha is None:
            return t
        # heads == kv_heads runs TensorRT-LLM's MHA kernel, fitted separately
        q = mha["params"]
        nb, fl = M.gqa_work(batch, context, heads, kv_heads, head_dim, kv_dtype, q["stream_pad"], q["split"])
        is_mha = np.asarray(heads, dtype=np.float64) == np.asarray(kv_heads, dtype=np.float64)
        return np.where(is_mha, _roof(q, nb, fl, a.hbm_bandwidth, peak, rows), t)
    if kind == "mla":
        rec, _ = _family(a, "attention_mla", kv_dtype)
        p = rec["params"]
        nb, fl = M.mla_work(batch, context, heads, kv_dtype, p["stream_pad"], p["split"])
        return _roof(rec["params"], nb, fl, a.hbm_bandwidth, peak, rows)
    raise ValueError(f"kind={kind!r}: must be 'gqa' or 'mla'")


def _lines(a: Accelerator, family: Family) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(measured GPU counts, alpha (counts, protocols), beta (counts, protocols)) of a collective,
    bandwidths scaled by the transfer rule's link factor (read-only arrays)."""
    return _lines_of(calibration_dir(), calibration_info(a), family)


def _frozen(x: np.ndarray) -> np.ndarray:
    x.setflags(write=False)  # shared by every caller of a cached lookup
    return x


# Collective lines depend on the accelerator only through its CalibrationInfo
# (reference fit, link_scale): cached on (directory, info, family[, gpus]), they
# are built once per process instead of once per plan lane of a family build.
@lru_cache(maxsize=None)
def _lines_of(directory: Path, info: CalibrationInfo,
              family: Family) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    per = _read(directory, info.reference)["families"][family]["per_gpus"]
    gs = np.array(sorted(int(g) for g in per), dtype=np.float64)
    alpha = np.array([per[str(int(g))]["alpha"] for g in gs])  # (gpu counts, protocols)
    beta = np.array([per[str(int(g))]["beta"] for g in gs]) * info.link_scale
    return _frozen(gs), _frozen(alpha), _frozen(beta)


@lru_cache(maxsize=None)
def _lines_at(directory: Path, info: CalibrationInfo, family: Family,
              gpus: float) -> tuple[np.ndarray, np.ndarray]:
    gs, alpha, beta = _lines_of(directory, info, family)
    al, be = _interp_lines(np.array([gpus]), gs, alpha, beta)
    return _frozen(al[0]), _frozen(be[0])


def _interp_lines(g: np.ndarray, gs: np.ndarray, alpha: np.ndarray,
                  beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Between and beyond measured GPU counts: latency and bandwidth interpolated
    # linearly in log2(gpus), held constant outside the measured range (the
    # scale-up fabric is a switch, so per-GPU bandwidth does not fall further).
    lg = np.log2(np.maximum(g, 2.0))
    lgs = np.log2(gs)
    al = np.stack([np.interp(lg, lgs, alpha[:, j]) for j in range(alpha.shape[1])], axis=-1)
    be = np.stack([np.interp(lg, lgs, beta[:, j]) for j in range(beta.shape[1])], axis=-1)
    return al, be


def _collective(acc: Accelerator | str, family: Family, gpus: Any, nbytes: Any) -> np.ndarray:
    a = _acc(acc)
    gs, alpha, beta = _lines(a, family)
    g = np.asarray(gpus, dtype=np.float64)
    if np.any(g < 1) or not np.all(np.isfinite(g)):
        raise ValueError(f"gpus: every value must be a finite count >= 1 (min {g.min() if g.size else g!r})")
    s = np.asarray(nbytes, dtype=np.float64)
    if np.any(s < 0):
        raise ValueError("nbytes: every value must be >= 0")
    al, be = _interp_lines(g, gs, alpha, beta)
    return np.where(g > 1, M.collective_time(s, al, be), 0.0)


def collective_lines(acc: Accelerator | str, family: Literal["allreduce", "alltoall"],
                     gpus: int) -> tuple[np.ndarray, np.ndarray]:
    """(alpha, beta) per protocol (seconds, bytes/s per GPU) of the fitted
    ``family`` collective over ``gpus`` GPUs of one scale-up domain, as
    :func:`allreduce_time` / :func:`alltoall_time` use them: ``t(S) = min_j
    (alpha_j + S/beta_j)``. Lets a caller resolve a plan's group once and
    evaluate many message sizes without a lookup per size. The arrays are
    read-only (shared by every call with the same arguments)."""
    return _lines_at(calibration_dir(), calibration_info(_acc(acc)), family, float(gpus))


def kernel_params(acc: Accelerator | str, family: Family, dtype: str) -> dict[str, float] | None:
    """The fitted parameters of ``family`` in ``dtype`` that the runtime uses for
    ``acc`` (the transfer rule's reference's record for accelerators without
    their own fit), or None when there is no such fit (e.g. no grouped-GEMM
    table for A100, no nvfp4 GEMM on Hopper). Peaks are ``acc``'s own spec
    values: bandwidth ``acc.hbm_bandwidth``, FLOP/s ``acc.peak_flops(PEAK_DTYPE[dtype])``
    (attention: bf16)."""
    a = _acc(acc)
    try:
        info = calibration_info(a)
    except ValueError:
        return None
    fam = _load(info.reference)["families"].get(family, {})
    rec = fam.get(dtype)
    if rec is None or "params" not in rec:
        return None
    return dict(rec["params"])


def allreduce_time(acc: Accelerator | str, gpus: Any, nbytes: Any) -> np.ndarray:
    """Seconds of an all-reduce of ``nbytes`` per GPU over ``gpus`` GPUs in one
    scale-up domain (0 for one GPU); fitted on TensorRT-LLM's custom all-reduce."""
    return _collective(acc, "allreduce", gpus, nbytes)


def alltoall_time(acc: Accelerator | str, gpus: Any, nbytes: Any) -> np.ndarray:
    """Seconds of an all-to-all of ``nbytes`` per GPU over ``gpus`` GPUs in one
    scale-up domain (0 for one GPU); fitted on NCCL alltoall."""
    return _collective(acc, "alltoall", gpus, nbytes)
