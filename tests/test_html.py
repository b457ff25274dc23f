"""Notebook views: Packing and RoutingStats render as HTML tables."""

from __future__ import annotations

import re

import qsengine as q
from qsengine._html import table


def _cells(h: str) -> list[str]:
    return re.findall(r"<td[^>]*>(.*?)</td>", h)


def test_table_escapes_everything():
    h = table(["a<b"], [["<script>x</script>", 1.5]], caption="c&d")
    assert "<script>" not in h and "&lt;script&gt;" in h and "a&lt;b" in h and "c&amp;d" in h


def test_routing_stats_html_has_every_statistic():
    s = q.route(64, 4, 32, 200, seed=1, placement=q.Placement.contiguous(4), cost=(1e-5, 1e-7))
    h = s._repr_html_()
    assert h.startswith("<table") and "microbatches=200" in h
    cells = _cells(h)
    for name in ("unique experts u", "straggler n_g", "step time [s]"):
        assert name in cells
    i = cells.index("unique experts u")
    assert float(cells[i + 1]) == float(f"{s.unique.mean:.4g}")


def test_packing_html_has_the_verdict_table_and_figure():
    p = q.pack("qwen3-30b-a3b", "8xh100", 8192)
    h = p._repr_html_()
    assert "FEASIBLE" in h and "precision bf16" in h and "per-GPU HBM (GB)" in h
    assert "<img src=\"data:image/png;base64," in h
    t = p.hbm_table()
    assert _cells(h)[: len(t.columns)] == [str(v) if not isinstance(v, float) else f"{v:.4g}" for v in
                                            t.iloc[0].tolist()]
    bad = q.pack("switch-c-2048", "8xh100", 512)
    assert "INFEASIBLE" in bad._repr_html_() and "in total exceed" in bad._repr_html_()
