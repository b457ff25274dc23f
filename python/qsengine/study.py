"""The built-in study (``qsengine study``): the README's main job.

DeepSeek-V3, Qwen3-235B-A22B, Grok-1 and Switch-C against their quality-matched
dense twins on common 8-GPU servers and larger clusters, over context lengths
from 4K to 128K tokens, each model at its deployed precision.

The study is a :func:`qsengine.sweep` over model × cluster × context: the whole
grid is validated before any work, completed points are checkpointed under
``OUT/checkpoint/<key>/`` (``key`` hashes the grid and seed), a re-run resumes
exactly, and it runs in-process or on Dask. It writes, in ``OUT``:

* ``summary.md``: the run settings, then one verdict line per model × cluster
  (answer first), then the table;
* ``results.{csv,parquet}``: one row per point, with the run settings as
  columns (and in the parquet schema metadata, key ``qsengine.study``);
* ``ratio_vs_context.png``: dense/MoE throughput ratio vs context, one panel
  per model, one line per cluster; infeasible points marked below the data;
* ``hbm_per_gpu.png``: HBM use per GPU of the MoE and of its twin;
* ``fragmentation.png``: unique experts touched and straggler load vs batch
  for each studied model's routing.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

DEFAULT_MODELS: tuple[str, ...] = ("deepseek-v3", "qwen3-235b-a22b", "grok-1", "switch-c-2048")
DEFAULT_CLUSTERS: tuple[str, ...] = (
    "8xh100", "8xh200", "8xb200", "8xmi300x", "8xmi355x", "16xh100", "32xh100", "72xgb200",
)
DEFAULT_CONTEXTS: tuple[int, ...] = (4096, 8192, 16384, 32768, 65536, 131072)
DEFAULT_SEED = 20261128
#: Ratios within this relative distance of 1 are ties: the step model's
#: efficiency constants (docs/model.md) are not known to better than a few
#: percent, so a smaller difference is not an answer.
DEFAULT_TIE = 0.02
#: z of the normal 99th percentile: sd ≈ (p99 − mean) / 2.326.
_Z99 = 2.326

__all__ = ["StudyConfig", "run_study", "format_table", "format_summary", "parse_tokens", "cluster_display",
           "DEFAULT_MODELS", "DEFAULT_CLUSTERS", "DEFAULT_CONTEXTS"]


# ---------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------

_TOKENS_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")


def parse_tokens(text: str | int, what: str = "context") -> int:
    """A token count from ``32768``, ``"32768"``, ``"32K"`` / ``"32k"`` (×1024)
    or ``"1M"`` (×1024²); must be a positive integer."""
    if isinstance(text, bool):
        raise TypeError(f"{what}={text!r}: must be a number of tokens like 32768 or 32K")
    if isinstance(text, int):
        n = text
    else:
        m = _TOKENS_RE.match(str(text).replace("_", ""))
        if not m:
            raise ValueError(f"{what}={text}: must be a number of tokens like 32768, 32K or 1M")
        value = float(m.group(1)) * {"": 1, "k": 1024, "m": 1024 ** 2}[m.group(2).lower()]
        if value != int(value):
            raise ValueError(f"{what}={text}: must be a whole number of tokens")
        n = int(value)
    if n < 1:
        raise ValueError(f"{what}={text}: must be >= 1 token")
    return n


def format_tokens(n: int) -> str:
    """``131072`` -> ``"128K"``; counts that are not a multiple of 1024 as is."""
    if n >= 1024 ** 2 and n % 1024 ** 2 == 0:
        return f"{n // 1024 ** 2}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}K"
    return f"{n:,}"


def cluster_display(cluster: Any) -> str:
    """Canonical cluster name: ``8×H100``, ``32×H100``, ``72×GB200``."""
    from qsengine.specs.loaders import as_cluster

    c = as_cluster(cluster)
    acc = re.sub(r"-sxm\d*$", "", c.accelerator.id).upper()
    return f"{c.num_gpus}×{acc}"


@dataclass(frozen=True)
class StudyConfig:
    """What the study runs; every field has a documented default.

    ``precision=None`` runs each model at its deployed precision
    (:func:`qsengine.default_precision`); ``beyond_max_context`` is "flag"
    (computed, marked in every output) or "skip" (not computed, listed in the
    summary) for contexts above a model's ``max_context``; ``tie`` is the
    relative band around ratio 1 called a tie (widened to twice the Monte
    Carlo's standard error where that is larger)."""

    models: tuple[str, ...] = DEFAULT_MODELS
    clusters: tuple[str, ...] = DEFAULT_CLUSTERS
    contexts: tuple[int | str, ...] = DEFAULT_CONTEXTS
    q: float | str = "sqrt"
    routing: Any = "uniform"
    precision: str | None = None
    microbatches: int | str = "auto"
    slo_tpot: float | None = None
    seed: int = DEFAULT_SEED
    threads: int | None = None
    out: Path = field(default_factory=lambda: Path("qsengine-out") / "study")
    beyond_max_context: str = "flag"
    tie: float = DEFAULT_TIE


@dataclass(frozen=True)
class _Plan:
    """The validated study: grid points (simulate kwargs) and run settings."""

    points: list[dict[str, Any]]
    skipped: list[tuple[str, int, int]]  # (model, context, max_context) not computed
    settings: dict[str, Any]
    models: dict[str, Any]  # id -> Model
    key: str


def _validate(cfg: StudyConfig) -> _Plan:
    """Every input checked (and every spec loaded) before any work."""
    from qsengine import __version__
    from qsengine.specs.loaders import as_cluster, as_model, as_precision, default_precision

    if not cfg.models or not cfg.clusters or not cfg.contexts:
        raise ValueError("study: give at least one model, one cluster and one context")
    contexts = [parse_tokens(t) for t in cfg.contexts]
    models = {}
    spelled = {}  # id -> the name or path as given (what the sweep loads)
    for name in cfg.models:
        m = as_model(name)
        if not m.is_moe:
            raise ValueError(f"models: {name!r} is dense; the study compares an MoE model with its dense twin")
        models[m.id] = m
        spelled.setdefault(m.id, name)
    clusters = [as_cluster(c) for c in cfg.clusters]
    q = cfg.q
    if isinstance(q, str):
        if q != "sqrt":
            raise ValueError(f"q={q!r}: must be a number > 0 or 'sqrt'")
    elif isinstance(q, bool) or not isinstance(q, (int, float)) or not (math.isfinite(q) and q > 0):
        raise ValueError(f"q={q!r}: must be a finite number > 0 or 'sqrt' (0 is not 'unset')")
    if cfg.slo_tpot is not None and not (isinstance(cfg.slo_tpot, (int, float)) and math.isfinite(cfg.slo_tpot)
                                         and cfg.slo_tpot > 0):
        raise ValueError(f"slo_tpot={cfg.slo_tpot!r}: must be a number of seconds > 0, or None for no target")
    if cfg.beyond_max_context not in ("flag", "skip"):
        raise ValueError(f"beyond_max_context={cfg.beyond_max_context!r}: must be 'flag' or 'skip'")
    if not (isinstance(cfg.tie, (int, float)) and 0 <= cfg.tie < 1):
        raise ValueError(f"tie={cfg.tie!r}: must be a fraction in [0, 1)")
    precision = {mid: (as_precision(cfg.precision) if cfg.precision is not None else default_precision(m)).name
                 for mid, m in models.items()}
    points: list[dict[str, Any]] = []
    skipped: list[tuple[str, int, int]] = []
    for mid, m in models.items():
        for c, cname in zip(clusters, cfg.clusters):
            for t in contexts:
                if cfg.beyond_max_context == "skip" and m.max_context is not None and t > m.max_context:
                    if (mid, t, m.max_context) not in skipped:
                        skipped.append((mid, t, m.max_context))
                    continue
                points.append({"model": spelled[mid], "cluster": cname, "context": t, "q": q, "routing": cfg.routing,
                               "precision": precision[mid], "microbatches": cfg.microbatches,
                               "slo_tpot": cfg.slo_tpot})
    if not points:
        raise ValueError("study: every point is beyond its model's max_context and beyond_max_context='skip'")
    settings = {
        "precision": precision if cfg.precision is None else cfg.precision,
        "precision_rule": "deployed precision per model" if cfg.precision is None else "given",
        "routing": cfg.routing if isinstance(cfg.routing, str) else repr(cfg.routing),
        "twin": f"q = {q}" + (" (1/sqrt(s))" if q == "sqrt" else "") + ", twin_attention = same",
        "workload": "every sequence at the studied context (decode, full KV cache)",
        "slo_tpot_ms": None if cfg.slo_tpot is None else cfg.slo_tpot * 1e3,
        "microbatches": cfg.microbatches,
        "seed": cfg.seed,
        "tie": cfg.tie,
        "beyond_max_context": cfg.beyond_max_context,
        "qsengine_version": __version__,
    }
    # the key covers the specs' content too: an edited model or cluster file gets its own checkpoint
    ident = json.dumps({"points": points, "seed": cfg.seed, "version": __version__,
                        "specs": [repr(m) for m in models.values()] + [repr(c) for c in clusters]},
                       sort_keys=True, default=repr)
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return _Plan(points=points, skipped=skipped, settings=settings, models=models, key=key)


def checkpoint_dir(config: StudyConfig) -> Path:
    """Where :func:`run_study` keeps (and resumes) the completed points of ``config``."""
    return Path(config.out) / "checkpoint" / _validate(config).key


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
        _plot_hbm(df, plan, out / "hbm_per_gpu.png")
        _plot_fragmentation(df, plan, cfg, out / "fragmentation.png")
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
    df["workload"] = "uniform-context"
    df["slo_tpot_ms"] = np.nan if cfg.slo_tpot is None else cfg.slo_tpot * 1e3
    df["microbatches"] = str(cfg.microbatches)
    df["seed"] = cfg.seed
    df["qsengine_version"] = plan.settings["qsengine_version"]
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


# ---------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------


def fmt_num(x: float) -> str:
    """One number format everywhere: thousands separators, no exponents,
    about three significant digits."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _ratio_text(r: float, err: float) -> str:
    return f"{r:.2f}×" + (f" ±{err:.2f}" if err >= 0.005 else "")


def _short_reason(reason: str) -> str:
    reason = str(reason or "").strip()
    first = re.split(r"(?<=[^.\d])\. |; ", reason, maxsplit=1)[0]
    return first if len(first) <= 110 else first[:107] + "…"


def _point_text(row) -> str:
    v = row["study_verdict"]
    if v == "dense-only":
        return f"dense twin only (MoE: {_short_reason(row['moe_reason'])})"
    if v == "moe-only":
        return f"MoE only (dense twin: {_short_reason(row['dense_reason'])})"
    if v == "neither":
        return f"neither fits (MoE: {_short_reason(row['moe_reason'])})"
    r, err = float(row["ratio"]), float(row["ratio_err"])
    dm, mm = fmt_num(float(row["dense_tpot_ms"])), fmt_num(float(row["moe_tpot_ms"]))
    if v == "tie":
        return f"tie ({_ratio_text(r, err)}; dense {dm} ms/token, MoE {mm} ms)"
    if v == "dense":
        return f"dense twin {_ratio_text(r, err)} at {dm} ms/token (MoE {mm} ms)"
    return f"MoE {_ratio_text(1.0 / r, err / r / r)} at {mm} ms/token (dense twin {dm} ms)"


def verdict_lines(df) -> list[tuple[str, str, str]]:
    """One (model, cluster, text) per model × cluster: runs of contexts with the
    same verdict, each with its ratio and per-token latencies."""
    out = []
    for (m, c), g in df.groupby(["model", "cluster_name"], sort=False):
        g = g.sort_values("context")
        parts = []
        runs: list[list[Any]] = []
        for _, row in g.iterrows():
            if runs and runs[-1][0] == row["study_verdict"]:
                runs[-1][1].append(row)
            else:
                runs.append([row["study_verdict"], [row]])
        for v, rows in runs:
            lo, hi = format_tokens(int(rows[0]["context"])), format_tokens(int(rows[-1]["context"]))
            span = lo if lo == hi else f"{lo}–{hi}"
            beyond = [r for r in rows if bool(r["beyond_max_context"])]
            flag = ""
            if beyond:
                first = format_tokens(int(beyond[0]["context"]))
                flag = f" ⚠ beyond max context {format_tokens(int(beyond[0]['max_context']))}" + \
                    (f" from {first}" if beyond[0] is not rows[0] else "")
            text = _point_text(rows[-1])
            if len(rows) > 1 and v in ("dense", "moe", "tie"):
                ratios = [float(r["ratio"]) if v != "moe" else 1.0 / float(r["ratio"]) for r in rows]
                last = rows[-1]
                dm, mm = fmt_num(float(last["dense_tpot_ms"])), fmt_num(float(last["moe_tpot_ms"]))
                text = {"dense": "dense twin ", "moe": "MoE ", "tie": "tie "}[v] + \
                    f"{min(ratios):.2f}–{max(ratios):.2f}× (at {hi}: dense {dm} ms/token, MoE {mm} ms)"
            parts.append(f"{span}: {text}{flag}")
        out.append((m, c, "; ".join(parts)))
    return out


def format_summary(df, *, markdown: bool = False) -> str:
    """Answer first: the settings, one verdict line per model × cluster, then
    notes (skipped / flagged contexts) and, in markdown, the full table."""
    s = df.attrs.get("settings", {})
    lines: list[str] = []
    h = "## " if markdown else ""
    lines.append(f"{'# ' if markdown else ''}qsengine study: MoE vs its quality-matched dense twin (decode)")
    lines.append("")
    prec = s.get("precision")
    prec_text = ", ".join(f"{k} {v}" for k, v in prec.items()) if isinstance(prec, dict) else str(prec)
    slo = s.get("slo_tpot_ms")
    lines += [
        f"- precision: {prec_text} ({s.get('precision_rule', '')})",
        f"- routing: {s.get('routing')}; Monte Carlo microbatches: {s.get('microbatches')}",
        f"- twin: {s.get('twin')}",
        f"- workload: {s.get('workload')}",
        f"- latency target: {'none (largest batch that fits)' if slo is None else f'{fmt_num(slo)} ms per token'}",
        f"- seed: {s.get('seed')}; qsengine {s.get('qsengine_version')}",
        f"- ratio = dense tokens/s ÷ MoE tokens/s; a tie is within ±{s.get('tie', DEFAULT_TIE):.0%} of 1 "
        "(or 2 standard errors of the Monte Carlo, if larger); ±: one standard error",
        "",
    ]
    for m, g in df.groupby("model", sort=False):
        r0 = g.iloc[0]
        lines.append(f"{h}{m} (s = {float(r0['s']):.3f}, twin {r0['twin']} at q = {float(r0['q']):.2f})")
        if markdown:
            lines.append("")
        for mm, c, text in verdict_lines(g):
            lines.append(f"{'- ' if markdown else '  '}{c:<9s} {text}")
        if markdown:
            lines.append("")
    skipped = df.attrs.get("skipped") or []
    flagged = df[df["beyond_max_context"]]
    if len(flagged):
        lines.append("Beyond a model's max context (computed, flagged ⚠): " + ", ".join(
            f"{m} > {format_tokens(int(g['max_context'].iloc[0]))}"
            for m, g in flagged.groupby("model", sort=False)))
    if skipped:
        lines.append("Skipped (beyond max context): " + ", ".join(
            f"{m} {format_tokens(t)} (max {format_tokens(mx)})" for m, t, mx in skipped))
    if markdown:
        lines += ["", f"{h}All points", "", format_table(df, markdown=True)]
    return "\n".join(lines).rstrip() + "\n"


TABLE_COLUMNS = [
    ("model", "model"), ("cluster_name", "cluster"), ("context", "context"), ("study_verdict", "verdict"),
    ("ratio", "ratio"), ("moe_batch", "MoE batch"), ("moe_tokens_per_s", "MoE tok/s"),
    ("moe_tpot_ms", "MoE TPOT ms"), ("moe_tpot_p99_ms", "MoE p99 ms"), ("moe_tokens_per_s_per_user", "MoE tok/s/user"),
    ("dense_batch", "dense batch"), ("dense_tokens_per_s", "dense tok/s"), ("dense_tpot_ms", "dense TPOT ms"),
    ("dense_tpot_p99_ms", "dense p99 ms"), ("dense_tokens_per_s_per_user", "dense tok/s/user"),
    ("break_even_q", "q*"),
]


def format_table(df, *, markdown: bool = False) -> str:
    """Every point as a text (or markdown) table: verdict, ratio, and for each
    side batch, tokens/s, TPOT mean and p99, tokens/s per user; one number
    format, canonical cluster names, contexts as 4K…128K."""
    rows = []
    for _, r in df.iterrows():
        row = []
        for col, _ in TABLE_COLUMNS:
            v = r[col]
            side = col.split("_", 1)[0]
            if side in ("moe", "dense") and not bool(r[f"{side}_feasible"]):
                row.append("–")  # that side does not fit: no numbers
            elif col == "context":
                row.append(format_tokens(int(v)) + ("⚠" if bool(r["beyond_max_context"]) else ""))
            elif col == "ratio":
                row.append("–" if not math.isfinite(float(v)) else _ratio_text(float(v), float(r["ratio_err"])))
            elif col.endswith("_batch"):
                row.append(f"{int(v):,}" if int(v) else "–")
            elif isinstance(v, str):
                row.append(v)
            else:
                row.append(fmt_num(float(v)))
        rows.append(row)
    head = [h for _, h in TABLE_COLUMNS]
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    text = ["  ".join(h.rjust(w) if i > 3 else h.ljust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    for r in rows:
        text.append("  ".join(x.rjust(w) if i > 3 else x.ljust(w) for i, (x, w) in enumerate(zip(r, widths))))
    return "\n".join(text)


# ---------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _context_axis(ax, contexts: Sequence[int]) -> None:
    """Log2 x axis with ticks 4K…128K (thinned to at most 8 labels)."""
    from matplotlib.ticker import NullFormatter, NullLocator

    ticks = sorted(set(int(t) for t in contexts))
    step = max(1, math.ceil(len(ticks) / 8))
    shown = ticks[::step]
    ax.set_xscale("log", base=2)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(shown, [format_tokens(t) for t in shown], rotation=30 if len(shown) > 5 else 0)
    if len(ticks) > 1:
        ax.set_xlim(ticks[0] / 1.25, ticks[-1] * 1.25)
    else:
        ax.set_xlim(ticks[0] / 2, ticks[0] * 2)
    ax.set_xlabel("context (tokens)")


def _plot_ratio(df, path: Path, *, tie: float = DEFAULT_TIE) -> None:
    """Ratio dense/MoE vs context per model; which side of 1 wins is written on
    the axis; points where one side does not fit are markers in a strip below
    the data (outside its range) with their own legend entries."""
    import numpy as np
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FormatStrFormatter

    plt = _pyplot()
    models = list(dict.fromkeys(df["model"]))
    ncol = min(2, len(models))
    nrow = math.ceil(len(models) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.2 * ncol + 2.2, 4.2 * nrow), squeeze=False)
    clusters = list(dict.fromkeys(df["cluster_name"]))
    cmap = plt.get_cmap("tab10" if len(clusters) <= 10 else "tab20")
    color = {c: cmap(i % cmap.N) for i, c in enumerate(clusters)}
    only_marker = {"dense-only": "^", "moe-only": "v", "neither": "x"}
    used: set[str] = set()
    for ax, m in zip(axes.flat, models):
        sub = df[df["model"] == m]
        r = sub["ratio"].astype(float)
        finite = r[np.isfinite(r) & (r > 0)]
        lo = min(float(finite.min()) if len(finite) else 1.0, 1.0 / 1.3)
        hi = max(float(finite.max()) if len(finite) else 1.0, 1.3)
        ymin, ymax = lo / 1.15, hi * 1.15
        strip = ymin / 1.25  # infeasible markers: below every ratio drawn
        strip_pts: dict[int, list[tuple[str, str]]] = {}  # context -> (cluster, marker) shown in the strip
        for c in clusters:
            s = sub[sub["cluster_name"] == c].sort_values("context")
            if not len(s):
                continue
            ok = s[np.isfinite(s["ratio"].astype(float))]
            if len(ok):
                err = ok["ratio_err"].astype(float).to_numpy()
                ax.errorbar(ok["context"], ok["ratio"].astype(float), yerr=err if np.any(err > 0) else None,
                            marker="o", ms=4, color=color[c], capsize=2, lw=1.2)
            for v, mk in only_marker.items():
                for t in s.loc[s["study_verdict"] == v, "context"]:
                    used.add(v)
                    strip_pts.setdefault(int(t), []).append((c, mk))
            flagged = ok[ok["beyond_max_context"]]
            if len(flagged):
                used.add("beyond")
                ax.scatter(flagged["context"], flagged["ratio"].astype(float), marker="o", s=60,
                           facecolors="none", edgecolors="k", lw=0.8, zorder=4)
        for t, marks in strip_pts.items():  # side by side around their context, not on top of each other
            for j, (c, mk) in enumerate(marks):
                ax.scatter([t * 1.045 ** (j - (len(marks) - 1) / 2)], [strip], marker=mk, color=color[c], s=26,
                           zorder=3)
        ax.set_yscale("log")
        ax.set_ylim(strip / 1.2, ymax)
        ax.axhspan(strip / 1.2, ymin, color="0.93", zorder=0)
        ax.axhspan(1 - tie, 1 + tie, color="0.85", zorder=0)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        yt = [t for t in (0.1, 0.2, 0.25, 0.33, 0.5, 0.67, 0.8, 1, 1.25, 1.5, 2, 3, 4, 5, 10, 20) if ymin <= t <= ymax]
        ax.set_yticks(yt, [f"{t:g}" for t in yt])
        side = ax.get_yaxis_transform()  # x in axes, y in data
        ax.text(0.99, 1 + tie, "↑ dense twin serves more", transform=side, ha="right", va="bottom", fontsize=7)
        ax.text(0.99, 1 - tie, "↓ MoE serves more", transform=side, ha="right", va="top", fontsize=7)
        ax.text(0.99, 0.01, "one side does not fit", transform=ax.transAxes, ha="right", va="bottom",
                fontsize=7, color="0.35")
        qs = float(sub["qs"].iloc[0])
        if lo <= 1 / qs <= hi:
            ax.axhline(1.0 / qs, color="gray", lw=0.8, ls=":")
        ax.yaxis.set_minor_formatter(FormatStrFormatter(""))
        _context_axis(ax, sub["context"])
        ax.set_ylabel("throughput ratio dense / MoE")
        prec = sub["precision"].iloc[0]
        ax.set_title(f"{m} at {prec} (qs = {qs:.2f}, 1/qs dotted)", fontsize=9)
    for ax in list(axes.flat)[len(models):]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=color[c], marker="o", ms=4, label=c) for c in clusters]
    handles.append(Line2D([], [], color="k", ls="--", lw=0.8, label="ratio 1 (grey band: tie)"))
    labels = {"dense-only": "only the dense twin fits", "moe-only": "only the MoE fits", "neither": "neither fits"}
    for v, mk in only_marker.items():
        if v in used:
            handles.append(Line2D([], [], color="0.3", marker=mk, ls="", label=labels[v]))
    if "beyond" in used:
        handles.append(Line2D([], [], color="k", marker="o", mfc="none", ls="", ms=8,
                              label="beyond the model's max context"))
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0 - 2.1 / fig.get_figwidth(), 0.5),
               fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1.0 - 2.2 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _examples(df, plan: _Plan) -> dict[str, Any]:
    """Per model: the middle context at the first cluster where the MoE fits
    (else the first cluster)."""
    ex = {}
    for m, g in df.groupby("model", sort=False):
        ctxs = sorted(set(int(t) for t in g["context"]))
        t = ctxs[len(ctxs) // 2]
        at = g[g["context"] == t]
        fit = at[at["moe_feasible"].astype(bool)]
        ex[m] = (fit if len(fit) else at).iloc[0]
    return ex


def _plot_hbm(df, plan: _Plan, path: Path) -> None:
    """HBM per GPU of each model's MoE and twin at its example point (packed
    again with the plan the study chose)."""
    import textwrap

    from qsengine.packing import pack
    from qsengine.packing.cli import _parse_plan

    plt = _pyplot()
    ex = _examples(df, plan)
    fig, axes = plt.subplots(len(ex), 2, figsize=(11, 3.2 * len(ex)), squeeze=False)
    handles: dict[str, Any] = {}
    for row, (m, r) in zip(axes, ex.items()):
        model = plan.models[m]
        twin = model.dense_twin(float(r["q"])) if r["dense_model"] != m else model
        for ax, side, spec, label in ((row[0], "moe", model, "MoE"), (row[1], "dense", twin, "dense twin")):
            where = f"{m} {label} on {r['cluster_name']} @ {format_tokens(int(r['context']))}, {r['precision']}"
            if bool(r[f"{side}_feasible"]):
                pk = pack(spec, r["cluster_input"], int(r["context"]), plan=_parse_plan(r[f"{side}_plan"]),
                          precision=r["precision"])
                pk.plot(ax=ax)
                for hnd, lab in zip(*ax.get_legend_handles_labels()):
                    handles.setdefault(lab, hnd)
                if ax.get_legend() is not None:
                    ax.get_legend().remove()
                ax.set_title(f"{where}: {r[f'{side}_plan']}, batch {int(r[f'{side}_batch']):,}", fontsize=8)
            else:
                text = textwrap.fill(f"{where}: does not fit. {r[f'{side}_reason']}", 70)
                ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=8, transform=ax.transAxes)
                ax.set_axis_off()
    if handles:
        fig.legend(list(handles.values()), list(handles.keys()), loc="lower center",
                   ncol=min(6, len(handles)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 if handles else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_fragmentation(df, plan: _Plan, cfg: StudyConfig, path: Path) -> None:
    """Unique experts and straggler load vs batch for each studied model
    (its experts and top-k, the study's routing, over the GPUs of the
    smallest studied cluster)."""
    from qsengine.specs.loaders import as_cluster
    from qsengine.study_routing import fragmentation_curve, plot_fragmentation

    plt = _pyplot()
    gpus = min(as_cluster(c).num_gpus for c in cfg.clusters)
    models = list(plan.models.values())
    ncol = min(2, len(models))
    nrow = math.ceil(len(models) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.5 * ncol, 4.2 * nrow), squeeze=False)
    batches = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    routing = cfg.routing
    label = routing if isinstance(routing, str) else type(routing).__name__
    for ax, m in zip(axes.flat, models):
        g = min(gpus, m.routed_experts)
        curve = fragmentation_curve(m.routed_experts, m.top_k, g, batches, routing=routing, microbatches=1000,
                                    seed=cfg.seed, threads=cfg.threads)
        plot_fragmentation(curve, ax=ax, label=label)
        ax.set_title(f"{m.id} routing (E={m.routed_experts}, k={m.top_k}, {g} GPUs), {label}", fontsize=9)
        leg = ax.get_legend()
        if leg is not None:
            leg.remove()
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.18), ncol=2, frameon=False)
    for ax in list(axes.flat)[len(models):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def _positive_ms(text: str) -> float:
    import argparse

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a number of milliseconds > 0") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a number of milliseconds > 0 "
                                         "(leave the flag out for no latency target; 0 is not 'unset')")
    return v


def _q_arg(text: str) -> float | str:
    import argparse

    if text == "sqrt":
        return text
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a number > 0 or 'sqrt'") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a number > 0 or 'sqrt' (0 is not 'unset')")
    return v


def _microbatches_arg(text: str) -> int | str:
    import argparse

    if text == "auto":
        return text
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: must be an integer >= 0 or 'auto'") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be an integer >= 0 or 'auto'")
    return v


def add_parser(sub) -> None:
    """``qsengine study`` and ``qsengine simulate``."""
    from qsengine.specs.precision import PRESETS
    from qsengine.sweep_cli import add_executor_args

    d = StudyConfig()
    p = sub.add_parser(
        "study", help="run the built-in MoE vs dense-twin study (the main job)",
        description="MoE models against their quality-matched dense twins over clusters and contexts. Prints one "
                    "verdict line per model x cluster; writes summary.md, results.csv/parquet and figures to --out. "
                    "Checkpointed: after Ctrl-C the same command resumes.")
    p.add_argument("--out", type=Path, default=d.out, help="output folder (default %(default)s)")
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), metavar="MODEL",
                   help="MoE models: shipped names (qsengine list models), model TOML files or Hugging Face "
                        "config.json files (default: %(default)s)")
    p.add_argument("--clusters", nargs="+", default=list(DEFAULT_CLUSTERS), metavar="CLUSTER",
                   help="clusters: shipped names, 'NxGPU' such as 8xH200 or 72xGB200, or cluster TOML files "
                        "(default: %(default)s)")
    p.add_argument("--contexts", nargs="+", default=list(DEFAULT_CONTEXTS), metavar="TOKENS",
                   help="context lengths: 32768, 32K or 1M (default: 4K 8K 16K 32K 64K 128K)")
    p.add_argument("--q", type=_q_arg, default="sqrt",
                   help="dense twin size: q x the MoE's active parameters; a number > 0 or 'sqrt' = 1/sqrt(s) "
                        "(default)")
    p.add_argument("--precision", default=None, choices=sorted(PRESETS), metavar="PRESET",
                   help="weights/KV precision for every model (default: each model's deployed precision, "
                        f"qsengine show MODEL); one of {', '.join(sorted(PRESETS))}")
    p.add_argument("--routing", default="uniform",
                   help="routing model of the Monte Carlo: uniform | powerlaw:A | group:G:T[:BASE] | ... "
                        "(default uniform)")
    p.add_argument("--microbatches", type=_microbatches_arg, default="auto",
                   help="routing Monte Carlo microbatches per point; 'auto' (default) sizes it per point, "
                        "0 = closed form (fast)")
    p.add_argument("--slo-tpot-ms", type=_positive_ms, default=None, metavar="MS",
                   help="per-token latency target in ms > 0 (caps the batch); default: none")
    p.add_argument("--seed", type=int, default=d.seed, help="study seed (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="C++ threads per point (default: all cores)")
    p.add_argument("--beyond-max-context", choices=("flag", "skip"), default="flag",
                   help="contexts above a model's max_context: compute and flag them (default) or skip them")
    p.add_argument("--tie", type=float, default=DEFAULT_TIE,
                   help="ratios within this fraction of 1 are ties (default %(default)s)")
    p.add_argument("--table", action="store_true", help="also print every point (the table in summary.md)")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.add_argument("--no-resume", action="store_true", help="discard this study's checkpoint and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is shown only on a terminal)")
    add_executor_args(p)
    p.set_defaults(handler=_run_study_cli)

    s = sub.add_parser("simulate", help="simulate one point: MoE vs its dense twin",
                       description="One point: the MoE's and its dense twin's best plan, batch, TPOT and "
                                   "tokens/s on one cluster at one context, and the ratio.")
    s.add_argument("--model", required=True, help="MoE model: shipped name, TOML or HF config.json")
    s.add_argument("--cluster", required=True, help="cluster: shipped name, 'NxGPU' (8xH200) or TOML file")
    s.add_argument("--context", required=True, help="context length: 32768 or 32K")
    s.add_argument("--q", type=_q_arg, default=None, help="twin size multiplier > 0 or 'sqrt' (default sqrt)")
    s.add_argument("--dense", default=None, help="explicit dense model instead of a twin (must be dense)")
    s.add_argument("--routing", default="uniform", help="routing model of the Monte Carlo (default uniform)")
    s.add_argument("--precision", default=None, choices=sorted(PRESETS), metavar="PRESET",
                   help="precision preset (default: the model's deployed precision)")
    s.add_argument("--microbatches", type=_microbatches_arg, default="auto",
                   help="routing Monte Carlo microbatches; 'auto' (default) or 0 = closed form")
    s.add_argument("--slo-tpot-ms", type=_positive_ms, default=None, metavar="MS",
                   help="per-token latency target in ms > 0 (default: none)")
    s.add_argument("--seed", type=int, default=None, help="seed (default: fresh entropy, printed)")
    s.add_argument("--threads", type=int, default=None, help="C++ threads (default: all cores)")
    s.add_argument("--json", action="store_true", help="print the full result as JSON")
    s.set_defaults(handler=_run_simulate_cli)


def _study_command(args) -> str:
    """The command line that resumes this study (same settings)."""
    import shlex

    argv = getattr(args, "_argv", None)
    if argv is not None:
        return "qsengine " + " ".join(shlex.quote(a) for a in argv if a != "--no-resume")
    return "qsengine study (same arguments)"


def _run_study_cli(args) -> int:
    from qsengine.sweep_cli import executor_from_args, interrupted_message

    cfg = StudyConfig(models=tuple(args.models), clusters=tuple(args.clusters), contexts=tuple(args.contexts),
                      q=args.q, routing=args.routing, precision=args.precision, microbatches=args.microbatches,
                      slo_tpot=None if args.slo_tpot_ms is None else args.slo_tpot_ms / 1e3, seed=args.seed,
                      threads=args.threads, out=args.out, beyond_max_context=args.beyond_max_context, tie=args.tie)
    ck = checkpoint_dir(cfg)  # validates everything before any work
    progress = not args.no_progress and sys.stderr.isatty()
    try:
        with executor_from_args(args) as executor:
            df = run_study(cfg, progress=progress, figures=not args.no_figures, executor=executor,
                           resume=not args.no_resume)
    except KeyboardInterrupt:
        print(interrupted_message(ck, len(_validate(cfg).points), _study_command(args)), file=sys.stderr)
        return 130
    print(format_summary(df))
    if args.table:
        print(format_table(df))
        print()
    print(f"{len(df)} points ({df.attrs['computed_points']} computed, {df.attrs['resumed_points']} resumed) in "
          f"{df.attrs['elapsed_s']:.1f} s; summary.md, results.csv/parquet and figures in {df.attrs['out']}/")
    return 0


def _run_simulate_cli(args) -> int:
    from qsengine.decode.simulate import simulate
    from qsengine.specs.loaders import as_model, default_precision

    model = as_model(args.model)
    if args.dense is not None and as_model(args.dense).is_moe:
        raise ValueError(f"--dense {args.dense!r}: is an MoE model; the dense side must be a dense model")
    precision = args.precision if args.precision is not None else default_precision(model).name
    res = simulate(model, args.cluster, parse_tokens(args.context), q=args.q, dense=args.dense,
                   routing=args.routing, precision=precision, microbatches=args.microbatches,
                   slo_tpot=None if args.slo_tpot_ms is None else args.slo_tpot_ms / 1e3, seed=args.seed,
                   threads=args.threads)
    if args.json:
        print(json.dumps(res.to_dict(), indent=2, default=str))
    else:
        print(res.summary())
    return 0
