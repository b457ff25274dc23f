"""The study's figures: ratio vs context (which side of 1 wins, infeasible points
below the data), HBM per GPU, routing fragmentation of the studied models."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from qsengine.study.config import DEFAULT_TIE, StudyConfig, format_tokens

from qsengine.study.config import _Plan


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
    import pandas as pd
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FormatStrFormatter

    plt = _pyplot()
    shapes = list(dict.fromkeys(df["twin_shape"])) if "twin_shape" in df else [None]
    # one panel per model and twin shape: a row per model, a column per shape (or two models a row)
    panels = [(m, t) for m in dict.fromkeys(df["model"]) for t in shapes]
    ncol = len(shapes) if len(shapes) > 1 else min(2, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.2 * ncol + 2.2, 4.2 * nrow), squeeze=False)
    clusters = list(dict.fromkeys(df["cluster_name"]))
    cmap = plt.get_cmap("tab10" if len(clusters) <= 10 else "tab20")
    color = {c: cmap(i % cmap.N) for i, c in enumerate(clusters)}
    only_marker = {"dense-only": "^", "moe-only": "v", "neither": "x"}
    used: set[str] = set()
    for ax, (m, shape) in zip(axes.flat, panels):
        sub = df[(df["model"] == m) & ((df["twin_shape"] == shape) if shape is not None else True)]
        r = sub["ratio"].astype(float)
        has_max = "ratio_max_throughput" in sub and np.isfinite(sub["slo_tpot_ms"].astype(float)).any()
        if has_max:  # the y range holds the maximum-throughput ratios drawn beside
            r = pd.concat([r, sub["ratio_max_throughput"].astype(float)], ignore_index=True)
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
            if has_max:
                mx = s[np.isfinite(s["ratio_max_throughput"].astype(float))]
                if len(mx):
                    used.add("max")
                    ax.plot(mx["context"], mx["ratio_max_throughput"].astype(float), color=color[c], lw=0.9,
                            ls=(0, (4, 2)), alpha=0.55, marker=".", ms=3)
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
        slo = float(sub["slo_tpot_ms"].iloc[0])
        at = f"p99 TPOT ≤ {slo:g} ms" if math.isfinite(slo) else "largest batches"
        twin = f", {shape} twin" if shape is not None else ""
        ax.set_title(f"{m} at {prec}{twin}, {at} (qs = {qs:.2f}, 1/qs dotted)", fontsize=9)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=color[c], marker="o", ms=4, label=c) for c in clusters]
    handles.append(Line2D([], [], color="k", ls="--", lw=0.8, label="ratio 1 (grey band: tie)"))
    if "max" in used:
        handles.append(Line2D([], [], color="0.3", ls=(0, (4, 2)), lw=0.9, alpha=0.55,
                              label="faint dashed: at maximum\nthroughput (no latency target)"))
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


def _plot_frontier(df, plan: _Plan, cfg: StudyConfig, path: Path) -> None:
    """Each model's MoE and twin frontiers (tokens/s per GPU against tokens/s
    per user) at its example point: the comparison at equal latency. The
    closed form of the study's routing law (its independent proxy for a
    correlated law) places the frontier points."""
    import textwrap

    import warnings

    from qsengine.decode.point import ContextWarning
    from qsengine.decode.simulate import simulate

    plt = _pyplot()
    ex = _examples(df, plan)
    ncol = min(2, len(ex))
    nrow = math.ceil(len(ex) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.2 * ncol, 4.2 * nrow), squeeze=False)
    for ax in axes.ravel()[len(ex):]:
        ax.set_axis_off()
    for ax, (m, r) in zip(axes.ravel(), ex.items()):
        where = f"{m} on {r['cluster_name']} @ {format_tokens(int(r['context']))}, {r['precision']}"
        if not (bool(r["moe_feasible"]) or bool(r["dense_feasible"])):
            ax.text(0.5, 0.5, textwrap.fill(f"{where}: neither side fits", 60), ha="center", va="center",
                    fontsize=8, transform=ax.transAxes)
            ax.set_axis_off()
            continue
        with warnings.catch_warnings():  # flagged in the study's output already
            warnings.simplefilter("ignore", ContextWarning)
            res = simulate(plan.models[m], r["cluster_input"], int(r["context"]),
                           q=cfg.q, precision=r["precision"], routing=cfg.routing, microbatches=0 if
                           cfg.routing in ("uniform", None) else "auto", seed=cfg.seed, break_even=False)
        res.plot_frontier(ax)
        ax.set_title(where, fontsize=9)
        for t_ms in (20, 50):
            r_at = res.ratio_at(t_ms / 1e3)
            ax.axvline(1e3 / t_ms, color="0.6", lw=0.8, ls=":")
            ax.text(1e3 / t_ms, 0.03, f" {t_ms} ms/token: dense/MoE " + ("n/a" if r_at is None else f"{r_at:.2f}x"),
                    fontsize=7, rotation=90, va="bottom", ha="right", color="0.3",
                    transform=ax.get_xaxis_transform())
    fig.suptitle("Equal latency: each side's best throughput per GPU at every interactivity "
                 "(right = faster tokens per user)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_why(df, path: Path) -> None:
    """Why each ratio is what it is: per model, at the cluster where both sides
    fit at the most contexts, the why factors (headroom, weights, ...; they
    multiply to the ratio) as bars on a log axis per context, the ratio as a
    black marker. A bar above 1 favours the dense twin."""
    import numpy as np

    from qsengine.decode.why import WHY

    plt = _pyplot()
    models = list(dict.fromkeys(df["model"]))
    ncol = min(2, len(models))
    nrow = math.ceil(len(models) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.4 * ncol, 4.0 * nrow), squeeze=False)
    cmap = plt.get_cmap("tab10")
    width = 0.8 / len(WHY)
    for ax, m in zip(axes.flat, models):
        sub = df[df["model"] == m]
        both = sub[np.isfinite(sub["ratio"].astype(float))]
        if not len(both):
            ax.text(0.5, 0.5, f"{m}: no point where both sides fit", ha="center", va="center", fontsize=8,
                    transform=ax.transAxes)
            ax.set_axis_off()
            continue
        cluster = both["cluster_name"].value_counts(sort=True).index[0]
        g = both[both["cluster_name"] == cluster].sort_values("context")
        x = np.arange(len(g))
        for j, k in enumerate(WHY):
            v = g[f"why_{k}"].astype(float).to_numpy()
            ax.bar(x + (j - (len(WHY) - 1) / 2) * width, np.log10(v), width, color=cmap(j), label=k)
        ax.scatter(x, np.log10(g["ratio"].astype(float)), color="k", marker="D", s=22, zorder=3,
                   label="ratio (their product)")
        ax.axhline(0.0, color="k", lw=0.8)
        lim = max(0.2, float(np.nanmax(np.abs(np.log10(g[[f"why_{k}" for k in WHY] + ["ratio"]]
                                                         .astype(float).to_numpy())))) * 1.15)
        ax.set_ylim(-lim, lim)
        ticks = [t for t in (0.1, 0.2, 0.33, 0.5, 0.67, 0.8, 1, 1.25, 1.5, 2, 3, 5, 10) if abs(math.log10(t)) <= lim]
        ax.set_yticks([math.log10(t) for t in ticks], [f"{t:g}×" for t in ticks])
        ax.set_xticks(x, [format_tokens(int(t)) for t in g["context"]])
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("factor of dense / MoE (log)")
        shape = f", {g['twin_shape'].iloc[0]} twin" if "twin_shape" in g else ""
        ax.set_title(f"{m} on {cluster}{shape}: why the ratio is what it is", fontsize=9)
        ax.text(0.01, 0.99, "↑ favours the dense twin", transform=ax.transAxes, fontsize=7, va="top")
        ax.text(0.01, 0.01, "↓ favours the MoE", transform=ax.transAxes, fontsize=7, va="bottom")
    for ax in list(axes.flat)[len(models):]:
        ax.set_visible(False)
    handles, labels = next((a.get_legend_handles_labels() for a in axes.flat if a.get_legend_handles_labels()[0]),
                           ([], []))
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
