"""Cost of the step model's kernels.

Part ``sweep``: the calibrated kernels in the closed-form sweep: bench_sweep.py's
102,400-point grid through qsengine.sweep on one thread, with
StepOptions(kernels="calibrated") (the default) and kernels="roofline",
interleaved in one process (so both see the same machine load); medians of
wall and CPU time (CPU time is what a busy shared machine distorts least).

Part ``straggler``: per-lane cost of the closed-form straggler
(``straggler_closed_form``) at 16,384 lanes, DeepSeek-V3's routing (E = 256,
k = 8; EP 8/16; popularity from Zipf(1.0) weights; 32 redundant EPLB slots),
uniform / popularity / slots: the core (qsengine.decode.straggler) against the
numpy implementation it replaced (tests/reference_straggler.py), interleaved in
one process; medians of CPU time per lane and their ratio.

Run:  python benchmarks/bench_step_kernels.py [--repeats N] [--part all|sweep|straggler]
Writes benchmarks/results/bench_step_kernels.txt (sweep) and
benchmarks/results/bench_step_kernels_straggler.txt (straggler).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import numpy as np

import qsengine


HERE = Path(__file__).resolve().parent
STRAGGLER_LANES = 16_384


def _header() -> str:
    return f"qsengine {qsengine.__version__} step-kernels benchmark; {platform.machine()}, {os.cpu_count()} cores, " \
           f"python {platform.python_version()}"


def straggler(repeats: int) -> str:
    """Per-lane CPU time of straggler_closed_form, core vs the numpy oracle, at STRAGGLER_LANES lanes."""
    from qsengine.decode import straggler as S

    spec = importlib.util.spec_from_file_location("reference_straggler", HERE.parent / "tests" / "reference_straggler.py")
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    rng = np.random.default_rng(7)
    n, experts, top_k = STRAGGLER_LANES, 256, 8
    tokens = np.exp(rng.uniform(0.0, np.log(4096.0), n))  # routed tokens per EP group, 1..4096
    gpus = rng.choice(np.array([8, 16]), n)
    a = rng.uniform(2e-6, 6e-6, n)  # s per touched expert (DeepSeek-V3 fp8 expert on an H100-class GPU)
    b = rng.uniform(2e-9, 6e-9, n)  # s per token-expert assignment
    pi = S._inclusion_probabilities(np.arange(1, experts + 1, dtype=float) ** -1.0, top_k)
    cases = {"uniform": (None, None), "popularity": (pi, None), "slots": (None, np.full(n, 32, dtype=np.int64))}
    impl = {"numpy (before)": ref.straggler_closed_form, "core (after)": S.straggler_closed_form}
    cpu: dict[tuple[str, str], list[float]] = {(c, k): [] for c in cases for k in impl}
    diff = {}
    for name, (p, r) in cases.items():  # warm caches (max_iid_normal, slot layouts); the agreement, reported
        m0, _ = ref.straggler_closed_form(experts, top_k, tokens, gpus, a, b, p, r)
        m1, _ = S.straggler_closed_form(experts, top_k, tokens, gpus, a, b, p, r)
        diff[name] = float(np.max(np.abs(m1 - m0) / m0))
    for _ in range(repeats):
        for name, (p, r) in cases.items():
            for k, f in impl.items():
                c = time.process_time()
                f(experts, top_k, tokens, gpus, a, b, p, r)
                cpu[(name, k)].append(time.process_time() - c)
    lines = [f"{_header()}; straggler_closed_form at {n:,} lanes (E = 256, k = 8, EP 8/16, routed tokens 1-4096; "
             f"popularity Zipf(1.0); slots R = 32), 1 thread, median CPU time of {repeats} interleaved runs"]
    for name in cases:
        before = statistics.median(cpu[(name, "numpy (before)")]) / n
        after = statistics.median(cpu[(name, "core (after)")]) / n
        lines.append(f"  {name:>10}: numpy {before * 1e6:9.3f} us/lane, core {after * 1e6:9.3f} us/lane; "
                     f"numpy / core {before / after:6.1f}x; mean max rel. difference {diff[name]:.1e}")
    lines.append("command: python benchmarks/bench_step_kernels.py --part straggler")
    return "\n".join(lines)


def main() -> int:
    warnings.simplefilter("ignore", qsengine.ContextWarning)
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--part", choices=["all", "sweep", "straggler"], default="all")
    args = ap.parse_args()
    if args.part in ("all", "straggler"):
        text = straggler(args.repeats)
        print(text)
        (HERE / "results" / "bench_step_kernels_straggler.txt").write_text(text + "\n", encoding="utf-8")
    if args.part in ("all", "sweep"):
        sweep(args.repeats)
    return 0


def sweep(repeats: int) -> None:
    """The calibrated vs roofline kernels in bench_sweep.py's closed-form grid."""
    grid = {"model": ["deepseek-v3", "qwen3-235b-a22b", "grok-1", "qwen3-30b-a3b"],
            "cluster": ["8xh100", "8xh200", "8xb200", "8xmi300x", "8xmi355x", "16xh100", "16xh200", "8xa100"],
            "context": [int(x) for x in np.geomspace(1024, 262144, 64).round()],
            "q": [float(x) for x in np.linspace(1.2, 8.0, 50)], "microbatches": [0], "precision": ["fp8"]}
    wall: dict[str, list[float]] = {"calibrated": [], "roofline": []}
    cpu: dict[str, list[float]] = {"calibrated": [], "roofline": []}
    n = 0
    for k in wall:  # warm the plan caches of both
        n = len(qsengine.sweep(dict(grid, options=[qsengine.StepOptions(kernels=k)]), seed=1, progress=False,
                               threads=1))
    for _ in range(repeats):
        for k in wall:
            g = dict(grid, options=[qsengine.StepOptions(kernels=k)])
            t, c = time.perf_counter(), time.process_time()
            qsengine.sweep(g, seed=1, progress=False, threads=1)
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    lines = [f"{_header()}; {n:,} closed-form points (bench_sweep.py's grid), 1 thread, "
             f"median of {repeats} interleaved runs"]
    for k in wall:
        w, c = statistics.median(wall[k]), statistics.median(cpu[k])
        lines.append(f"  kernels={k!r}: wall {w:.2f} s -> {n / w:,.0f} points/s; CPU {c:.2f} s -> {n / c:,.0f} points/CPU-s")
    ratio = statistics.median(cpu["calibrated"]) / statistics.median(cpu["roofline"])
    lines.append(f"  calibrated / roofline CPU time: {ratio:.2f}")
    lines.append("command: python benchmarks/bench_step_kernels.py --part sweep")
    text = "\n".join(lines)
    print(text)
    (HERE / "results" / "bench_step_kernels.txt").write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
