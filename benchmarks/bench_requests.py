"""Cost of whole requests in the vectorised pipeline: evaluate_columns on the
same closed-form grid decode only, with colocated and with disaggregated
prefill (6K-style: context in, 2048 out), medians of 3 interleaved runs in one
process, and the time ratios (robust to noisy neighbours).

Run:  python benchmarks/bench_requests.py     (writes benchmarks/results/bench_requests.txt)
"""

from __future__ import annotations

import statistics
import time
import warnings
from pathlib import Path

import numpy as np

import qsengine
from qsengine.decode.pipeline import encode_points, evaluate_columns


def main() -> None:
    warnings.simplefilter("ignore", qsengine.ContextWarning)
    ms = ["deepseek-v3", "qwen3-235b-a22b", "grok-1", "qwen3-30b-a3b"]
    cs = ["8xh100", "8xh200", "8xb200", "8xmi300x", "8xmi355x", "16xh100", "16xh200", "8xa100"]
    ts = [int(x) for x in np.geomspace(1024, 262144, 16).round()]
    qs = [float(x) for x in np.linspace(1.2, 8.0, 25)]
    grids = {}
    for name, extra in (("decode only", {}), ("colocated", dict(output=2048, prefill="colocated")),
                        ("disaggregated", dict(output=2048, prefill="disaggregated"))):
        pts = [dict(model=m, cluster=c, context=t, q=q, microbatches=0, precision="fp8", **extra)
               for m in ms for c in cs for t in ts for q in qs]
        grids[name] = encode_points(pts)
    for cols, n in grids.values():
        evaluate_columns(cols, n)  # warm the plan caches
    times: dict[str, list[float]] = {k: [] for k in grids}
    for _ in range(3):
        for k, (cols, n) in grids.items():
            t = time.perf_counter()
            evaluate_columns(cols, n)
            times[k].append(time.perf_counter() - t)
    n = grids["decode only"][1]
    base = statistics.median(times["decode only"])
    lines = [f"qsengine {qsengine.__version__}: evaluate_columns, {n:,} closed-form points (4 models x 8 clusters x "
             "16 contexts x 25 q, fp8, break-even q* on), one call, medians of 3 interleaved runs"]
    for k, v in times.items():
        med = statistics.median(v)
        lines.append(f"  {k}: {med:.2f} s -> {n / med:,.0f} points/s; time / decode only {med / base:.2f}")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    (Path(__file__).parent / "results" / "bench_requests.txt").write_text(
        text + "command: python benchmarks/bench_requests.py\n")


if __name__ == "__main__":
    main()
