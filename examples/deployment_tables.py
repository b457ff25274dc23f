"""Verdicts and ratios of the study's models and clusters under two operating
points, for the closing notes and for before/after comparisons of the engine.

For DeepSeek-V3, Qwen3-235B-A22B, Grok-1 and Switch-C on the study's eight
clusters at 4K, 32K and 128K (each model at its deployed precision, q = 1/sqrt(s),
closed form), for the twin shapes given: the ratio dense/MoE at maximum
throughput (no latency target) and at p99 TPOT <= 50 ms, the verdict counts and
medians, and the winning plans. It runs with any qsengine that has
``qsengine.sweep`` and ``slo_tpot``, so the same script measures a change::

    python examples/deployment_tables.py                      # both twin shapes
    python examples/deployment_tables.py --twins same --csv out.csv
    python examples/deployment_tables.py --twins same --draft-tokens 1 --acceptance 0.85   # with MTP
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import qsengine

MODELS = ("deepseek-v3", "qwen3-235b-a22b", "grok-1", "switch-c-2048")
CLUSTERS = ("8xh100", "8xh200", "8xb200", "8xmi300x", "8xmi355x", "16xh100", "32xh100", "72xgb200")
CONTEXTS = (4096, 32768, 131072)


def run(twins: tuple[str, ...], slo: float | None, draft_tokens: int = 0, acceptance: float = 0.0):
    grid = {"model": list(MODELS), "cluster": list(CLUSTERS), "context": list(CONTEXTS), "microbatches": [0],
            "slo_tpot": [slo], "twin_attention": list(twins), "break_even": [False]}
    if draft_tokens:  # speculative decoding on both sides (docs/model.md, "Speculative decoding")
        grid |= {"draft_tokens": [draft_tokens], "acceptance": [acceptance]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qsengine.sweep(grid, progress=False)


def summarise(df, label: str) -> list[str]:
    out = []
    for (model, twin), g in df.groupby(["model", "in_twin_attention"], sort=False):
        r = g["ratio"].astype(float)
        ok = r[r.notna()]
        v = g["verdict"].value_counts().to_dict()
        med = statistics.median(ok) if len(ok) else float("nan")
        out.append(f"| {label} | {model} | {twin} | {len(g)} | {v.get('dense', 0)} | {v.get('moe', 0)} | "
                   f"{v.get('tie', 0)} | {v.get('dense-only', 0)} | {v.get('moe-only', 0) + v.get('neither', 0)} | "
                   f"{med:.2f} |")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--twins", nargs="+", default=["same", "gqa"])
    ap.add_argument("--csv", default=None, help="also write every point (both operating points) to this CSV")
    ap.add_argument("--draft-tokens", type=int, default=0, help="speculative decoding: draft tokens per step (0 = off)")
    ap.add_argument("--acceptance", type=float, default=0.0, help="speculative decoding: per-token acceptance rate")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    print(f"qsengine {qsengine.__version__} ({qsengine.__file__})"
          + (f"; speculative decoding: {args.draft_tokens} draft token(s), acceptance {args.acceptance:g}"
             if args.draft_tokens else "") + "\n")
    print("| operating point | model | twin | points | dense | MoE | tie | dense-only | MoE-only/neither | median ratio |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    frames = []
    for label, slo in (("max throughput", None), ("p99 <= 50 ms", 0.05)):
        df = run(tuple(args.twins), slo, args.draft_tokens, args.acceptance)
        df["operating_point"] = label
        frames.append(df)
        print("\n".join(summarise(df, label)))
    if args.csv:
        import pandas as pd

        cols = ["operating_point", "model", "cluster", "context", "in_twin_attention", "ratio", "verdict",
                "moe_plan", "dense_plan", "moe_tokens_per_s_per_gpu", "dense_tokens_per_s_per_gpu",
                "moe_tpot_ms", "dense_tpot_ms"]
        full = pd.concat(frames, ignore_index=True)
        full[[c for c in cols if c in full.columns]].to_csv(args.csv, index=False)
        print(f"\nevery point: {args.csv}")
    print(f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
