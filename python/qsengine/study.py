"""The built-in study (``qsengine study``): the README's main job.

DeepSeek-V3, Qwen3-235B-A22B, Grok-1 and Switch-C against their quality-matched
dense twins on common 8-GPU servers and larger clusters, over context lengths
from 4K to 128K tokens. Writes a results table (CSV and parquet) and figures:

* ``ratio_vs_context.png``: dense/MoE throughput ratio vs context, one panel
  per model, one line per cluster (points where only one side fits are marked);
* ``hbm_per_gpu.png``: HBM use per GPU of the MoE and of its twin;
* ``fragmentation.png``: unique experts touched and straggler load vs batch
  for DeepSeek-V3-like routing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MODELS: tuple[str, ...] = ("deepseek-v3", "qwen3-235b-a22b", "grok-1", "switch-c-2048")
DEFAULT_CLUSTERS: tuple[str, ...] = (
    "8xh100", "8xh200", "8xb200", "8xmi300x", "8xmi355x", "16xh100", "32xh100", "72xgb200",
)
DEFAULT_CONTEXTS: tuple[int, ...] = (4096, 8192, 16384, 32768, 65536, 131072)

__all__ = ["StudyConfig", "run_study", "DEFAULT_MODELS", "DEFAULT_CLUSTERS", "DEFAULT_CONTEXTS"]


@dataclass(frozen=True)
class StudyConfig:
    """What the built-in study runs; every field has a documented default."""

    models: tuple[str, ...] = DEFAULT_MODELS
    clusters: tuple[str, ...] = DEFAULT_CLUSTERS
    contexts: tuple[int, ...] = DEFAULT_CONTEXTS
    q: float | str = "sqrt"
    routing: Any = "uniform"
    precision: str = "fp8"
    microbatches: int | str = "auto"
    slo_tpot: float | None = None
    seed: int = 20261128
    threads: int | None = None
    out: Path = field(default_factory=lambda: Path("qsengine-out") / "study")


def run_study(config: StudyConfig | None = None, *, progress: bool = True, figures: bool = True):
    """Run the study; returns the results as a pandas DataFrame (one row per
    model × cluster × context) and writes table and figures to ``config.out``."""
    import numpy as np
    import pandas as pd
    from tqdm.auto import tqdm

    from qsengine.decode.simulate import simulate

    cfg = config or StudyConfig()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    root = np.random.SeedSequence(cfg.seed)
    points = [(m, c, t) for m in cfg.models for c in cfg.clusters for t in cfg.contexts]
    rows: list[dict[str, Any]] = []
    examples: dict[str, Any] = {}
    t0 = time.perf_counter()
    bar = tqdm(points, desc="qsengine study", unit="pt", disable=not progress)
    for i, (m, c, t) in enumerate(bar):
        bar.set_postfix_str(f"{m} {c} {t // 1024}K")
        point_seed = np.random.SeedSequence(root.entropy, spawn_key=(i,))
        res = simulate(m, c, t, q=cfg.q, routing=cfg.routing, precision=cfg.precision,
                       microbatches=cfg.microbatches, slo_tpot=cfg.slo_tpot, seed=point_seed, threads=cfg.threads)
        rows.append(res.to_record())
        # HBM figure: middle context, first cluster where the MoE fits (else the first cluster).
        if t == cfg.contexts[len(cfg.contexts) // 2] and (m not in examples or
                                                           (res.moe.feasible and not examples[m].moe.feasible)):
            examples[m] = res
    elapsed = time.perf_counter() - t0
    df = pd.DataFrame(rows)
    df.to_csv(out / "results.csv", index=False)
    df.to_parquet(out / "results.parquet", index=False)
    if figures:
        _plot_ratio(df, out / "ratio_vs_context.png")
        _plot_hbm(examples, out / "hbm_per_gpu.png")
        _plot_fragmentation(out / "fragmentation.png", seed=cfg.seed, threads=cfg.threads)
    df.attrs["elapsed_s"] = elapsed
    df.attrs["out"] = str(out)
    return df


def format_table(df) -> str:
    """The study's results as a compact text table."""
    cols = ["model", "cluster", "context", "qs", "moe_batch", "moe_tokens_per_s", "dense_batch",
            "dense_tokens_per_s", "ratio", "verdict", "break_even_q"]
    view = df[cols].copy()
    view["context"] = (view["context"] // 1024).astype(str) + "K"
    return view.to_string(index=False, float_format=lambda x: f"{x:,.3g}" if abs(x) < 1e4 else f"{x:,.0f}")


def _plot_ratio(df, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    models = list(dict.fromkeys(df["model"]))
    ncol = min(2, len(models))
    nrow = math.ceil(len(models) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.5 * ncol, 4.2 * nrow), squeeze=False)
    for ax, m in zip(axes.flat, models):
        sub = df[df["model"] == m]
        for j, c in enumerate(dict.fromkeys(sub["cluster"])):
            s = sub[sub["cluster"] == c].sort_values("context")
            line, = ax.plot(s["context"], s["ratio"], marker="o", label=c)
            only = s[s["verdict"] == "dense-only"]
            if len(only):  # ratio undefined: one row of markers per cluster along the top edge
                ax.scatter(only["context"], [0.97 - 0.035 * j] * len(only), marker="^", color=line.get_color(),
                           transform=ax.get_xaxis_transform(), clip_on=False)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        qs = float(sub["qs"].iloc[0])
        ax.axhline(1.0 / qs, color="gray", lw=0.8, ls=":", label=f"1/qs = {1 / qs:.2f}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("throughput ratio dense / MoE")
        ax.set_title(f"{m} (qs = {qs:.2f}); ▲ = only the dense twin fits")
        ax.legend(fontsize=7, ncol=2)
    for ax in list(axes.flat)[len(models):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_hbm(examples: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not examples:
        return
    import textwrap

    fig, axes = plt.subplots(len(examples), 2, figsize=(11, 3.2 * len(examples)), squeeze=False)
    handles: dict[str, Any] = {}
    for row, (m, res) in zip(axes, examples.items()):
        for ax, side, label in ((row[0], res.moe, "MoE"), (row[1], res.dense, "dense twin")):
            where = f"{m} {label} on {res.cluster.label} @ {res.context // 1024}K"
            if side.packing is not None:
                side.packing.plot(ax=ax)
                for h, lab in zip(*ax.get_legend_handles_labels()):
                    handles.setdefault(lab, h)
                ax.get_legend().remove()
                ax.set_title(f"{where}: {side.plan.label}, batch {side.cluster_batch}", fontsize=8)
            else:
                text = textwrap.fill(f"{where}: infeasible. {side.reason}", 60)
                ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=8, transform=ax.transAxes)
                ax.set_axis_off()
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=min(6, len(handles)),
               fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_fragmentation(path: Path, *, seed: int, threads: int | None) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from qsengine.routing import GroupLimited, PowerLaw, Uniform
    from qsengine.study_routing import fragmentation_curve, plot_fragmentation

    batches = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, routing, label in ((axes[0], Uniform(), "uniform"),
                               (axes[1], GroupLimited(8, 4, PowerLaw(1.01)), "group-limited power law 1.01")):
        df = fragmentation_curve(256, 8, 8, batches, routing=routing, microbatches=2000, seed=seed)
        plot_fragmentation(df, ax=ax, label=label)
        ax.set_title(f"DeepSeek-V3 routing (E=256, k=8, 8 GPUs): {label}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_parser(sub) -> None:
    """``qsengine study`` and ``qsengine simulate``."""
    p = sub.add_parser("study", help="run the built-in MoE vs dense-twin study (the main job)")
    p.add_argument("--out", type=Path, default=StudyConfig().out, help="output folder (default %(default)s)")
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    p.add_argument("--clusters", nargs="+", default=list(DEFAULT_CLUSTERS))
    p.add_argument("--contexts", nargs="+", type=int, default=list(DEFAULT_CONTEXTS))
    p.add_argument("--q", default="sqrt", help="quality multiplier, a number or 'sqrt' (default)")
    p.add_argument("--precision", default=StudyConfig().precision,
                   help="weights/KV precision preset (default %(default)s: how these models are served)")
    p.add_argument("--microbatches", default="auto")
    p.add_argument("--slo-tpot-ms", type=float, default=None)
    p.add_argument("--seed", type=int, default=StudyConfig().seed)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=_run_study_cli)

    s = sub.add_parser("simulate", help="simulate one point: MoE vs its dense twin")
    s.add_argument("--model", required=True)
    s.add_argument("--cluster", required=True)
    s.add_argument("--context", required=True, type=int)
    s.add_argument("--q", default=None)
    s.add_argument("--dense", default=None, help="explicit dense model instead of a twin")
    s.add_argument("--routing", default="uniform")
    s.add_argument("--precision", default="bf16")
    s.add_argument("--microbatches", default="auto")
    s.add_argument("--slo-tpot-ms", type=float, default=None)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--json", action="store_true", help="print the full result as JSON")
    s.set_defaults(handler=_run_simulate_cli)


def _parse_q(text: str | None) -> float | str | None:
    if text is None or text == "sqrt":
        return text
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--q {text!r}: must be a number or 'sqrt'") from None


def _parse_microbatches(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--microbatches {text!r}: must be an integer or 'auto'") from None


def _run_study_cli(args) -> int:
    cfg = StudyConfig(models=tuple(args.models), clusters=tuple(args.clusters), contexts=tuple(args.contexts),
                      q=_parse_q(args.q) or "sqrt", precision=args.precision,
                      microbatches=_parse_microbatches(args.microbatches),
                      slo_tpot=args.slo_tpot_ms / 1e3 if args.slo_tpot_ms else None, seed=args.seed,
                      threads=args.threads, out=args.out)
    df = run_study(cfg, progress=not args.no_progress)
    print(format_table(df))
    print(f"\n{len(df)} points in {df.attrs['elapsed_s']:.1f} s; table and figures in {df.attrs['out']}/")
    return 0


def _run_simulate_cli(args) -> int:
    import json

    from qsengine.decode.simulate import simulate

    res = simulate(args.model, args.cluster, args.context, q=_parse_q(args.q), dense=args.dense,
                   routing=args.routing, precision=args.precision,
                   microbatches=_parse_microbatches(args.microbatches),
                   slo_tpot=args.slo_tpot_ms / 1e3 if args.slo_tpot_ms else None, seed=args.seed,
                   threads=args.threads)
    if args.json:
        print(json.dumps(res.to_dict(), indent=2, default=str))
    else:
        print(res.summary())
    return 0
