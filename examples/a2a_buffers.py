"""What the EP all-to-all buffers cost in sequences (docs/packing.md "All-to-all buffers").

For DeepSeek-V3 and Qwen3-235B-A22B on 8xH200 at fp8, expert-parallel over the
node with attention data-parallelism (Plan(tp=8, ep=8, attn_dp=True)), prints
per context: the buffer per dispatched token (DeepEP's low-latency layout), the
KV cache and the buffer share per sequence on one GPU, and the sequences one GPU
admits with the buffers and without them (the same free memory divided by the
KV cache alone). Writes benchmarks/results/a2a_buffers.txt.

Run:  python examples/a2a_buffers.py
"""

from __future__ import annotations

import math
from pathlib import Path

import qsengine
from qsengine import Plan
from qsengine.packing import a2a_buffer_bytes_per_token
from qsengine.specs import as_model

PLAN = Plan(tp=8, ep=8, attn_dp=True)
CLUSTER = "8xh200"


def main() -> str:
    lines = [f"qsengine {qsengine.__version__}: python examples/a2a_buffers.py",
             f"{CLUSTER}, fp8, plan {PLAN.label} (one admission unit per GPU)", ""]
    header = f"{'model':18s} {'context':>8s} {'buffer/token':>13s} {'KV/seq':>10s} {'buffer/seq':>11s} " \
             f"{'seqs/GPU':>9s} {'without':>8s} {'change':>7s}"
    lines.append(header)
    for name in ("deepseek-v3", "qwen3-235b-a22b"):
        m = as_model(name)
        per_tok = a2a_buffer_bytes_per_token(m.hidden_size, m.routed_experts)
        for ctx in (1024, 4096, 32768, 131072):
            p = qsengine.pack(m, CLUSTER, ctx, plan=PLAN, precision="fp8")
            g = p.gpu_map.iloc[0]
            free = g["kv"] + g["a2a"] + g["free"]  # what the weights leave for sequences
            without = math.floor(free / g["kv_per_sequence"])
            lines.append(f"{name:18s} {ctx:>8,} {per_tok / 1e6:>10.2f} MB {g['kv_per_sequence'] / 1e6:>7.1f} MB "
                         f"{g['a2a_per_sequence'] / 1e6:>8.2f} MB {p.admissible_batch:>9,} {without:>8,} "
                         f"{p.admissible_batch / without - 1:>+7.1%}")
    text = "\n".join(lines) + "\n"
    out = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "a2a_buffers.txt"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)
    return text


if __name__ == "__main__":
    print(main(), end="")
