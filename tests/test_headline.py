"""The headline analysis (examples/headline_conditions.py, docs/headline.md)
stays true: under the study's conditions (KV-free, bandwidth-only GPU, equal
batch large enough to touch every expert) the engine reproduces 1/qs, at its
defaults (128K) it stays below, and the table pasted in docs/headline.md is
what the engine prints today."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest

import qsengine

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("headline_conditions", ROOT / "examples" / "headline_conditions.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod   # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


hc = _load()
INV_QS = qsengine.qs("deepseek-v3", "sqrt").asymptotic_ratio
LONG = 131072


def _ideal(cluster: str, **kw):
    c = qsengine.as_cluster(cluster)
    ideal = qsengine.Cluster(hc.bandwidth_only(c.accelerator), c.num_gpus)
    kw.setdefault("batch", hc.LARGE_BATCH)
    return hc.run(ideal, LONG, precision=hc.kv_free(), options=hc.FREE_COMM, **kw)


@pytest.mark.parametrize("cluster", ["8xH200", "16xH200"])
def test_study_conditions_reproduce_inverse_qs(cluster):
    res = _ideal(cluster)
    assert res.ratio is not None
    # Only weight reads remain and every expert is read: the ratio is the
    # bytes ratio N_total / N_dense = 1/qs (fp8 experts and other weights
    # have the same bytes per parameter); the twin's rounded FFN width and the
    # 2·d norm reads account for the last 0.2 %.
    assert res.ratio == pytest.approx(INV_QS, rel=0.01)
    why = res.explain()
    assert why["headroom"] == 1.0 and why["attention"] == pytest.approx(1.0, abs=1e-6)
    assert why["weights"] == pytest.approx(res.ratio, rel=1e-6)


def test_headline_needs_smaller_q():
    s = qsengine.load_model("deepseek-v3").sparsity
    res = _ideal("8xH200", q=1 / (hc.HEADLINE * s))
    assert res.ratio == pytest.approx(hc.HEADLINE, rel=0.01)


@pytest.mark.parametrize("cluster", ["8xH200", "16xH200"])
def test_defaults_at_128k_stay_below_inverse_qs(cluster):
    base = hc.run(qsengine.as_cluster(cluster), LONG)
    assert base.ratio is not None and base.ratio < INV_QS
    # No TPOT between 5 and 200 ms brings the equal-latency ratio to 1/qs at 128K.
    _, best = hc.best_ratio_at(base, n=60)
    assert best is not None and best < INV_QS
    # Every expert read at equal batch does not even fit at 128K: the MoE's KV room is too small.
    big = hc.run(qsengine.as_cluster(cluster), LONG, batch=hc.LARGE_BATCH)
    assert big.ratio is None and not big.moe.feasible


def test_real_kv_alone_takes_most_of_the_headline_away():
    """Dropping only the KV-free assumption (bandwidth-only GPU, equal batch
    at the MoE's HBM maximum) takes the ratio from 1/qs to less than half of
    it at 128K on 16xH200: the KV reads both sides share dilute the weight-read
    advantage."""
    c = qsengine.as_cluster("16xH200")
    b = hc.run(c, LONG, slo_tpot=None).moe.cluster_batch
    ideal = qsengine.Cluster(hc.bandwidth_only(c.accelerator), c.num_gpus)
    res = hc.run(ideal, LONG, batch=b, options=hc.FREE_COMM)
    assert res.ratio is not None and res.ratio < 0.5 * INV_QS


def test_closing_points_verdicts_follow_ratios():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qsengine.ContextWarning)
        pts = hc.closing_points(("deepseek-v3",), ("8xH200", "8xH100"), (LONG,))
    assert len(pts) == 2
    for p in pts:
        for k in ("max", "slo", "at"):
            r, v = p[f"{k}_ratio"], p[f"{k}_verdict"]
            if r is None:
                assert v not in ("dense", "moe", "tie")
            else:
                assert v == ("dense" if r > 1 else "moe" if r < 1 else "tie")
    h100 = next(p for p in pts if p["cluster"] == "8xh100")
    assert h100["max_verdict"] == "dense-only"   # 671 GB of fp8 weights exceed 8 x 80 GB usable
    table = hc.format_closing(pts)
    assert "| all | 2 |" in table


def test_doc_table_is_what_the_engine_prints():
    """docs/headline.md pastes the script's output; a change in the engine
    that moves these numbers must update the doc."""
    doc = (ROOT / "docs" / "headline.md").read_text()
    table = hc.format_rows(hc.conditions("16xH200", LONG), "DeepSeek-V3 on 16xh200, context 131,072")
    missing = [line for line in table.splitlines() if line and line not in doc]
    assert not missing, f"docs/headline.md is stale; rerun examples/headline_conditions.py: {missing[:3]}"
