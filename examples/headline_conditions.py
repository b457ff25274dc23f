"""Under which conditions does the engine give the qs study's 4.5x headline?

The study ("the qs inequality", 2026) claims that for DeepSeek-V3 at 128K
context the quality-matched dense twin (q = 1/sqrt(s)) gets about 4.5x the
MoE's decode throughput. ``qsengine.qs`` gives ``asymptotic_ratio = 1/qs``
(4.28 for DeepSeek-V3): the ratio when both sides run at the same batch,
every expert is read each step, weight reads dominate (KV cache and attention
negligible) and the step is bandwidth-bound. ``simulate`` compares the sides
at equal latency instead (each at its best throughput with p99 TPOT <= 50 ms),
with each side at its own HBM-maximum batch beside it. This script walks from the engine's
defaults to the study's conditions one assumption at a time and prints, for
each condition, the ratio (dense / MoE tokens/s) and the engine's why factors
(``SimulationResult.explain``: headroom x weights x attention x
communication x other).

Section 2 computes the closing-note table: for DeepSeek-V3, Qwen3-235B,
Grok-1 and Switch-C on the study's eight clusters at 4K, 32K and 128K (fp8),
the verdict counts and median ratio at maximum throughput (HBM-maximum batch),
under a 50 ms/token p99 target (``slo_tpot=0.05``) and at equal mean latency
on the frontiers (``ratio_at(0.05)``).

Everything runs the engine as it is, closed form (``microbatches=0``:
independent uniform routing, no Monte Carlo), in about a minute on 2 cores::

    python examples/headline_conditions.py            # both sections
    python examples/headline_conditions.py --quick    # smaller closing table
    python examples/headline_conditions.py --section conditions

Two hypotheticals are built from the shipped specs (nothing in the package is
changed): a *KV-free* precision (fp8 with 1e-9 bytes per KV element: the KV
cache neither occupies HBM nor costs reads) and a *bandwidth-only* accelerator
(the GPU's dense FLOP/s and link bandwidths multiplied by 1e6, collective
latency 0: only HBM reads take time). ``docs/headline.md`` explains the output.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
import warnings
from typing import Any

import qsengine
from qsengine import Cluster, Precision, SimulationResult, StepOptions

MODEL = "deepseek-v3"
#: The four models and eight clusters of the study's closing note.
CLOSING_MODELS = ("deepseek-v3", "qwen3-235b-a22b", "grok-1", "switch-c-2048")
CLOSING_CLUSTERS = ("8xH100", "8xH200", "8xB200", "8xMI300X", "8xMI355X", "16xH100", "32xH100", "72xGB200")
CLOSING_CONTEXTS = (4096, 32768, 131072)
QUICK_CLUSTERS = ("8xH200", "16xH100", "72xGB200")
QUICK_CONTEXTS = (4096, 131072)
#: The study's latency point: 50 ms per output token.
TPOT = 0.05
#: The study's headline ratio for DeepSeek-V3 at 128K.
HEADLINE = 4.5
#: "Free" in the hypotheticals: FLOP/s and link bandwidths multiplied by this.
FREE = 1e6
#: Bytes per KV element in the KV-free hypothetical (> 0: the spec validator
#: requires a positive size; 1e-9 B makes a 128K-token sequence's cache 5 µB).
KV_FREE_BYTES = 1e-9
#: A batch at which every DeepSeek-V3 expert is touched each step:
#: E[u] = E·(1 − (1 − k/E)^B) = 256·(1 − (1 − 8/256)^1024) = 256 − 1e-12.
LARGE_BATCH = 1024
SMALL_BATCH = 16
#: A short context: 1,024 sequences x 128 tokens x 35,136 B = 4.6 GB of KV per
#: step, small next to 158 GB of twin weights, yet not negligible per GPU: MLA's
#: latent is read whole by every tensor-parallel rank (docs/model.md), while the
#: twin's weights are split (9.9 GB per GPU at tp16).
SHORT = 128

WHY = ("headroom", "weights", "attention", "communication", "other")


def bandwidth_only(acc: qsengine.Accelerator) -> qsengine.Accelerator:
    """``acc`` with compute and links made effectively free (x1e6): only HBM
    bandwidth limits a step (same HBM capacity)."""
    return dataclasses.replace(acc, id=f"{acc.id}-bw-only", name=f"{acc.name} (bandwidth-only)",
                               flops={k: v * FREE for k, v in acc.flops.items()},
                               scaleup_bandwidth=acc.scaleup_bandwidth * FREE,
                               internode_bandwidth=acc.internode_bandwidth * FREE)


def kv_free(precision: str = "fp8") -> Precision:
    """``precision`` with a negligible KV element (KV_FREE_BYTES): the KV cache
    takes neither HBM nor read time."""
    return dataclasses.replace(qsengine.as_precision(precision), kv_bytes=KV_FREE_BYTES, name=f"{precision}-kv-free")


#: This walk is about the study's roofline argument, so every run uses the roofline
#: kernels (StepOptions.kernels="roofline", the paper's formulas); the calibrated
#: default (fitted kernel times, docs/calibration.md) is quoted separately in docs/headline.md.
ROOFLINE = StepOptions(kernels="roofline")
FREE_COMM = StepOptions(collective_latency=0.0, kernels="roofline")


@dataclasses.dataclass
class Row:
    """One condition of the walk: its label, the ratio and the why factors."""

    step: str
    condition: str
    ratio: float | None
    why: dict[str, float] | None = None
    moe: str = ""
    dense: str = ""
    note: str = ""
    key: str = ""


def _side(r: qsengine.SideResult) -> str:
    if not r.feasible:
        return "infeasible"
    assert r.plan is not None
    return f"B={r.cluster_batch:,} {r.plan.label}"


def _row(step: str, condition: str, res: SimulationResult, key: str = "") -> Row:
    note = ""
    if res.ratio is None:
        side = res.moe if not res.moe.feasible else res.dense
        note = side.reason.split(":")[0][:60]
    return Row(step, condition, res.ratio, res.explain(), _side(res.moe), _side(res.dense), note, key)


def run(cluster: Cluster, context: int, **kw: Any) -> SimulationResult:
    """One closed-form DeepSeek-V3 comparison at fp8 (q* skipped: not needed here)."""
    kw.setdefault("precision", "fp8")
    kw.setdefault("options", ROOFLINE)
    return qsengine.simulate(kw.pop("model", MODEL), cluster, context, microbatches=0, break_even=False, **kw)


def best_ratio_at(res: SimulationResult, lo: float = 0.005, hi: float = 0.2,
                  n: int = 200) -> tuple[float, float | None]:
    """The largest ``ratio_at(t)`` over ``n`` TPOTs spaced geometrically in
    [lo, hi] seconds, and where it is: (t, ratio), (nan, None) when no TPOT is
    served by both sides."""
    best: tuple[float, float | None] = (math.nan, None)
    for i in range(n):
        t = lo * (hi / lo) ** (i / (n - 1))
        r = res.ratio_at(t)
        if r is not None and (best[1] is None or r > best[1]):
            best = (t, r)
    return best


def conditions(cluster: Cluster | str, context: int) -> list[Row]:
    """The walk from the engine's defaults to the study's conditions for
    DeepSeek-V3 at ``context`` on ``cluster``, one assumption at a time."""
    cluster = qsengine.as_cluster(cluster)
    ideal = Cluster(bandwidth_only(cluster.accelerator), cluster.num_gpus)
    rows: list[Row] = []
    rows.append(_row("a", f"defaults: both sides at p99 TPOT <= {TPOT * 1e3:g} ms (equal latency)",
                     run(cluster, context), "defaults"))
    base = run(cluster, context, slo_tpot=None)
    rows.append(_row("a", "no latency target: each side at its HBM-maximum batch (slo_tpot=None)", base, "max"))
    for t in (0.02, TPOT, 0.1):
        rows.append(Row("b", f"equal mean latency: ratio_at({t:g}) on the frontiers", base.ratio_at(t),
                        note="" if base.ratio_at(t) is not None else "a side cannot serve that fast"))
    t_best, r_best = best_ratio_at(base)
    rows.append(Row("b", "equal mean latency: the largest ratio_at over TPOT 5-200 ms", r_best,
                    note="" if r_best is None else f"at {t_best * 1e3:.1f} ms"))
    b_moe = base.moe.cluster_batch if base.moe.feasible else 0
    rows.append(_row("c", f"equal batch {SMALL_BATCH}", run(cluster, context, batch=SMALL_BATCH)))
    if b_moe:
        rows.append(_row("c", f"equal batch {b_moe:,} (the MoE's HBM maximum)", run(cluster, context, batch=b_moe)))
    rows.append(_row("d", f"equal batch {LARGE_BATCH:,} (every expert read each step)",
                     run(cluster, context, batch=LARGE_BATCH)))
    nokv = kv_free()
    rows.append(_row("e", f"KV-free, equal batch {LARGE_BATCH:,}",
                     run(cluster, context, batch=LARGE_BATCH, precision=nokv), "real-gpu"))
    if b_moe:
        rows.append(_row("e", f"bandwidth-only GPU, real KV, equal batch {b_moe:,}",
                         run(ideal, context, batch=b_moe, options=FREE_COMM), "real-kv"))
    rows.append(_row("e", f"bandwidth-only GPU, real KV at a {SHORT}-token context, equal batch {LARGE_BATCH:,}",
                     run(ideal, SHORT, batch=LARGE_BATCH, options=FREE_COMM)))
    rows.append(_row("e", f"KV-free + bandwidth-only GPU, equal batch {SMALL_BATCH}",
                     run(ideal, context, batch=SMALL_BATCH, precision=nokv, options=FREE_COMM), "small-batch"))
    rows.append(_row("e", f"KV-free + bandwidth-only GPU, equal batch {LARGE_BATCH:,} (the study's conditions)",
                     run(ideal, context, batch=LARGE_BATCH, precision=nokv, options=FREE_COMM), "ideal"))
    s = qsengine.load_model(MODEL).sparsity
    q_head = 1.0 / (HEADLINE * s)
    for q in (q_head, 1 / math.sqrt(s), 6.0):
        tag = "1/(4.5 s)" if q == q_head else ("1/sqrt(s)" if q == 1 / math.sqrt(s) else f"{q:g}")
        rows.append(_row("f", f"q = {q:.2f} [{tag}]: study's conditions",
                         run(ideal, context, q=q, batch=LARGE_BATCH, precision=nokv, options=FREE_COMM)))
        rows.append(_row("f", f"q = {q:.2f} [{tag}]: defaults", run(cluster, context, q=q)))
    rows.append(_row("g", "defaults at bf16 (weights and KV)",
                     run(cluster, context, precision="bf16")))
    rows.append(_row("g", "defaults with a conventional GQA twin (twin_attention='gqa')",
                     run(cluster, context, twin_attention="gqa")))
    return rows


def format_rows(rows: list[Row], title: str) -> str:
    """A markdown table of a walk."""
    out = [f"### {title}", "",
           "| step | condition | ratio | " + " | ".join(WHY) + " | MoE | dense |",
           "|---|---|---:|" + "---:|" * len(WHY) + "---|---|"]
    for r in rows:
        ratio = f"{r.ratio:.3f}" if r.ratio is not None else "n/a"
        why = [f"{r.why[k]:.3f}" for k in WHY] if r.why else [""] * len(WHY)
        moe = r.moe if r.moe else ""
        dense = r.dense if r.dense else ""
        if r.note:
            ratio = f"{ratio} ({r.note})"
        out.append(f"| {r.step} | {r.condition} | {ratio} | " + " | ".join(why) + f" | {moe} | {dense} |")
    out += ["", leave_one_out(rows)]
    return "\n".join(out)


def leave_one_out(rows: list[Row]) -> str:
    """One line: the study's conditions, and the ratio when each of its
    assumptions alone is dropped (the larger the fall, the more work the
    assumption does)."""
    by = {r.key: r for r in rows if r.key}

    def f(k: str) -> str:
        r = by.get(k)
        return "n/a" if r is None or r.ratio is None else f"{r.ratio:.2f}"
    return (f"Leave one out: study's conditions {f('ideal')}; with the real KV cache (at the MoE's maximum batch, "
            f"the largest equal batch that fits) {f('real-kv')}; with real compute and links {f('real-gpu')}; "
            f"at a small batch ({SMALL_BATCH}) {f('small-batch')}; engine defaults {f('defaults')}.")


def section_conditions(clusters: tuple[str, ...], contexts: tuple[int, ...]) -> str:
    m = qsengine.load_model(MODEL)
    res = qsengine.qs(m, "sqrt")
    parts = ["## 1. DeepSeek-V3: from the engine's defaults to the study's conditions", "",
             f"s = {res.s:.4f}, q = 1/sqrt(s) = {res.q:.3f}, qs = {res.qs:.4f}, "
             f"asymptotic_ratio = 1/qs = {res.asymptotic_ratio:.3f}; the headline {HEADLINE} = 1/(q s) needs "
             f"q = {1 / (HEADLINE * res.s):.3f}. fp8 weights and KV, closed form (microbatches=0).", ""]
    for c in clusters:
        for ctx in contexts:
            parts.append(format_rows(conditions(c, ctx), f"DeepSeek-V3 on {qsengine.as_cluster(c).label}, "
                                                          f"context {ctx:,}"))
            parts.append("")
    return "\n".join(parts)


# --------------------------------------------------------------- closing note
def closing_points(models: tuple[str, ...], clusters: tuple[str, ...],
                   contexts: tuple[int, ...]) -> list[dict[str, Any]]:
    """For every (model, cluster, context): ratio and verdict at the
    HBM-maximum batch, under the p99 50 ms/token target, and ``ratio_at(0.05)``."""
    out = []
    for model in models:
        for c in clusters:
            for ctx in contexts:
                base = run(qsengine.as_cluster(c), ctx, model=model, slo_tpot=None)
                slo = run(qsengine.as_cluster(c), ctx, model=model, slo_tpot=TPOT)
                at = base.ratio_at(TPOT)
                out.append({"model": model, "cluster": base.cluster.label, "context": ctx,
                            "max_ratio": base.ratio, "max_verdict": base.verdict,
                            "slo_ratio": slo.ratio, "slo_verdict": slo.verdict,
                            "at_ratio": at, "at_verdict": _at_verdict(at, base)})
    return out


def _at_verdict(at: float | None, res: SimulationResult) -> str:
    if at is None:
        if not (res.moe.feasible and res.dense.feasible):
            return res.verdict
        return "n/a"   # a side cannot serve at that mean TPOT
    return "dense" if at > 1 else ("moe" if at < 1 else "tie")


VERDICTS = ("dense", "moe", "tie", "dense-only", "moe-only", "neither", "n/a")


def _cell(points: list[dict[str, Any]], kind: str) -> tuple[str, str]:
    counts = {v: 0 for v in VERDICTS}
    for p in points:
        counts[p[f"{kind}_verdict"]] += 1
    text = ", ".join(f"{v} {n}" for v, n in counts.items() if n)
    ratios = [p[f"{kind}_ratio"] for p in points if p[f"{kind}_ratio"] is not None]
    med = f"{statistics.median(ratios):.2f}" if ratios else "n/a"
    return text, med


def format_closing(points: list[dict[str, Any]]) -> str:
    """Verdict counts and median ratio (over points where both sides are
    comparable) per model and per context, for the three operating points."""
    kinds = (("max", "HBM-maximum batch"), ("slo", f"p99 <= {TPOT * 1e3:g} ms (slo_tpot)"),
             ("at", f"ratio_at({TPOT:g})"))
    head = "| group | points | " + " | ".join(f"{t}: verdicts | {t}: median" for _, t in kinds) + " |"
    lines = [head, "|---|---:|" + "---|---:|" * len(kinds)]
    groups: list[tuple[str, list[dict[str, Any]]]] = []
    for m in dict.fromkeys(p["model"] for p in points):
        groups.append((m, [p for p in points if p["model"] == m]))
    for ctx in dict.fromkeys(p["context"] for p in points):
        groups.append((f"context {ctx:,}", [p for p in points if p["context"] == ctx]))
    groups.append(("all", points))
    for name, pts in groups:
        cells = []
        for k, _ in kinds:
            text, med = _cell(pts, k)
            cells += [text, med]
        lines.append(f"| {name} | {len(pts)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_closing_points(points: list[dict[str, Any]], model: str) -> str:
    """Every point of one model (the per-point view behind the counts)."""
    def f(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}"
    lines = ["| cluster | context | max | slo 50 ms | ratio_at(0.05) |", "|---|---:|---:|---:|---:|"]
    for p in points:
        if p["model"] == model:
            lines.append(f"| {p['cluster']} | {p['context']:,} | {f(p['max_ratio'])} ({p['max_verdict']}) | "
                         f"{f(p['slo_ratio'])} ({p['slo_verdict']}) | {f(p['at_ratio'])} ({p['at_verdict']}) |")
    return "\n".join(lines)


def section_closing(quick: bool) -> str:
    clusters = QUICK_CLUSTERS if quick else CLOSING_CLUSTERS
    contexts = QUICK_CONTEXTS if quick else CLOSING_CONTEXTS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", qsengine.ContextWarning)
        points = closing_points(CLOSING_MODELS, clusters, contexts)
    beyond = sorted({str(w.message).split(";")[0] for w in caught if issubclass(w.category, qsengine.ContextWarning)})
    parts = [f"## 2. Closing-note table ({len(CLOSING_MODELS)} models x {len(clusters)} clusters x "
             f"{len(contexts)} contexts, fp8, q = 1/sqrt(s))", "",
             "Verdicts: dense / moe = the faster side; dense-only / moe-only / neither = a side does not fit "
             "(or cannot meet the target); n/a = a side cannot reach a mean TPOT of 50 ms on its frontier. "
             "Medians are over the points with a ratio.", "",
             format_closing(points), "",
             "DeepSeek-V3, every point:", "", format_closing_points(points, MODEL), ""]
    if beyond:
        parts += ["Contexts beyond a model's published maximum (the engine warns and evaluates them):", ""]
        parts += [f"* {b}" for b in beyond]
        parts.append("")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller closing table (3 clusters, 4K and 128K)")
    ap.add_argument("--section", choices=("all", "conditions", "closing"), default="all")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    print(f"qsengine {getattr(qsengine, '__version__', '')}: python examples/headline_conditions.py"
          f"{' --quick' if args.quick else ''}{'' if args.section == 'all' else ' --section ' + args.section}\n")
    if args.section in ("all", "conditions"):
        print(section_conditions(("16xH200", "8xH200"), (131072, 4096)))
    if args.section in ("all", "closing"):
        print(section_closing(args.quick))
    print(f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
