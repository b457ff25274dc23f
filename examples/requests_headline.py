"""Decode-only vs end-to-end (prefill counted) verdicts for the study's models
and clusters, at one request workload (issue #12, item 2).

Run:  python examples/requests_headline.py [--input 6144] [--output 2048]

For each of the study's default MoE models (DeepSeek-V3, Qwen3-235B, Grok-1,
Switch-C) on each of its default clusters, at the models' deployed precision,
q = 1/sqrt(s), closed-form routing (uniform), no latency target: the dense/MoE
ratio decode-only (the same requests with ``prefill="none"``: admitted at
I + O, reading I + (O+1)/2, prefill not counted; each side at its best decode
plan) and end-to-end with colocated and disaggregated prefill (``ratio``). Verdicts
use the study's tie band (|ratio − 1| <= 2%). Writes
benchmarks/results/requests_headline.txt.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path

import numpy as np

import qsengine
from qsengine.study.config import DEFAULT_CLUSTERS, DEFAULT_MODELS, DEFAULT_TIE


def verdicts(ratio, verdict) -> dict[str, int]:
    out: dict[str, int] = {}
    for r, v in zip(ratio, verdict):
        if np.isfinite(r):
            v = "tie" if abs(r - 1) <= DEFAULT_TIE else ("dense" if r > 1 else "moe")
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", type=int, default=6144, help="prompt tokens per request (the point's context)")
    ap.add_argument("--output", type=int, default=2048, help="generated tokens per request")
    args = ap.parse_args()
    warnings.simplefilter("ignore", qsengine.ContextWarning)
    grid = {"model": list(DEFAULT_MODELS), "cluster": list(DEFAULT_CLUSTERS), "context": [args.input],
            "output": [args.output], "prefill": ["none", "colocated", "disaggregated"], "microbatches": [0],
            "break_even": [False], "slo_tpot": [None]}  # no latency target, as stated: each side at its HBM maximum
    df = qsengine.sweep(grid, seed=1, progress=False)
    lines = [f"qsengine {qsengine.__version__}: {args.input:,} in / {args.output:,} out, the study's models x "
             f"clusters ({len(DEFAULT_CLUSTERS)}: {', '.join(DEFAULT_CLUSTERS)}), deployed precision, q = 1/sqrt(s), "
             f"closed form, no latency target; verdict tie band {DEFAULT_TIE:.0%}",
             f"{'model':16s} {'ratio':26s} {'verdicts':48s} {'median ratio':>12s}"]

    def med(x: np.ndarray) -> float:
        return statistics.median(x[np.isfinite(x)]) if np.isfinite(x).any() else float("nan")

    for model in DEFAULT_MODELS:
        for mode, label in (("none", "decode only"), ("colocated", "end-to-end, colocated"),
                            ("disaggregated", "end-to-end, disaggregated")):
            sub = df[(df["model"] == qsengine.as_model(model).id) & (df["prefill"] == mode)]
            r = sub["ratio"].astype(float).to_numpy()
            lines.append(f"{model:16s} {label:26s} {str(verdicts(r, sub['verdict'])):48s} {med(r):12.3f}")
    lines.append("per point, dense/MoE ratio: decode only -> end-to-end colocated | disaggregated:")
    for model in DEFAULT_MODELS:
        mid = qsengine.as_model(model).id
        cells = []
        for cl in DEFAULT_CLUSTERS:
            row = df[(df["model"] == mid) & (df["cluster"] == qsengine.as_cluster(cl).label)]
            n, c, d = (row[row["prefill"] == m].iloc[0] for m in ("none", "colocated", "disaggregated"))
            cells.append(f"{cl} {n['ratio']:.2f}->{c['ratio']:.2f}|{d['ratio']:.2f}" if np.isfinite(c["ratio"])
                         else f"{cl} {c['verdict']}")
        lines.append(f"  {model}: " + "; ".join(cells))
    text = "\n".join(lines) + "\n"
    print(text, end="")
    out = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "requests_headline.txt"
    out.write_text(text + f"command: python examples/requests_headline.py --input {args.input} "
                          f"--output {args.output}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
