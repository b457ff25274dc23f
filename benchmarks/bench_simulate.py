"""Benchmark: one full simulate() point and the built-in study.

Reports, in one run (medians of repeated runs; this machine is shared, so
compare ratios measured here, not absolute times):

* one simulate() point with a 1e5-microbatch routing Monte Carlo
  (DeepSeek-V3 on 8xMI355X at 32K, fp8) — and its parts: the closed-form
  plan search alone (microbatches=0) and the Monte Carlo alone;
* the obvious numpy implementation of the same Monte Carlo step-time
  statistic (Gumbel top-k per token, per-GPU counts, straggler max, summed
  over layers) on a smaller count, scaled, for comparison;
* the built-in study (``qsengine study``) end to end.

It also checks correctness: the numpy estimate of the mean routed step time
agrees with the core's within a few standard errors.

Run: python benchmarks/bench_simulate.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import qsengine
from qsengine.decode.simulate import simulate
from qsengine.decode.step import moe_cost_coefficients, moe_layer_shape
from qsengine.study import StudyConfig, run_study


def _median_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def numpy_step_time(E, k, B, gpus, layers, a, b, microbatches, rng) -> np.ndarray:
    """Obvious numpy: per microbatch and layer, Gumbel top-k per token (uniform
    weights), per-GPU touched experts and assignments, straggler max, summed."""
    out = np.zeros(microbatches)
    per = E // gpus
    for m in range(microbatches):
        total = 0.0
        for _ in range(layers):
            keys = rng.gumbel(size=(B, E))
            chosen = np.argpartition(-keys, k - 1, axis=1)[:, :k]
            counts = np.bincount(chosen.ravel(), minlength=E).reshape(gpus, per)
            u = (counts > 0).sum(axis=1)
            n = counts.sum(axis=1)
            total += np.max(np.maximum(a * u, b * n))
        out[m] = total
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repeats, skip the full study")
    args = ap.parse_args()
    reps = 1 if args.quick else 3
    lines: list[str] = []

    def say(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    say(f"qsengine {qsengine.__version__}, {qsengine._core.hardware_threads()} hardware threads")
    # one closed-form point, warm (the target: <= 50 ms), against the slow obvious
    # reference (pack() per plan, scalar bisection; tests/reference_simulate.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import reference_simulate as ref

    pt = dict(model="deepseek-v3", cluster="8xh200", context=32768, precision="fp8", microbatches=0)
    simulate(**pt)  # warm the plan caches
    t_pt, r_pt = _median_time(lambda: simulate(**pt), max(5, reps * 3))
    t_ref, rec_ref = _median_time(lambda: ref.record(**pt), 1)
    same = ref.same(rec_ref, r_pt.to_record()) == []
    say(f"one closed-form simulate point (deepseek-v3, 8xh200, 32K, fp8, plan auto, q* on), warm: "
        f"{t_pt * 1e3:.1f} ms; slow reference {t_ref * 1e3:.0f} ms (x{t_ref / t_pt:.0f}); identical: {same}")
    mc = dict(pt, microbatches="auto", routing="powerlaw:1.01", seed=1, rtol=1e-3)
    t_mc, r_mc = _median_time(lambda: simulate(**mc), max(3, reps))
    st = r_mc.moe.routing
    say(f"one Monte Carlo point to rtol 1e-3 (same point, powerlaw:1.01 routing): {t_mc:.2f} s, "
        f"{st.microbatches} microbatches, rse mean {st.rse_mean:.2g}, rse p99 {st.rse_p99:.2g}, "
        f"reached: {st.target_reached}")
    model, cluster, ctx = "deepseek-v3", "8xmi355x", 32768
    kw = dict(precision="fp8", seed=1, break_even=False)
    t_cf, res_cf = _median_time(lambda: simulate(model, cluster, ctx, microbatches=0, **kw), reps)
    t_full, res = _median_time(lambda: simulate(model, cluster, ctx, microbatches=100_000, **kw), reps)
    t_be, res_be = _median_time(lambda: simulate(model, cluster, ctx, microbatches=0, precision="fp8", seed=1), reps)
    say(f"simulate({model}, {cluster}, {ctx}) plan {res.moe.plan.label}, MoE batch {res.moe.cluster_batch}")
    say(f"  closed form only (plan search, both sides): {t_cf * 1e3:8.1f} ms")
    say(f"  + break-even q* bisection:                   {t_be * 1e3:8.1f} ms  (q* = {res_be.break_even_q})")
    say(f"  full point, 1e5 microbatches x {qsengine.load_model(model).decode_moe_layers} layers: "
        f"{t_full:8.2f} s   ratio {res.ratio:.3f} (closed form {res_cf.ratio:.3f})")

    # The same Monte Carlo statistic in numpy, timed on fewer microbatches and scaled.
    m = qsengine.load_model(model)
    prec = qsengine.as_precision("fp8")
    c = qsengine.load_cluster(cluster)
    plan = res.moe.plan
    a, b = moe_cost_coefficients(m, prec, c.accelerator, plan)
    tokens = max(1, round(moe_layer_shape(m, plan, res.moe.batch).tokens))
    n_np = 20 if args.quick else 50
    t_np, samples = _median_time(lambda: numpy_step_time(m.routed_experts, m.top_k, tokens, plan.ep,
                                                         m.decode_moe_layers, a, b, n_np,
                                                         np.random.default_rng(0)), 1)
    stats = qsengine.route(m.routed_experts, m.top_k, tokens, 100_000, placement=qsengine.Placement.contiguous(plan.ep),
                           seed=1, layers=m.decode_moe_layers, cost=(a, b))
    t_core, _ = _median_time(lambda: qsengine.route(m.routed_experts, m.top_k, tokens, 100_000,
                                                    placement=qsengine.Placement.contiguous(plan.ep), seed=1,
                                                    layers=m.decode_moe_layers, cost=(a, b)), reps)
    per_np = t_np / n_np
    per_core = t_core / 100_000
    say(f"routing Monte Carlo at {tokens} tokens/step, k={m.top_k}, E={m.routed_experts}, {plan.ep} GPUs:")
    say(f"  core (all threads): {per_core * 1e6:9.1f} us per microbatch  ({t_core:.2f} s for 1e5)")
    say(f"  numpy Gumbel top-k: {per_np * 1e6:9.1f} us per microbatch  (x{per_np / per_core:.0f} slower)")
    mean_np, sem_np = samples.mean(), samples.std(ddof=1) / np.sqrt(n_np)
    z = abs(mean_np - stats.step_time.mean) / max(sem_np, 1e-300)
    say(f"  check: numpy mean {mean_np * 1e3:.4f} ms vs core {stats.step_time.mean * 1e3:.4f} ms ({z:.1f} SEM)")
    ok = z < 5

    if not args.quick:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            df = run_study(StudyConfig(out=Path(tmp)), progress=False)
            t_study = time.perf_counter() - t0
        say(f"built-in study: {len(df)} points in {t_study:.1f} s "
            f"({t_study / len(df) * 1e3:.0f} ms per point, figures included)")
    out = Path(__file__).with_name("results") / "bench_simulate.txt"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    if not ok:
        print("CHECK FAILED: numpy and core disagree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
