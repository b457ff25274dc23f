"""Whole requests, issue #12's remaining items: colocated prefill stalls in the
TPOT (decode/sides.py, decode/montecarlo.py, decode/frontier.py), the
end-to-end frontier, and length distributions of the input and output
(decode/prefill.py, docs/model.md "Whole requests"). The pipeline against the
slow oracle with stalls is ``tests/test_requests.py``'s oracle test."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import qsengine
from qsengine import Plan
from qsengine.decode.prefill import prefill_ctx_flops, prefill_time
from qsengine.decode.step import step_params
from qsengine.specs.loaders import as_cluster, as_precision

I, O = 6144, 2048
BASE = dict(model="qwen3-235b-a22b", cluster="8xh200", precision="fp8", microbatches=0, break_even=False,
            context=I, output=O)


def _t_pf(side: qsengine.SideResult, cluster: str = "8xh200", prec: str = "fp8", prompt: float = I) -> float:
    """Seconds of one replica per prefilled request at the side's chosen plan (the dense side is its own
    model here: ``SideResult.model`` is the twin)."""
    acc = as_cluster(cluster).accelerator
    p = step_params(side.model, as_precision(prec), acc, side.plan)
    return float(prefill_time(p, np.array([float(prompt)]), np.array([prefill_ctx_flops(side.model)]))[0])


@pytest.mark.parametrize("plan", ["auto", Plan(tp=1, dp=8, ep=8)])
def test_colocated_tpot_is_the_step_plus_the_amortised_stall(plan):
    """TPOT (mean and p99) = t_step + (B/O)·t_pf with B the sequences per replica, the p99 meets the
    target, and the end-to-end rate B·dp/TPOT equals the harmonic combination of decode and prefill."""
    slo = 0.05
    res = qsengine.simulate(prefill="colocated", slo_tpot=slo, plan=plan, **BASE)
    rec = res.to_record()
    gpus = res.cluster.num_gpus
    for name, side in (("moe", res.moe), ("dense", res.dense)):
        t_pf = _t_pf(side)
        stall = side.batch * t_pf / O
        assert side.prefill_stall == pytest.approx(stall, rel=1e-12)
        assert rec[f"{name}_tpot_ms"] == pytest.approx((side.step.time + stall) * 1e3, rel=1e-12)
        assert rec[f"{name}_tpot_p99_ms"] == pytest.approx((side.step.time_p99 + stall) * 1e3, rel=1e-12)
        assert rec[f"{name}_tpot_p99_ms"] <= slo * 1e3 * (1 + 1e-12)
        assert side.tpot == pytest.approx(side.step.time + stall, rel=1e-15)
        # the decode throughput does not count the stalls ...
        assert rec[f"{name}_tokens_per_s"] == pytest.approx(side.cluster_batch / side.step.time, rel=1e-12)
        # ... the end-to-end rate is B·dp / (t_step + (B/O)·t_pf), the harmonic combination
        e2e = rec[f"{name}_request_tokens_per_s_per_gpu"] * gpus
        assert e2e == pytest.approx(side.cluster_batch / side.tpot, rel=1e-12)
        dec, pf = rec[f"{name}_tokens_per_s_per_gpu"], rec[f"{name}_prefill_tokens_per_s_per_gpu"]
        assert e2e / gpus == pytest.approx(1 / (1 / dec + (I / O) / pf), rel=1e-12)
        assert pf * gpus == pytest.approx(I * side.replicas / t_pf, rel=1e-12)


def test_stalls_bind_the_target_only_when_colocated():
    """On one plan and target: colocated admits no more sequences than decode only (its TPOT is the step's
    plus a stall that grows with B), and one admission unit more would miss the target; "disaggregated" and
    "none" see the decode step alone (the same batch and TPOT)."""
    plan = Plan(tp=8)
    slo = 0.04
    got = {pf: qsengine.simulate(prefill=pf, slo_tpot=slo, plan=plan, **BASE) for pf in
           ("none", "colocated", "disaggregated")}
    for name in ("moe", "dense"):
        none, col, dis = (getattr(got[k], name) for k in ("none", "colocated", "disaggregated"))
        assert dis.batch == none.batch and dis.tpot == none.tpot and dis.prefill_stall == 0.0
        assert none.prefill_stall == 0.0
        assert col.batch < none.batch and col.batch_limit == "slo"
        # one more sequence would miss the target (the bisection is on the TPOT with stalls)
        from qsengine.decode.step import decode_step

        acc = as_cluster("8xh200").accelerator
        nxt = decode_step(col.model, as_precision("fp8"), acc, col.plan, col.batch + 1, I + (O + 1) / 2)
        assert nxt.time_p99 + (col.batch + 1) * _t_pf(col) / O > slo


def test_monte_carlo_tpot_includes_the_stall():
    """The routing Monte Carlo steps the batch down on the p99 with stalls, and reports it with them."""
    slo = 0.05
    res = qsengine.simulate(prefill="colocated", slo_tpot=slo, seed=3, **dict(BASE, microbatches=2000))
    rec = res.to_record()
    side = res.moe
    stall = side.batch * _t_pf(side) / O
    assert side.prefill_stall == pytest.approx(stall, rel=1e-12) and stall > 0
    assert rec["moe_tpot_ms"] == pytest.approx((side.step.time + stall) * 1e3, rel=1e-9)
    assert rec["moe_tpot_p99_ms"] <= slo * 1e3 * (1 + 1e-12)
    assert rec["moe_tokens_per_s"] == pytest.approx(side.cluster_batch / side.step.time, rel=1e-9)


@pytest.mark.parametrize("prefill", ["none", "colocated", "disaggregated"])
def test_frontier_with_requests(prefill):
    """The frontier's TPOTs include the colocated stalls; its end-to-end column is B·dp/TPOT per GPU
    (colocated) or the harmonic combination with the prefill pool (disaggregated), nan without prefill; the
    chosen operating point lies on or under it; ratio_at takes the headline ratio's basis."""
    res = qsengine.simulate(prefill=prefill, slo_tpot=None, **BASE)
    front = res.frontier
    rec = res.to_record()
    gpus = res.cluster.num_gpus
    for name, side in (("moe", res.moe), ("dense", res.dense)):
        f = front[front["side"] == name]
        assert len(f) > 1
        assert (np.diff(f["tpot"].to_numpy()) >= 0).all()
        col = "tokens_per_s_per_gpu" if prefill == "none" else "request_tokens_per_s_per_gpu"
        assert (np.diff(f[col].to_numpy()) > 0).all()  # Pareto on the basis column
        if prefill == "none":
            assert f["request_tokens_per_s_per_gpu"].isna().all()
            continue
        e2e = f["request_tokens_per_s_per_gpu"].to_numpy()
        if prefill == "colocated":
            assert np.allclose(e2e, f["batch"] / f["tpot"] / gpus, rtol=1e-12)
        else:
            pool = rec[f"{name}_prefill_tokens_per_s_per_gpu"]
            want = 1 / (1 / f["tokens_per_s_per_gpu"] + (I / O) / pool)
            assert np.allclose(e2e, want, rtol=1e-12)
        # the operating point (the largest batch HBM holds, the best end-to-end plan) is on or under the frontier
        at = res.throughput_at(side.tpot * (1 + 1e-9), name, basis="end-to-end")
        assert rec[f"{name}_request_tokens_per_s_per_gpu"] <= at * (1 + 1e-9)
    r = res.ratio_at(0.06)
    d = res.throughput_at(0.06, "dense")
    m = res.throughput_at(0.06, "moe")
    assert r is None or r == pytest.approx(d / m, rel=1e-12)
    if prefill == "none":
        with pytest.raises(ValueError, match="basis='end-to-end'"):
            res.ratio_at(0.06, basis="end-to-end")
    with pytest.raises(ValueError, match="basis='x'"):
        res.ratio_at(0.06, basis="x")


# ---------------------------------------------------------------------------
# length distributions
# ---------------------------------------------------------------------------

from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import reference_simulate as ref  # noqa: E402
from _helpers import CLUSTERS, MOE_MODELS, assert_matches_oracle, records  # noqa: E402
from qsengine.decode.prefill import ADMISSION_Z, LengthDist, admission_context, length_moments  # noqa: E402
import test_requests as _tr  # noqa: E402  (its column lists; a module, so its tests are not collected twice)

LAWS = ["fixed", "uniform:0.5", "uniform:1", "exponential", "lognormal:0.5", "lognormal:1.5"]


@pytest.mark.parametrize("law, sd", [("uniform:0.5", lambda t: t * 0.5 / math.sqrt(3)), ("exponential", lambda t: t),
                                     ("lognormal:0.5", lambda t: t * math.sqrt(math.exp(0.25) - 1)),
                                     ("lognormal:1", lambda t: t * math.sqrt(math.e - 1))])
@pytest.mark.parametrize("mean", [2.0, 1000.0, 65536.0])
def test_discretised_laws_keep_their_mean_and_nearly_their_spread(law, sd, mean):
    """Each bin at its conditional mean: the mean is exact, every length >= 1, the sd within the
    documented loss of the within-bin variance (closed forms of L = 1 + Y, E[Y] = mean - 1)."""
    v, w = LengthDist.parse(law).discretise(mean)
    assert v.size == 64 and w.sum() == pytest.approx(1.0, abs=1e-15)
    assert float(v @ w) == pytest.approx(mean, rel=1e-12)
    assert v.min() >= 1.0 and (np.diff(v) > 0).all()
    got = math.sqrt(max(float(w @ v ** 2) - mean ** 2, 0.0))
    want = sd(mean - 1)
    assert 0.93 * want <= got <= want * (1 + 1e-9)


def test_fixed_lengths_moments_are_todays():
    mean, sd, iv, iw = length_moments(6144, 2048, LengthDist(), LengthDist())
    assert mean == 6144 + (2048 + 1) / 2 and iv.tolist() == [6144.0] and iw.tolist() == [1.0]
    assert sd == pytest.approx(math.sqrt((2048 ** 2 - 1) / 12), rel=1e-12)  # the age j uniform on 1..O
    # exponential output of mean m: E[O^2] ~ 2 m^2, so a slot holds on average ~ I + m (length bias) not I + m/2
    mean_e, _, _, _ = length_moments(6144, 2048, LengthDist(), LengthDist.parse("exponential"))
    v, w = LengthDist.parse("exponential").discretise(2048)
    assert mean_e == pytest.approx(6144 + (w @ v ** 2 + 2048) / (2 * 2048), rel=1e-12)
    assert 6144 + 0.98 * 2048 < mean_e < 6144 + 2048 + 1


def _slots(laws: tuple[str, str], mean_in: int, mean_out: int, B: int, steps: int, seed: int = 0):
    """A direct simulation of continuous batching: B slots, each running one request (i, o) drawn
    independently from the discretised laws for o decode steps (step j caches i + j tokens), then
    replaced by a new request whose prompt is prefilled. Returns per-step arrays: total cache of the
    B slots, prefills started, and their prompt lengths summed through ``cost``."""
    rng = np.random.default_rng(seed)
    iv, iw = LengthDist.parse(laws[0]).discretise(mean_in)
    ov, ow = LengthDist.parse(laws[1]).discretise(mean_out)
    ov = np.maximum(np.round(ov), 1).astype(np.int64)  # whole steps
    n_draw = B + steps * B // max(int(ov.min()), 1) + 16

    def draw(n):
        return iv[rng.choice(iv.size, n, p=iw)], ov[rng.choice(ov.size, n, p=ow)]

    ins, outs = draw(n_draw)
    nxt = B
    cur_i, cur_o = ins[:B].copy(), outs[:B].copy()
    age = np.array([rng.integers(0, o) for o in cur_o])  # start in steady state: a uniform age (burn-in below)
    cache = np.empty(steps)
    started = np.zeros(steps)
    prompt_sq = np.zeros(steps)
    for t in range(steps):
        age += 1
        cache[t] = np.sum(cur_i + age)
        done = np.flatnonzero(age >= cur_o)
        k = done.size
        started[t] = k
        new = slice(nxt, nxt + k)
        cur_i[done], cur_o[done] = ins[new], outs[new]
        prompt_sq[t] = np.sum(ins[new] ** 2)
        age[done] = 0
        nxt += k
    return cache, started, prompt_sq, (iv, iw, ov.astype(float), ow)


@pytest.mark.parametrize("laws", [("fixed", "exponential"), ("lognormal:1", "uniform:1"),
                                  ("exponential", "lognormal:0.8")])
def test_slot_simulation_agrees_with_the_closed_forms(laws):
    """Steady-state continuous batching, simulated slot by slot: the mean cache per slot (what a step reads)
    is E[O·(I + (O+1)/2)]/E[O], its sd that of length_moments, prefills start at B/E[O] per step, and a
    prefill cost superlinear in I (t = I^2) costs B·E[t(I)]/E[O] per step; admission at
    mean + z·sd/√B overflows on about 1% of steps."""
    B, steps, I, O = 256, 40_000, 500, 200
    cache, started, prompt_sq, (iv, iw, ov, ow) = _slots(laws, I, O, B, steps, seed=1)
    burn = 5 * int(ov.max())
    cache, started, prompt_sq = cache[burn:], started[burn:], prompt_sq[burn:]
    # the closed forms on the simulated (whole-step) output law
    m_o = float(ow @ ov)
    c_mean = I + (ow @ ov ** 2 + m_o) / (2 * m_o)
    assert cache.mean() / B == pytest.approx(c_mean, rel=0.01)
    mean, sd, _, _ = length_moments(I, m_o, LengthDist.parse(laws[0]), LengthDist("fixed"))  # I's part
    var_j = (2 * ow @ ov ** 3 + 3 * ow @ ov ** 2 + m_o) / (6 * m_o) - ((ow @ ov ** 2 + m_o) / (2 * m_o)) ** 2
    sd_c = math.sqrt(float(iw @ iv ** 2) - I ** 2 + var_j)
    assert started.mean() == pytest.approx(B / m_o, rel=0.02)
    assert prompt_sq.mean() == pytest.approx(B * float(iw @ iv ** 2) / m_o, rel=0.03)
    # the batch's total cache: mean B·c̄, sd √B·sd_c (slots independent), so the margin holds on ~99% of steps
    assert cache.std() == pytest.approx(math.sqrt(B) * sd_c, rel=0.1)
    over = np.mean(cache > B * (c_mean + ADMISSION_Z * sd_c / math.sqrt(B)))
    assert over < 0.03
    # and the pipeline's moments on the laws as named (its output law not rounded to whole steps)
    got_mean, got_sd, _, _ = length_moments(I, O, LengthDist.parse(laws[0]), LengthDist.parse(laws[1]))
    assert got_mean == pytest.approx(c_mean, rel=5e-3) and got_sd == pytest.approx(sd_c, rel=0.02)


def test_admission_context_is_mean_plus_margin():
    got = admission_context(np.array([1000.5, 1000.5, 1000.5]), np.array([100.0, 100.0, 0.0]), np.array([1, 100, 7]))
    assert got.tolist() == [math.ceil(1000.5 + ADMISSION_Z * 100), math.ceil(1000.5 + ADMISSION_Z * 10), 1001]


lengths = st.fixed_dictionaries({
    "model": st.sampled_from(MOE_MODELS),
    "cluster": st.sampled_from(CLUSTERS),
    "context": st.one_of(st.sampled_from([1, 2048, 6144]), st.integers(1, 65536)),
    "output": st.one_of(st.sampled_from([1, 2048]), st.integers(1, 32768)),
    "prefill": st.sampled_from(["none", "colocated", "disaggregated"]),
    "context_dist": st.sampled_from(LAWS),
    "output_dist": st.sampled_from(LAWS),
    "slo_tpot": st.one_of(st.none(), st.floats(0.005, 0.2)),
    "precision": st.sampled_from([None, "fp8"]),
    "routing": st.sampled_from(["uniform", "powerlaw:1.01"]),
    "break_even": st.booleans(),
    "microbatches": st.just(0),
    "batch": st.one_of(st.none(), st.none(), st.sampled_from([1, 48])),
})


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(lengths, min_size=1, max_size=3))
@example(pts=[dict(model="qwen3-235b-a22b", cluster="8xh200", context=6144, output=2048, prefill="colocated",
                   context_dist="lognormal:1", output_dist="exponential", microbatches=0, precision="fp8"),
              dict(model="deepseek-r1", cluster="8xh200", context=4096, output=1024, prefill="disaggregated",
                   context_dist="uniform:0.5", output_dist="fixed", microbatches=0, precision="fp8",
                   plan=Plan(tp=8, ep=8, attn_dp=True), break_even=False)])
def test_pipeline_equals_the_oracle_with_length_distributions(pts):
    """Lanes with fixed and distributed lengths in one call, each equal to the scalar oracle (the
    length-biased read, E[t_pf(I)], admission at the mean plus its margin, written the plain way)."""
    pts = [{k: v for k, v in p.items() if v is not None or k in ("slo_tpot", "batch")} for p in pts]
    for p, g in assert_matches_oracle(pts, exact=_tr.EXACT + ("moe_admit_context", "dense_admit_context"),
                                      close=_tr.CLOSE, q_star_rtol=2e-3):
        assert g["context_dist"] == LengthDist.parse(p.get("context_dist", "fixed")).label


def test_fixed_laws_are_bit_identical_to_no_laws():
    kw = dict(BASE, prefill="colocated")
    a, b = records([kw, dict(kw, context_dist="fixed", output_dist="fixed")])
    assert ref.same(a, b, rtol=0.0) == []
    assert a["read_context"] == I + (O + 1) / 2 and a["moe_admit_context"] == I + O


def test_distributions_through_simulate_and_sweep():
    """simulate and sweep give the same record; a wider output law reads more (length bias) and admits
    at the mean cache plus a margin; the pack shown is at that admission context."""
    kw = dict(BASE, prefill="colocated", output_dist="exponential", context_dist="lognormal:0.8")
    res = qsengine.simulate(**kw)
    rec = res.to_record()
    mean, sd, _, _ = length_moments(I, O, LengthDist.parse("lognormal:0.8"), LengthDist.parse("exponential"))
    assert rec["read_context"] == pytest.approx(mean, rel=1e-15) and mean > I + (O + 1) / 2
    assert res.moe.step.context == pytest.approx(mean, rel=1e-15)
    for name, side in (("moe", res.moe), ("dense", res.dense)):
        # n: the sequences of one memory pool admitted at the mean (one fixed-point step)
        n0 = qsengine.pack(side.model, res.cluster, math.ceil(mean), plan=side.plan, precision="fp8").admissible_batch
        assert rec[f"{name}_admit_context"] == math.ceil(mean + ADMISSION_Z * sd / math.sqrt(n0))
        at = qsengine.pack(side.model, res.cluster, rec[f"{name}_admit_context"], plan=side.plan, precision="fp8")
        assert side.packing.admissible_batch == at.admissible_batch < n0
        assert side.batch <= at.admissible_batch * (side.plan.tp if side.plan.attn_dp else 1)
    df = qsengine.sweep({k: [v] for k, v in kw.items()}, progress=False)
    row = df.iloc[0]
    for k in ("ratio", "moe_batch", "dense_batch", "read_context", "moe_admit_context", "moe_tpot_ms"):
        assert row[k] == rec[k], k
    assert "exponential" in res.settings_line() and "lognormal:0.8" in res.settings_line()


@pytest.mark.parametrize("kw, exc, msg", [
    (dict(context_dist="gamma"), ValueError, "field 'context_dist' = 'gamma': the law must be one of"),
    (dict(output_dist="uniform:2"), ValueError, r"field 'output_dist' = 'uniform:2': the spread must be in \(0, 1\]"),
    (dict(output_dist="lognormal"), ValueError, "field 'output_dist' = 'lognormal': 'lognormal' needs its spread"),
    (dict(context_dist="exponential:3"), ValueError, "takes no parameter"),
    (dict(context_dist=0.5), TypeError, "field 'context_dist' = 0.5: must be a string"),
    (dict(context_dist="exponential", output=0), ValueError,
     "fields 'context_dist' = 'exponential' and 'output' = 0: a length distribution needs whole requests"),
])
def test_bad_length_laws_are_refused(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        qsengine.simulate(**{**BASE, **kw})


@pytest.mark.parametrize("prefill", ["colocated", "disaggregated"])
def test_frontier_with_length_distributions_reaches_the_operating_point(prefill):
    """With no latency target each side runs its best plan at the largest batch it admits (mean cache plus
    margin), which is the top of its end-to-end frontier (the frontier admits and prefills the same way:
    E[t_pf(I)] over the prompt law)."""
    kw = dict(BASE, prefill=prefill, slo_tpot=None, context_dist="lognormal:1", output_dist="uniform:1")
    res = qsengine.simulate(**kw)
    rec = res.to_record()
    for name, side in (("moe", res.moe), ("dense", res.dense)):
        f = res.frontier[res.frontier["side"] == name]
        top = f.iloc[int(np.argmax(f["request_tokens_per_s_per_gpu"].to_numpy()))]
        assert top["plan"] == side.plan.label and top["batch"] == side.cluster_batch
        assert top["request_tokens_per_s_per_gpu"] == pytest.approx(rec[f"{name}_request_tokens_per_s_per_gpu"],
                                                                    rel=1e-9)
        assert top["tpot"] == pytest.approx(side.tpot, rel=1e-12)


def test_prefill_on_a_plan_with_redundant_slots():
    """Regression: prefill's routed straggler takes the plan's redundant expert slots (12 GPUs, ep = 3 or
    6 with slots filling 256 experts), under a skewed law too (it used to fail reshaping 256 experts into
    3 GPUs); equal to the oracle."""
    p = dict(model="deepseek-v3", cluster="12xmi300x", context=1, output=1, prefill="colocated", slo_tpot=None,
             routing="powerlaw:1.01", break_even=False, microbatches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qsengine.ContextWarning)
        got = records([p])[0]
        want = ref.record(**p)
    assert ref.same({k: want[k] for k in _tr.EXACT}, got) == []
    for k in _tr.CLOSE:
        assert _tr._close(got[k], want[k], 1e-9), k
