"""Packing benchmarks, with correctness checks.

1. Mixed-length paged packing: one million sequences (drawn from a length
   distribution with the counter-based stream) offered to a 72-GPU GB200 NVL72
   cluster serving DeepSeek-V3 (fp8), block size 16.
2. Plan search: every valid plan of DeepSeek-V3 for every cluster size 1..1024
   H200s at 32K context.
3. Batched admission (the closed-form fast path's hot spot): 2^20 (plan,
   context, dense FFN bytes) lanes of the dense twins of Qwen3-235B-A22B on 8
   H200s (fp8), through the core kernel vs the numpy formulation it replaced
   (kept below as the baseline; answers must match).

Each is timed over repeated runs (median reported) next to the obvious pure
Python / numpy implementation (tests/reference_packing.py), which runs on a
smaller size because it is slow, and whose answers must match the core's.

    python benchmarks/bench_packing.py            # writes benchmarks/results/bench_packing.txt
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import qsengine  # noqa: E402
from qsengine import Cluster, Plan, Workload, _core  # noqa: E402
from qsengine.packing import (COMPONENTS, PlanMemory, admissible_batches, memory_description,  # noqa: E402
                              plan_memory, search_plans)
from qsengine.specs.precision import PRESETS  # noqa: E402

import reference_packing as ref  # noqa: E402
from _presets_for_packing import DEEPSEEK_V3, GB200, H200, QWEN3_235B  # noqa: E402

REPEATS = 5
LINES: list[str] = []


def say(s: str = "") -> None:
    print(s, flush=True)
    LINES.append(s)


def timed(fn, repeats: int = REPEATS):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times), min(times)


def bench_paged() -> None:
    say("== 1. paged mixed-length packing: 1,000,000 sequences onto 72 GPUs ==")
    wl = Workload.distribution([300, 1000, 2500, 7000, 20000, 60000, 128000], [25, 25, 20, 15, 8, 5, 2])
    cl = Cluster(GB200, 72)
    plan = Plan(tp=8, dp=9, ep=8, attn_dp=True)  # 72 attention replicas, EP over each 8-GPU group
    n = 1_000_000
    # sequences are offered short-context-first-come: most of the million do not fit once the cluster is full
    p, med, best = timed(lambda: qsengine.pack(DEEPSEEK_V3, cl, 8192, plan=plan, precision="fp8", lengths=wl,
                                              num_sequences=n, seed=2026, block_size=16))
    ps = p.paged
    say(f"model deepseek-v3 fp8 on 72x gb200, plan {p.plan.label}, block 16, seed 2026")
    say(f"qsengine.pack (sample 1e6 lengths + pack): median {med * 1e3:.1f} ms, best {best * 1e3:.1f} ms "
        f"over {REPEATS} runs")
    say(f"  offered {ps.offered:,}  placed {ps.placed:,}  rejected {ps.rejected:,}  first rejected #{ps.first_rejected:,}")
    say(f"  KV placed {ps.kv_bytes / 1e12:.3f} TB, fragmentation {ps.fragmentation_bytes / 1e9:.2f} GB "
        f"({ps.fragmentation_fraction:.3%}); min free on a GPU {p.column('free').min() / 1e9:.3f} GB")
    assert ps.placed + ps.rejected == n
    assert (p.column("free") >= 0).all() and (p.column("overflow") == 0).all()

    # core only: pack an explicit lengths array (no sampling)
    lengths = _core.sample_lengths(np.asarray(wl.lengths), np.asarray(wl.weights), n, 1, 2, 0)
    desc = memory_description(DEEPSEEK_V3, "fp8", GB200)
    pd_ = _core.PlanDesc(8, 1, 9, 8, 1, True)
    _, med_core, _ = timed(lambda: _core.pack(desc, pd_, 72, 8192, None, 0, lengths, 16))
    _, med_sample, _ = timed(lambda: _core.sample_lengths(np.asarray(wl.lengths), np.asarray(wl.weights), n, 1, 2, 0))
    rng = np.random.default_rng(0)
    probs = np.asarray(wl.weights) / sum(wl.weights)
    _, med_np_sample, _ = timed(lambda: rng.choice(np.asarray(wl.lengths), size=n, p=probs))
    say(f"  core pack of a given 1e6-length array: median {med_core * 1e3:.1f} ms; "
        f"core sampling of 1e6 lengths: {med_sample * 1e3:.1f} ms (numpy rng.choice: {med_np_sample * 1e3:.1f} ms)")

    # every sequence placed: shorter lengths, a bigger share fits (exercises the placing path, not the reject cache)
    short = Workload.distribution([64, 100, 200, 333], [1, 1, 1, 1])
    q, med_s, _ = timed(lambda: qsengine.pack(DEEPSEEK_V3, cl, 8192, plan=plan, precision="fp8", lengths=short,
                                              num_sequences=n, seed=1, block_size=16))
    say(f"  short-context variant (64..333 tokens): placed {q.paged.placed:,} of {n:,} "
        f"(fragmentation {q.paged.fragmentation_fraction:.2%}), median {med_s * 1e3:.1f} ms")

    # the obvious pure-Python packer on a smaller size, same answer required
    m = 20_000
    sub = lengths[:m].tolist()
    r, med_ref, _ = timed(lambda: ref.reference_paged(DEEPSEEK_V3, PRESETS["fp8"], GB200, plan, 72, sub, 16), 3)
    c, med_c, _ = timed(lambda: qsengine.pack(DEEPSEEK_V3, cl, 8192, plan=plan, precision="fp8", lengths=sub,
                                              block_size=16))
    assert c.paged.placed == r["placed"] and c.paged.rejected == r["rejected"]
    assert list(c.paged.replica_sequences) == r["per_unit"]
    assert abs(c.paged.fragmentation_bytes - r["fragmentation_bytes"]) <= 1e-9 * r["fragmentation_bytes"]
    say(f"  pure-Python reference on {m:,} sequences: median {med_ref * 1e3:.0f} ms vs qsengine {med_c * 1e3:.1f} ms "
        f"(x{med_ref / med_c:.0f}); placements identical ({r['placed']:,} placed)")
    say()


def bench_plan_search() -> None:
    say("== 2. plan search: every valid plan for 1..1024 GPUs ==")
    context = 32768
    df, med, best = timed(lambda: search_plans(DEEPSEEK_V3, H200, context, max_gpus=1024, precision="fp8"))
    say(f"deepseek-v3 fp8 on H200, context {context}: {len(df):,} plans over 1024 cluster sizes; "
        f"median {med * 1e3:.1f} ms, best {best * 1e3:.1f} ms over {REPEATS} runs "
        f"({_core.hardware_threads()} threads)")
    _, med1, _ = timed(lambda: search_plans(DEEPSEEK_V3, H200, context, max_gpus=1024, precision="fp8", threads=1))
    say(f"  single thread: median {med1 * 1e3:.1f} ms")
    df1 = search_plans(DEEPSEEK_V3, H200, context, max_gpus=1024, precision="fp8", threads=1)
    assert df.equals(df1), "thread count changed the result"
    g_min = int(df[df["feasible"]]["num_gpus"].min())
    say(f"  smallest feasible cluster {g_min} GPUs (qsengine.min_gpus: "
        f"{qsengine.min_gpus(DEEPSEEK_V3, H200, context, precision='fp8')}); best plan at 8 GPUs: "
        f"{df[df['num_gpus'] == 8].iloc[0]['plan']} batch {int(df[df['num_gpus'] == 8].iloc[0]['cluster_batch'])}; "
        f"at 72: {df[df['num_gpus'] == 72].iloc[0]['plan']} batch {int(df[df['num_gpus'] == 72].iloc[0]['cluster_batch'])}")

    # obvious Python: loop over the same plans with the reference packer, smaller range
    hi = 24
    prec = PRESETS["fp8"]

    def python_search():
        out = []
        for g in range(1, hi + 1):
            for plan in qsengine.plans(DEEPSEEK_V3, g):
                out.append((g, plan.label, ref.reference_pack(DEEPSEEK_V3, prec, H200, plan, g, context).cluster_batch))
        return out

    py, med_py, _ = timed(python_search, 1)
    core_small, med_small, _ = timed(lambda: search_plans(DEEPSEEK_V3, H200, context, max_gpus=hi, precision="fp8"))
    want = sorted(py)
    got = sorted(zip(core_small["num_gpus"], core_small["plan"], core_small["cluster_batch"]))
    assert [(int(a), b, int(c)) for a, b, c in got] == want, "core and reference disagree"
    say(f"  pure-Python reference over 1..{hi} GPUs ({len(py):,} plans): {med_py * 1e3:.0f} ms vs qsengine "
        f"{med_small * 1e3:.2f} ms (x{med_py / med_small:.0f}); every plan's batch identical")
    say()


# The obvious numpy implementation of batched admission: packing.py's
# admissible_batches before it moved into the core (materialises (lanes,
# max_pp, components) arrays). Kept here as the benchmark's baseline.
_BATCH_CAP = 1 << 62  # cpp/core/packing_detail.h's kBatchCap


def numpy_floor_fit(free: np.ndarray, per: np.ndarray) -> np.ndarray:
    free = np.asarray(free, dtype=np.float64)
    per = np.asarray(per, dtype=np.float64)
    ok = (free >= 0) & (per > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.floor(np.where(ok, free / np.where(ok, per, 1.0), 0.0))
    b = np.where(q >= float(_BATCH_CAP), _BATCH_CAP, q).astype(np.int64)
    b = np.where(ok, b, 0)
    while True:
        down = ok & (b > 0) & (b.astype(np.float64) * per > free)
        if not down.any():
            break
        b = b - down
    while True:
        up = ok & (b < _BATCH_CAP) & ((b + 1).astype(np.float64) * per <= free)
        if not up.any():
            break
        b = b + up
    return b


def numpy_admissible_batches(pm: PlanMemory, plan_index: np.ndarray, context: np.ndarray,
                             dense_ffn_bytes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    pi = np.asarray(plan_index, dtype=np.int64)
    ctx = np.asarray(context, dtype=np.int64)[:, None]
    if dense_ffn_bytes is None:
        total = pm.weight_total[pi]
    else:
        comp = pm.weights[pi].copy()
        ffn_col = COMPONENTS.index("dense_ffn")
        comp[:, :, ffn_col] = pm.dense_layers[pi].astype(np.float64) * np.asarray(dense_ffn_bytes)[:, None] \
            / pm.shard[pi][:, None]
        total = np.zeros(comp.shape[:2])
        for c in range(comp.shape[2]):
            total = total + comp[:, :, c]
        total = np.where(np.isfinite(pm.weight_total[pi]), total, -np.inf)
    local_tokens = np.minimum(ctx, pm.local_window) if pm.local_window > 0 else ctx
    tokens = pm.kv_full_layers[pi] * ctx + pm.kv_local_layers[pi] * local_tokens
    per = pm.kv_per_token_layer[pi] * tokens.astype(np.float64)
    free = pm.usable - total
    b = np.where(per > 0, numpy_floor_fit(free, per), _BATCH_CAP)
    batch = b.min(axis=1)
    fit = total.max(axis=1) <= pm.usable
    batch = np.where(fit & (batch != _BATCH_CAP), batch, 0)
    return batch, fit


def bench_admission() -> None:
    say("== 3. batched admission: 2^20 (plan, context, dense FFN bytes) lanes ==")
    prec = PRESETS["fp8"]
    cl = Cluster(H200, 8)
    pm = plan_memory(QWEN3_235B.dense_twin(1.5), cl, prec)  # one family serves every twin (decode.pipeline)
    P = len(pm.plans)
    n = 1 << 20
    rng = np.random.default_rng(2026)
    idx = np.tile(np.arange(P), n // P + 1)[:n]  # lanes x plans, as decode.sides._side builds them
    ctx = rng.integers(1, 262145, n)
    ffn_q = np.array([QWEN3_235B.dense_twin(q).dense_ffn_params * prec.weight_bytes
                      for q in np.linspace(1.1, 8.0, 32)])
    ffn = ffn_q[rng.integers(0, ffn_q.size, n)]
    max_pp = pm.weights.shape[1]
    say(f"dense twins of qwen3-235b-a22b fp8 on 8x h200: {P} plans (max pp {max_pp}), {n:,} lanes, contexts "
        f"1..262144, dense FFN bytes of 32 twins (q 1.1..8); load average {os.getloadavg()[0]:.2f} at start")
    core_repeats = 5 * REPEATS  # the core is fast: more runs steady its median on a shared machine
    for label, extra in (("with per-lane dense FFN bytes", (ffn,)), ("without (the table's own weights)", ())):
        core, med_core, best_core = timed(lambda: admissible_batches(pm, idx, ctx, *extra), core_repeats)
        _, med_core1, _ = timed(lambda: _core.admissible_batches(pm.table, idx, ctx, *extra, threads=1), core_repeats)
        ref_out, med_np, best_np = timed(lambda: numpy_admissible_batches(pm, idx, ctx, *extra))
        assert np.array_equal(core[0], ref_out[0]) and np.array_equal(core[1], ref_out[1]), "core != numpy"
        say(f"{label}: core median {med_core * 1e3:.1f} ms (best {best_core * 1e3:.1f}; "
            f"{_core.hardware_threads()} threads, {core_repeats} runs; 1 thread {med_core1 * 1e3:.1f} ms) vs numpy "
            f"median {med_np * 1e3:.0f} ms (best {best_np * 1e3:.0f}; {REPEATS} runs): x{med_np / med_core:.0f} "
            f"(x{med_np / med_core1:.0f} on one thread); identical batches "
            f"(mean {core[0].mean():.1f}, {int((core[0] >= 1).sum()):,} feasible lanes)")
    say()


def main() -> None:
    say(f"# qsengine {qsengine.__version__} packing benchmark — {time.strftime('%Y-%m-%d %H:%M')}")
    say(f"# {platform.platform()}, python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"{_core.hardware_threads()} threads")
    say()
    bench_paged()
    bench_plan_search()
    bench_admission()
    out = ROOT / "benchmarks" / "results" / "bench_packing.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(LINES) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
