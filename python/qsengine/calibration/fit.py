"""Fit the kernel models of :mod:`qsengine.calibration.models` to NVIDIA
AIConfigurator's measured latency tables and write the parameters, with their
provenance, to ``qsengine/cluster_specs/calibration/<accelerator>.json``.

Run (needs the optional extra ``pip install 'qsengine[calibrate]'``, i.e. the
Apache-2.0 package ``aiconfigurator-core`` and scipy)::

    python -m qsengine.calibration.fit            # all accelerators
    python -m qsengine.calibration.fit --acc h100-sxm --out /tmp/calib

Source data: ``aiconfigurator_core/systems/data/<system>/<op>/<framework>/<version>/*.parquet``
(NVIDIA AIConfigurator, https://github.com/ai-dynamo/aiconfigurator,
Apache-2.0). Latencies in the tables are milliseconds; NCCL and custom
all-reduce ``message_size`` is an element count (a half all-to-all of N
elements takes as long as an int8 one of 2N, checked in the H100 table).

Fit: TensorRT-LLM tables (``FRAMEWORK``/``TRTLLM_VERSION``) only; the rows are
split into a training set and a held-out set *by shape* (whole weight shapes,
model shapes, head configurations or message sizes never seen by the fit; see
``SPLITS``), parameters are found by least squares on ``log(pred/measured)``
(so the error is relative) and both errors are reported as MAPE. A small
deterministic sample of held-out rows is written to
``cluster_specs/calibration/heldout_rows.csv`` for the tests. Nothing is fitted
to end-to-end serving measurements.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from qsengine.calibration import models as M
from qsengine.specs import load_accelerator

#: qsengine accelerator id -> AIConfigurator system directory.
SYSTEMS: dict[str, str] = {
    "a100-80gb-sxm": "a100_sxm",
    "h100-sxm": "h100_sxm",
    "h200-sxm": "h200_sxm",
    "b200": "b200_sxm",
    "b300": "b300_sxm",
    "gb200": "gb200",
    "gb300": "gb300",
}
FRAMEWORK = "trtllm"
#: Version directory used per system (the newest TRT-LLM collection present for all ops).
TRTLLM_VERSION = {"a100_sxm": "1.0.0"}
TRTLLM_DEFAULT = "1.3.0rc20"

#: Declared train / held-out split of each family (the test subset comes from the held-out side).
SPLITS = {
    "gemm": "held out: every 5th distinct (n, k) weight shape in sorted order (index % 5 == 2); rows with m <= 4096",
    "grouped_gemm": "held out: every 4th distinct (hidden, inter, num_experts, topk) model shape (index % 4 == 1); "
                    "gated kernels only; num_tokens <= 8192",
    "attention_gqa": "held out: every 4th distinct (num_heads, num_kv_heads, head_dim) (index % 4 == 1); "
                     "window_size == 0; context = step + 1 <= 65536; 2 <= num_heads/num_kv_heads <= 16",
    "attention_mha": "held out: every 4th distinct (num_heads, head_dim) (index % 4 == 1); "
                     "window_size == 0; context = step + 1 <= 65536; num_heads == num_kv_heads",
    "attention_mla": "held out: context lengths (step + 1) in {128, 2048, 32768}",
    "allreduce": "held out: every 3rd message size (index % 3 == 1); message <= 64 MiB",
    "alltoall": "held out: every 3rd message size (index % 3 == 1); message <= 64 MiB",
}
TARGET_MAPE = 0.15
SUBSET_ROWS = 24

#: AIConfigurator dtype names -> qsengine kernel dtype names.
GEMM_DTYPES = {"bfloat16": "bf16", "fp8": "fp8", "fp8_block": "fp8_block", "nvfp4": "nvfp4"}
MOE_DTYPES = {"bfloat16": "bf16", "fp8": "fp8", "fp8_block": "fp8_block", "nvfp4": "nvfp4",
              "w4a16_mxfp4": "w4a16_mxfp4"}
KV_DTYPES = {"bfloat16": "bf16", "fp8": "fp8"}
POWER_LAW = ("power_law_1.01", "power_law_1.2")


def data_root() -> Path:
    """Directory of AIConfigurator's measured tables (raises ImportError naming the extra)."""
    try:
        import aiconfigurator_core
    except ImportError as exc:  # pragma: no cover - depends on the optional extra
        raise ImportError("the calibration fit needs the optional extra: pip install 'qsengine[calibrate]'") from exc
    return Path(aiconfigurator_core.__file__).parent / "systems" / "data"


def _table(system: str, op: str, name: str, framework: str = FRAMEWORK, version: str | None = None) -> tuple[pd.DataFrame, str]:
    ver = version or TRTLLM_VERSION.get(system, TRTLLM_DEFAULT)
    rel = f"{system}/{op}/{framework}/{ver}/{name}.parquet"
    return pd.read_parquet(data_root() / rel), rel


def _latest(system: str, op: str, framework: str, name: str) -> tuple[pd.DataFrame, str]:
    base = data_root() / system / op / framework
    vers = sorted((p.name for p in base.iterdir() if (p / f"{name}.parquet").exists()),
                  key=lambda v: [int(x) if x.isdigit() else x for x in v.replace("rc", ".").split(".")])
    return _table(system, op, name, framework, vers[-1])


# --------------------------------------------------------------------- fitting
def _sig(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


@dataclass
class FitResult:
    params: dict[str, float]
    mape_train: float
    mape_heldout: float | None  # None: the split left no held-out row
    max_ape_heldout: float | None
    rows_train: int
    rows_heldout: int
    z: np.ndarray  # the unconstrained parameter vector the fit found


def _ape(pred: np.ndarray, meas: np.ndarray) -> np.ndarray:
    return np.abs(pred - meas) / meas


def _least_squares(predict: Callable[[np.ndarray, np.ndarray], np.ndarray], z0: np.ndarray,
                   train: np.ndarray, meas: np.ndarray) -> np.ndarray:
    from scipy.optimize import least_squares

    def resid(z: np.ndarray) -> np.ndarray:
        return np.log(predict(z, train) / meas)

    best = None
    for jitter in (0.0, 0.7, -0.7):
        r = least_squares(resid, z0 + jitter, method="trf", x_scale="jac", max_nfev=4000)
        if best is None or r.cost < best.cost:
            best = r
    return best.x


def _fit(predict: Callable[[np.ndarray, np.ndarray], np.ndarray], decode: Callable[[np.ndarray], dict[str, float]],
         z0: np.ndarray, X: np.ndarray, t: np.ndarray, held: np.ndarray) -> FitResult:
    z = _least_squares(predict, z0, X[:, ~held], t[~held])
    pred = predict(z, X)
    ape = _ape(pred, t)
    return FitResult(decode(z), float(ape[~held].mean()), float(ape[held].mean()) if held.any() else None,
                     float(ape[held].max()) if held.any() else None, int((~held).sum()), int(held.sum()), z)


def _roof_params(z: np.ndarray) -> dict[str, float]:
    """Decode the shared roofline parameters: eta_bw, eta_f in (0, 1), p >= 1, c0, c1 >= 0 (seconds)."""
    return {"eta_bw": float(_sig(z[0])), "eta_f": float(_sig(z[1])), "p": float(1.0 + np.exp(z[2])),
            "c0": float(np.exp(z[3]) * 1e-6), "c1": float(np.exp(z[4]) * 1e-9) if len(z) > 4 else 0.0}


def _attention_params(z: np.ndarray) -> dict[str, float]:
    """Fitted attention parameters: the roofline's five, then the idle KV-stream
    padding and the multi-block split (both fitted in log space)."""
    q = _roof_params(z[:5])
    q["stream_pad"] = float(np.exp(z[5]))
    q["split"] = float(np.exp(z[6]))
    return q


def _shape_split(keys: pd.DataFrame, mod: int, pick: int) -> np.ndarray:
    tup = list(map(tuple, keys.to_numpy().tolist()))
    uniq = sorted(set(tup))
    held_keys = {u for i, u in enumerate(uniq) if i % mod == pick}
    return np.array([k in held_keys for k in tup])


# ------------------------------------------------------------------ families
def fit_gemm(system: str, bw: float, peaks: dict[str, float]) -> tuple[dict, list[pd.DataFrame]]:
    df, rel = _table(system, "gemm", "gemm_perf")
    out: dict = {}
    subsets = []
    for aic, dt in GEMM_DTYPES.items():
        d = df[df.gemm_dtype == aic]
        if d.empty:
            continue
        src = d.kernel_source.value_counts().index[0]
        d = d[(d.kernel_source == src) & (d.m <= 4096)].reset_index(drop=True)
        peak = peaks[M.PEAK_DTYPE[dt]]
        X = np.stack([d.m.to_numpy(dtype=float), d.n.to_numpy(dtype=float), d.k.to_numpy(dtype=float)])
        t = d.latency.to_numpy() * 1e-3

        def predict(z: np.ndarray, X: np.ndarray, peak: float = peak, dt: str = dt) -> np.ndarray:
            q = _roof_params(z[:4])
            nb, fl = M.gemm_work(X[0], X[1], X[2], dt, np.exp(z[4]))
            return M.roofline_time(nb, fl, bw, peak, q["eta_bw"], q["eta_f"], q["p"], q["c0"])

        def decode(z: np.ndarray) -> dict[str, float]:
            q = _roof_params(z[:4])
            q.pop("c1")
            q["n_pad"] = float(np.exp(z[4]))
            return q

        held = _shape_split(d[["n", "k"]], 5, 2)
        r = _fit(predict, decode, np.array([1.0, 1.0, 0.0, 1.0, 5.0]), X, t, held)
        out[dt] = _record(r, rel, f"gemm_dtype == {aic!r}, kernel_source == {src!r}", SPLITS["gemm"])
        out[dt]["other_frameworks"] = _cross_framework(system, aic, predict, r.z)
        sub = d[held].sample(n=min(SUBSET_ROWS, int(held.sum())), random_state=0)
        subsets.append(pd.DataFrame({"family": "gemm", "dtype": dt, "m": sub.m, "n": sub.n, "k": sub.k,
                                     "latency_s": sub.latency * 1e-3, "table": rel}))
    return out, subsets


def _cross_framework(system: str, aic: str, predict: Callable[[np.ndarray, np.ndarray], np.ndarray],
                     z: np.ndarray) -> dict[str, dict[str, float]]:
    """Held-out *frameworks*: the TRT-LLM-fitted GEMM model against vLLM's and
    SGLang's measured GEMM tables of the same GPU and dtype (m <= 4096), none
    of whose rows the fit saw. Reported, not fitted."""
    res: dict[str, dict[str, float]] = {}
    for fw in ("vllm", "sglang"):
        try:
            df, rel = _latest(system, "gemm", fw, "gemm_perf")
        except (FileNotFoundError, IndexError):
            continue
        d = df[(df.gemm_dtype == aic) & (df.m <= 4096)]
        if d.empty:
            continue
        src = d.kernel_source.value_counts().index[0]
        d = d[d.kernel_source == src]
        X = np.stack([d.m.to_numpy(dtype=float), d.n.to_numpy(dtype=float), d.k.to_numpy(dtype=float)])
        ape = _ape(predict(z, X), d.latency.to_numpy() * 1e-3)
        res[rel] = {"rows": int(len(d)), "mape": float(ape.mean()), "kernel_source": str(src)}
    return res


def fit_grouped_gemm(system: str, bw: float, peaks: dict[str, float]) -> tuple[dict, list[pd.DataFrame]]:
    df, rel = _table(system, "moe", "moe_perf")
    out: dict = {}
    subsets = []
    for aic, dt in MOE_DTYPES.items():
        d = df[(df.moe_dtype == aic) & ~df.kernel_source.str.contains("nongated|min_latency", regex=True)]
        if d.empty:
            continue
        src = d.kernel_source.value_counts().index[0]
        d = d[(d.kernel_source == src) & (d.num_tokens <= 8192)
              & d.distribution.isin(("balanced",) + POWER_LAW)].reset_index(drop=True)
        peak = peaks[M.PEAK_DTYPE[dt]]
        e_local = (d.num_experts / d.moe_ep_size).to_numpy(dtype=float)
        inter = (d.inter_size / d.moe_tp_size).to_numpy(dtype=float)
        assign = (d.num_tokens * d.topk / d.moe_ep_size).to_numpy(dtype=float)
        dist = d.distribution.to_numpy()
        X = np.stack([assign, e_local, d.hidden_size.to_numpy(dtype=float), inter,
                      (dist == POWER_LAW[0]).astype(float), (dist == POWER_LAW[1]).astype(float)])
        t = d.latency.to_numpy() * 1e-3

        def predict(z: np.ndarray, X: np.ndarray, peak: float = peak, dt: str = dt) -> np.ndarray:
            q = _roof_params(z[:5])
            a = X[0] * (1.0 + X[4] * np.exp(z[5]) + X[5] * np.exp(z[6])) if len(z) > 7 else X[0]
            nb, fl, touched = M.grouped_gemm_work(a, X[1], X[2], X[3], dt, np.exp(z[-1]))
            return (M.roofline_time(nb, fl, bw, peak, q["eta_bw"], q["eta_f"], q["p"], q["c0"], q["c1"], a)
                    + np.exp(z[-2]) * 1e-9 * touched)

        def decode(z: np.ndarray) -> dict[str, float]:
            q = _roof_params(z[:5])
            q["c_expert"] = float(np.exp(z[-2]) * 1e-9)
            q["width_pad"] = float(np.exp(z[-1]))
            return q

        held = _shape_split(d[["hidden_size", "inter_size", "num_experts", "topk"]], 4, 1)
        bal = dist == "balanced"
        if not bal.any():  # e.g. A100's table has power-law rows only: no kernel fit without skew
            continue
        # Stage 1: the kernel model on balanced routing (every GPU equally loaded).
        r = _fit(predict, decode, np.array([0.0, 0.0, 0.0, 2.0, 0.0, 5.0, 7.0]), X[:, bal], t[bal], held[bal])
        out[dt] = _record(r, rel, f"moe_dtype == {aic!r}, kernel_source == {src!r}, distribution == 'balanced'",
                          SPLITS["grouped_gemm"])
        # Stage 2: with the kernel fixed, one multiplier per power-law table on the
        # busiest GPU's assignments (AIConfigurator times the slowest rank).
        zk, zocc = r.z[:5], r.z[5:]  # kernel params; (c_expert, width_pad)
        pl = ~bal
        if pl.any():
            from scipy.optimize import least_squares

            tr = pl & ~held
            x_tr, t_tr = X[:, tr], t[tr]

            def skew_resid(w: np.ndarray, zk: np.ndarray = zk, zocc: np.ndarray = zocc, x_tr: np.ndarray = x_tr,
                           t_tr: np.ndarray = t_tr) -> np.ndarray:
                return np.log(predict(np.concatenate([zk, w, zocc]), x_tr) / t_tr)

            sol = least_squares(skew_resid, np.array([-1.0, -1.0]), method="trf")
            zfull = np.concatenate([zk, sol.x, zocc])
            ape = _ape(predict(zfull, X[:, pl]), t[pl])
            hp = held[pl]
            out[dt]["power_law"] = {
                "skew_" + POWER_LAW[0]: float(1.0 + np.exp(sol.x[0])), "skew_" + POWER_LAW[1]: float(1.0 + np.exp(sol.x[1])),
                "rows_train": int((~hp).sum()), "rows_heldout": int(hp.sum()),
                "mape_train": float(ape[~hp].mean()), "mape_heldout": float(ape[hp].mean()),
                "note": "busiest-GPU assignments = skew x balanced assignments; kernel parameters from stage 1"}
        out[dt]["note"] = ("assignments = num_tokens*topk/moe_ep_size on one GPU; callers pass the busiest GPU's "
                           "tokens per local expert (the routing model supplies the imbalance)")
        sub = d[held & (d.distribution == "balanced").to_numpy()]
        sub = sub.sample(n=min(SUBSET_ROWS, len(sub)), random_state=0)
        subsets.append(pd.DataFrame({
            "family": "grouped_gemm", "dtype": dt,
            "tokens_per_expert": sub.num_tokens * sub.topk / sub.num_experts,
            "experts_local": sub.num_experts / sub.moe_ep_size, "hidden": sub.hidden_size,
            "inter": sub.inter_size / sub.moe_tp_size, "latency_s": sub.latency * 1e-3, "table": rel}))
    return out, subsets


def fit_gqa(system: str, bw: float, peaks: dict[str, float], family: str = "attention_gqa"
            ) -> tuple[dict, list[pd.DataFrame]]:
    """GQA/MQA (``family="attention_gqa"``: 2 <= heads/kv_heads <= 16) or MHA
    (``"attention_mha"``: heads == kv_heads): TensorRT-LLM dispatches grouped
    heads and plain MHA to different generation kernels (XQA vs masked MHA),
    so each gets its own parameters."""
    df, rel = _table(system, "attention", "generation_attention_perf")
    out: dict = {}
    subsets = []
    for aic, dt in KV_DTYPES.items():
        if family == "attention_mha":
            group = df.num_heads == df.num_key_value_heads
        else:
            group = (df.num_heads >= 2 * df.num_key_value_heads) & (df.num_heads <= 16 * df.num_key_value_heads)
        d = df[(df.kv_cache_dtype == aic) & (df.window_size == 0) & (df.step + 1 <= 65536)
               & group].reset_index(drop=True)
        if d.empty:
            continue
        ctx = (d.step + 1).to_numpy(dtype=float)
        X = np.stack([d.batch_size.to_numpy(dtype=float), ctx, d.num_heads.to_numpy(dtype=float),
                      d.num_key_value_heads.to_numpy(dtype=float), d.head_dim.to_numpy(dtype=float)])
        t = d.latency.to_numpy() * 1e-3
        peak = peaks["bf16"]

        def predict(z: np.ndarray, X: np.ndarray, peak: float = peak, dt: str = dt) -> np.ndarray:
            q = _roof_params(z[:5])
            nb, fl = M.gqa_work(X[0], X[1], X[2], X[3], X[4], dt, np.exp(z[5]), np.exp(z[6]))
            return M.roofline_time(nb, fl, bw, peak, q["eta_bw"], q["eta_f"], q["p"], q["c0"], q["c1"], X[0] * X[2])

        decode = _attention_params

        held = _shape_split(d[["num_heads", "num_key_value_heads", "head_dim"]], 4, 1)
        r = _fit(predict, decode, np.array([1.0, 0.0, 0.0, 2.0, 0.0, 2.0, 7.0]), X, t, held)
        out[dt] = _record(r, rel, f"kv_cache_dtype == {aic!r}, window_size == 0", SPLITS[family])
        out[dt]["note"] = ("c1 multiplies batch*heads (per-row softmax/reduction work); stream_pad: idle KV "
                           "streams (one block per sequence and KV head); bf16 peak; domain: "
                           + ("heads == kv_heads" if family == "attention_mha" else
                              "2 <= heads/kv_heads <= 16 (every shipped GQA model; larger groups dispatch other kernels)"))
        sub = d[held].sample(n=min(SUBSET_ROWS, int(held.sum())), random_state=0)
        subsets.append(pd.DataFrame({"family": family, "dtype": dt, "batch": sub.batch_size,
                                     "context": sub.step + 1, "heads": sub.num_heads,
                                     "kv_heads": sub.num_key_value_heads, "head_dim": sub.head_dim,
                                     "latency_s": sub.latency * 1e-3, "table": rel}))
    return out, subsets


def fit_mla(system: str, bw: float, peaks: dict[str, float]) -> tuple[dict, list[pd.DataFrame]]:
    df, rel = _table(system, "mla", "generation_mla_perf")
    out: dict = {}
    subsets = []
    for aic, dt in KV_DTYPES.items():
        d = df[df.kv_cache_dtype == aic].reset_index(drop=True)
        if d.empty:
            continue
        ctx = (d.step + 1).to_numpy(dtype=float)
        X = np.stack([d.batch_size.to_numpy(dtype=float), ctx, d.num_heads.to_numpy(dtype=float)])
        t = d.latency.to_numpy() * 1e-3
        peak = peaks["bf16"]

        def predict(z: np.ndarray, X: np.ndarray, peak: float = peak, dt: str = dt) -> np.ndarray:
            q = _roof_params(z[:5])
            nb, fl = M.mla_work(X[0], X[1], X[2], dt, np.exp(z[5]), np.exp(z[6]))
            return M.roofline_time(nb, fl, bw, peak, q["eta_bw"], q["eta_f"], q["p"], q["c0"], q["c1"], X[0] * X[2])

        decode = _attention_params

        held = np.isin(ctx, (128, 2048, 32768))
        r = _fit(predict, decode, np.array([1.0, 0.0, 0.0, 2.0, 0.0, 0.0, 7.0]), X, t, held)
        out[dt] = _record(r, rel, f"kv_cache_dtype == {aic!r}; num_heads = heads on one GPU", SPLITS["attention_mla"])
        out[dt]["note"] = ("c1 multiplies batch*heads; stream_pad: idle latent streams (the latent is shared by "
                           "all heads: one stream per sequence); bf16 compute peak "
                           "(mla_dtype is bfloat16 in every row)")
        sub = d[held].sample(n=min(SUBSET_ROWS, int(held.sum())), random_state=0)
        subsets.append(pd.DataFrame({"family": "attention_mla", "dtype": dt, "batch": sub.batch_size,
                                     "context": sub.step + 1, "heads": sub.num_heads,
                                     "latency_s": sub.latency * 1e-3, "table": rel}))
    return out, subsets


def _fit_collective(d: pd.DataFrame, elem_bytes: np.ndarray, rel: str, family: str, selection: str) -> tuple[dict, list[pd.DataFrame]]:
    d = d.assign(nbytes=d.message_size.to_numpy() * elem_bytes)
    d = d[d.nbytes <= 64 * 2**20].reset_index(drop=True)
    per: dict[str, dict[str, float]] = {}
    rows_tr = rows_ho = 0
    ape_tr: list[np.ndarray] = []
    ape_ho: list[np.ndarray] = []
    subsets = []
    for g, dg in d.groupby("num_gpus"):
        dg = dg.reset_index(drop=True)
        held = _shape_split(dg[["nbytes"]], 3, 1)
        S = dg.nbytes.to_numpy(dtype=float)
        t = dg.latency.to_numpy() * 1e-3

        def predict(z: np.ndarray, S: np.ndarray) -> np.ndarray:
            return M.collective_time(S, np.exp(z[[0, 2]]) * 1e-6, np.exp(z[[1, 3]]) * 1e9)

        z = _least_squares(predict, np.array([1.5, 3.0, 3.0, 6.0]), S[~held], t[~held])
        ape = _ape(predict(z, S), t)
        per[str(int(g))] = {"alpha": [float(v) for v in np.exp(z[[0, 2]]) * 1e-6],
                            "beta": [float(v) for v in np.exp(z[[1, 3]]) * 1e9],
                            "mape_train": float(ape[~held].mean()), "mape_heldout": float(ape[held].mean())}
        ape_tr.append(ape[~held])
        ape_ho.append(ape[held])
        rows_tr += int((~held).sum())
        rows_ho += int(held.sum())
        sub = dg[held]
        subsets.append(pd.DataFrame({"family": family, "dtype": "bf16" if family == "allreduce" else "int8/half",
                                     "gpus": int(g), "nbytes": sub.nbytes, "latency_s": sub.latency * 1e-3,
                                     "table": rel}))
    a_tr = np.concatenate(ape_tr)
    a_ho = np.concatenate(ape_ho)
    rec = {"per_gpus": per, "table": rel, "selection": selection, "split": SPLITS[family],
           "rows_train": rows_tr, "rows_heldout": rows_ho, "mape_train": float(a_tr.mean()),
           "mape_heldout": float(a_ho.mean()), "max_ape_heldout": float(a_ho.max()),
           "meets_target": bool(a_ho.mean() <= TARGET_MAPE)}
    return rec, subsets


def fit_collectives(system: str) -> tuple[dict, dict, list[pd.DataFrame]]:
    ar, rel = _table(system, "comm", "custom_allreduce_perf")
    ar_rec, s1 = _fit_collective(ar, np.full(len(ar), 2.0), rel, "allreduce",
                                 "TensorRT-LLM custom all-reduce, bfloat16 (message_size x 2 bytes)")
    base = data_root() / system / "comm" / "nccl"
    ver = sorted((p.name for p in base.iterdir()), key=lambda v: [int(x) for x in v.split(".") if x.isdigit()])[-1]
    nc, rel2 = _table(system, "comm", "nccl_perf", "nccl", ver)
    a2a = nc[nc.op_name == "alltoall"]
    eb = np.where(a2a.nccl_dtype.to_numpy() == "half", 2.0, 1.0)
    a2a_rec, s2 = _fit_collective(a2a, eb, rel2, "alltoall", "NCCL alltoall (half x2 / int8 x1 bytes per element)")
    return ar_rec, a2a_rec, s1 + s2


def _record(r: FitResult, rel: str, selection: str, split: str) -> dict:
    return {"params": r.params, "table": rel, "selection": selection, "split": split, "rows_train": r.rows_train,
            "rows_heldout": r.rows_heldout, "mape_train": r.mape_train, "mape_heldout": r.mape_heldout,
            "max_ape_heldout": r.max_ape_heldout, "meets_target": r.mape_heldout is not None and r.mape_heldout <= TARGET_MAPE}


def fit_accelerator(acc_id: str) -> tuple[dict, pd.DataFrame]:
    """Fit every kernel family of one accelerator; returns (JSON record, held-out test rows)."""
    system = SYSTEMS[acc_id]
    acc = load_accelerator(acc_id)
    bw = acc.hbm_bandwidth
    peaks = {d: acc.peak_flops(d) for d in ("bf16", "fp8", "fp4")}
    families: dict = {}
    subsets: list[pd.DataFrame] = []
    for name, fn in (("gemm", fit_gemm), ("grouped_gemm", fit_grouped_gemm), ("attention_gqa", fit_gqa),
                     ("attention_mha", lambda *a: fit_gqa(*a, family="attention_mha")), ("attention_mla", fit_mla)):
        rec, sub = fn(system, bw, peaks)
        families[name] = rec
        subsets += sub
    ar, a2a, sub = fit_collectives(system)
    families["allreduce"] = ar
    families["alltoall"] = a2a
    subsets += sub
    rec = {
        "schema": 1,
        "accelerator": acc_id,
        "status": "fitted",
        "provenance": {
            "package": "aiconfigurator-core",
            "package_version": metadata.version("aiconfigurator-core"),
            "license": "Apache-2.0",
            "project": "https://github.com/ai-dynamo/aiconfigurator",
            "system": system,
            "framework": FRAMEWORK,
            "fitted_on": _dt.date.today().isoformat(),
            "target_mape_heldout": TARGET_MAPE,
            "spec_peaks_used": {"hbm_bandwidth": bw, **{f"flops_{k}": v for k, v in peaks.items()}},
        },
        "families": families,
    }
    tab = pd.concat(subsets, ignore_index=True)
    tab.insert(0, "accelerator", acc_id)
    return rec, tab


def default_out() -> Path:
    return Path(__file__).resolve().parent.parent / "cluster_specs" / "calibration"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qsengine.calibration.fit", description=__doc__.split("\n\n")[0])
    ap.add_argument("--acc", action="append", choices=sorted(SYSTEMS), help="accelerator(s) to fit (default: all)")
    ap.add_argument("--out", type=Path, default=default_out(), help="output directory")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    tables = []
    for acc_id in args.acc or sorted(SYSTEMS):
        rec, tab = fit_accelerator(acc_id)
        (args.out / f"{acc_id}.json").write_text(json.dumps(rec, indent=1, sort_keys=False) + "\n")
        tables.append(tab)
        fam = rec["families"]
        print(f"{acc_id}: " + "; ".join(
            f"{f} " + ",".join(f"{k}={v['mape_heldout'] or float('nan'):.3f}" for k, v in fam[f].items())
            if f not in ("allreduce", "alltoall") else f"{f}={fam[f]['mape_heldout']:.3f}" for f in fam))
    if not args.acc:
        pd.concat(tables, ignore_index=True).to_csv(args.out / "heldout_rows.csv", index=False, float_format="%.6g")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
