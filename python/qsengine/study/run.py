"""The study run: the validated grid through :func:`qsengine.sweep` (checkpointed,
resumable), the study's columns (settings, flags, uncertainty, tie-aware verdict),
the files it writes."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

from qsengine.decode.point import ContextWarning
from qsengine.study.config import _Z99, DEFAULT_TIE, StudyConfig, _Plan, _validate, cluster_display
from qsengine.study.figures import _plot_fragmentation, _plot_frontier, _plot_hbm, _plot_ratio, _plot_why
from qsengine.study.text import format_summary


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------


def run_study(config: StudyConfig | None = None, *, progress: bool = True, figures: bool = True,
              executor: Any = None, resume: bool = True):
    """Run the study as a :func:`qsengine.sweep`; returns the results as a
    pandas DataFrame (one row per computed model × cluster × context) and
    writes ``summary.md``, ``results.{csv,parquet}`` and the figures to
    ``config.out``.

    Every input is validated before any work. Completed points are kept in
    :func:`checkpoint_dir`; after an interruption the same call resumes from
    there and gives exactly the uninterrupted result (``resume=False``
    starts over). ``executor`` is anything :func:`qsengine.sweep` takes
    (e.g. a ``dask.distributed.Client``).
    """
    from qsengine.sweeps import sweep

    cfg = config or StudyConfig()
    plan = _validate(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ck = out / "checkpoint" / plan.key
    with warnings.catch_warnings():  # the study flags points past a model's maximum context in its output
        warnings.simplefilter("ignore", ContextWarning)
        raw = sweep(plan.points, executor=executor, checkpoint=ck, resume=resume, progress=progress,
                    seed=cfg.seed, threads=cfg.threads)
    df = _annotate(raw, plan, cfg)
    info = raw.attrs.get("sweep", {})
    df.attrs.update(elapsed_s=info.get("elapsed_s", math.nan), out=str(out), checkpoint=str(ck),
                    computed_points=info.get("computed_points"), resumed_points=info.get("resumed_points"),
                    settings=plan.settings, skipped=plan.skipped)
    _write(df, out, plan)
    if figures:
        _plot_ratio(df, out / "ratio_vs_context.png", tie=cfg.tie)
        primary = df[df["twin_shape"] == df["twin_shape"].iloc[0]] if len(df) else df  # the first twin shape
        _plot_hbm(primary, plan, out / "hbm_per_gpu.png")
        _plot_fragmentation(primary, plan, cfg, out / "fragmentation.png")
        _plot_frontier(primary, plan, cfg, out / "frontier.png")
        _plot_why(primary, out / "why.png")
    return df


def _annotate(raw, plan: _Plan, cfg: StudyConfig):
    """The sweep frame plus the study's columns: canonical cluster name, the
    run settings, max-context flags, the Monte Carlo's uncertainty of the
    ratio and the tie-aware verdict."""
    import numpy as np

    df = raw.copy()
    df.attrs = {}
    given = [p["cluster"] for p in plan.points]  # rows are in grid order
    names = {c: cluster_display(c) for c in dict.fromkeys(given)}
    df.insert(0, "cluster_name", [names[c] for c in given])
    df["cluster_input"] = [str(c) for c in given]
    maxctx = df["model"].map({mid: m.max_context for mid, m in plan.models.items()})
    df["max_context"] = maxctx.astype("float64")
    df["beyond_max_context"] = (df["context"] > df["max_context"]).fillna(False).astype(bool)
    # run settings as columns: a CSV row says how it was made
    df["precision"] = df["in_precision"]
    df["routing"] = df["in_routing"]
    df["twin"] = df["dense_model"]
    df["twin_shape"] = df["in_twin_attention"]
    df["workload"] = plan.settings["workload_label"]
    df["serving"] = cfg.serving
    df["draft_tokens"] = int(cfg.draft_tokens)
    df["acceptance"] = float(cfg.acceptance)
    df["slo_tpot_ms"] = np.nan if cfg.slo_tpot is None else cfg.slo_tpot * 1e3
    df["microbatches"] = str(cfg.microbatches)
    df["seed"] = cfg.seed
    df["qsengine_version"] = plan.settings["qsengine_version"]
    df["qsengine_code"] = plan.settings["qsengine_code"]
    for side in ("moe", "dense"):
        tpot = df[f"{side}_tpot_ms"].astype(float)
        df[f"{side}_tokens_per_s_per_user"] = np.where(tpot > 0, 1e3 / tpot, np.nan)
    # The Monte Carlo's relative standard error of the MoE's mean routed step time
    # (mc_rse_mean, reached by microbatches="auto"); the routed straggler is part of
    # the step, so it bounds the TPOT's, and tokens/s ∝ 1/TPOT makes it the ratio's.
    # A fixed microbatch count reports no precision: its error is estimated from the
    # normal-tail sd (p99 − mean)/2.326 over sqrt(microbatches run). Closed form: 0.
    mean, p99 = df["moe_tpot_ms"].astype(float), df["moe_tpot_p99_ms"].astype(float)
    n = df["mc_microbatches"].astype(float)
    from_tail = np.where(n > 0, np.abs(p99 - mean) / _Z99 / mean / np.sqrt(np.maximum(n, 1)), 0.0)
    rse = df["mc_rse_mean"].astype(float)
    rel = np.where(np.isfinite(rse), rse, from_tail)
    df["ratio_rel_err"] = rel
    df["ratio_err"] = df["ratio"].astype(float) * rel
    df["study_verdict"], df["tie_band"] = tie_aware_verdict(df["ratio"], df["verdict"], rel, cfg.tie)
    return df


def tie_aware_verdict(ratio, verdict, rel_err, tie: float = DEFAULT_TIE):
    """(verdict, band) per point: "tie" when |ratio − 1| <= band =
    max(``tie``, 2 × the ratio's relative standard error), else "dense" /
    "moe"; points without a ratio keep their verdict ("dense-only", ...)."""
    import numpy as np

    r = np.asarray(ratio, dtype=float)
    band = np.maximum(tie, 2.0 * np.asarray(rel_err, dtype=float))
    out = np.asarray(verdict, dtype=object).copy()
    both = np.isfinite(r)
    out[both & (np.abs(r - 1.0) <= band)] = "tie"
    out[both & (r - 1.0 > band)] = "dense"
    out[both & (1.0 - r > band)] = "moe"
    return out, band


def _write(df, out: Path, plan: _Plan) -> None:
    from qsengine.sweep_cli import write_results

    write_results(df, out, {"qsengine.study": json.dumps(plan.settings, default=str)})
    from qsengine.sweeps.checkpoint import atomic_write_bytes

    atomic_write_bytes(out / "summary.md", format_summary(df, markdown=True).encode("utf-8"))
