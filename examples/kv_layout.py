"""The MLA fp8 KV cache as FlashMLA stores it (issue #14 item 5): DeepSeek-V3 with a plain
fp8 cache (576 B per token and layer, ``precision="fp8"``) against FlashMLA's fp8 layout
(656 B: fp8 latent + one fp32 scale per 128 + bf16 RoPE key, ``precision="fp8-flashmla"``).

Run:  python examples/kv_layout.py

DeepSeek-V3 on 8xh200 at 32K and 128K context, ``simulate`` with its defaults (plan auto,
q = 1/sqrt(s), an MLA dense twin, the default 50 ms p99 TPOT target, Monte Carlo routing):
per precision the KV bytes per token (all layers), the MoE's plan, batch and what limits it,
its attention pieces per step (ms), tokens/s per GPU, the dense twin's batch and its limit, and
the dense/MoE ratio (Monte Carlo routing: varies by ~1e-4 between runs; "closed": the
closed-form straggler, ``microbatches=0``, deterministic). Writes benchmarks/results/kv_layout.txt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import qsengine

MODEL, CLUSTER = "deepseek-v3", "8xh200"


def row(ctx: int, precision: str) -> str:
    res = qsengine.simulate(MODEL, CLUSTER, ctx, precision=precision, seed=1)  # seeded: the file reproduces
    rec = res.to_record()
    closed = qsengine.simulate(MODEL, CLUSTER, ctx, precision=precision, microbatches=0).ratio
    attn = 0.0
    if res.moe.feasible and res.moe.step is not None:
        attn = sum(p.time for p in res.moe.step.pieces if p.name.startswith("attention"))
    return (f"{ctx // 1024:>4}K  {precision:13} {rec['moe_kv_bytes_per_token']:>9,.0f}  {rec['moe_plan'] or '-':26} "
            f"{rec['moe_batch']:>6} {rec['moe_batch_limit']:>7}  {attn * 1e3:8.2f}  "
            f"{rec['moe_tokens_per_s_per_gpu']:9.1f}  {rec['dense_batch']:>7} {rec['dense_batch_limit']:>7}  "
            f"{rec['ratio']:9.4f} {closed:9.4f}")


def main() -> int:
    lines = [f"{MODEL} on {CLUSTER}: plain fp8 KV (576 B/token/layer) vs FlashMLA's fp8 layout (656); "
             "simulate defaults (plan auto, 50 ms p99 TPOT)", "",
             f"{'ctx':>5}  {'precision':13} {'KV B/tok':>9}  {'MoE plan':26} {'batch':>6} {'limit':>7}  "
             f"{'attn ms':>8}  {'tok/s/GPU':>9}  {'dense B':>7} {'limit':>7}  {'dense/MoE':>9} {'closed':>9}"]
    for ctx in (32768, 131072):
        for precision in ("fp8", "fp8-flashmla"):
            lines.append(row(ctx, precision))
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    out = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "kv_layout.txt"
    out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
