"""The study's answer in words: one verdict line per model x cluster, the summary and
the table (consistent number formats, canonical names)."""

from __future__ import annotations

import math
import re
from typing import Any

from qsengine.study.config import DEFAULT_TIE, format_tokens



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


def verdict_lines(df, with_max: bool = True) -> list[tuple[str, str, str]]:
    """One (model, cluster, text) per model × cluster: runs of contexts with the
    same verdict, each with its ratio and per-token latencies and (``with_max``)
    the ratio at maximum throughput beside it."""
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
            rmax = [float(r["ratio_max_throughput"]) for r in rows
                    if "ratio_max_throughput" in r and math.isfinite(float(r["ratio_max_throughput"]))]
            if rmax and with_max:
                lo_r, hi_r = min(rmax), max(rmax)
                text += (f" [max throughput: dense/MoE {lo_r:.2f}×" if lo_r == hi_r else
                         f" [max throughput: dense/MoE {lo_r:.2f}–{hi_r:.2f}×") + "]"
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
        f"- serving engine: {s.get('serving', 'qsengine')}; speculative decoding: {s.get('speculative', 'off')}",
        "- latency target: " + ("none: each side at the largest batch its HBM holds" if slo is None else
                                f"both sides at p99 ≤ {fmt_num(slo)} ms per token (equal latency); "
                                "[max throughput: …] = each side at the largest batch its HBM holds"),
        f"- seed: {s.get('seed')}; qsengine {s.get('qsengine_version')} (code {s.get('qsengine_code')})",
        f"- ratio = dense tokens/s ÷ MoE tokens/s; a tie is within ±{s.get('tie', DEFAULT_TIE):.0%} of 1 "
        "(or 2 standard errors of the Monte Carlo, if larger); ±: one standard error",
        "",
    ]
    for m, g in df.groupby("model", sort=False):
        r0 = g.iloc[0]
        lines.append(f"{h}{m} (s = {float(r0['s']):.3f}, q = {float(r0['q']):.2f})")
        if markdown:
            lines.append("")
        by_shape = g.groupby("twin_shape", sort=False) if "twin_shape" in g else [(None, g)]
        for shape, gs in by_shape:
            t0 = gs.iloc[0]
            lines.append(f"{'- ' if markdown else '  '}vs twin {t0['twin']} ({shape or 'same'}: {t0['dense_shape']}, "
                         f"KV {fmt_num(float(t0['dense_kv_bytes_per_token']))} B/token vs the MoE's "
                         f"{fmt_num(float(t0['moe_kv_bytes_per_token']))})")
            for mm, c, text in verdict_lines(gs, with_max=slo is not None):
                lines.append(f"{'  - ' if markdown else '    '}{c:<9s} {text}")
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
    ("model", "model"), ("twin_shape", "twin"), ("cluster_name", "cluster"), ("context", "context"),
    ("study_verdict", "verdict"),
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
    text = ["  ".join(h.rjust(w) if i > 4 else h.ljust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    for r in rows:
        text.append("  ".join(x.rjust(w) if i > 4 else x.ljust(w) for i, (x, w) in enumerate(zip(r, widths))))
    return "\n".join(text)
