"""HTML views for notebooks (``_repr_html_``): one table helper, one figure
helper, and the views of :class:`~qsengine.Packing` and
:class:`~qsengine.RoutingStats`. Every value is escaped."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any

__all__ = ["table", "figure", "packing_html", "routing_html"]

_STYLE = "border-collapse:collapse;font-size:90%"
_CELL = "padding:2px 8px;text-align:right;border-bottom:1px solid #ddd"


def _cell(v: Any) -> str:
    if isinstance(v, float):
        text = f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    else:
        text = str(v)
    return html.escape(text)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = "") -> str:
    """An HTML table (header row, body rows, optional caption), all text escaped."""
    head = "".join(f'<th style="{_CELL}">{html.escape(str(h))}</th>' for h in header)
    body = "".join("<tr>" + "".join(f'<td style="{_CELL}">{_cell(v)}</td>' for v in r) + "</tr>" for r in rows)
    cap = f'<caption style="text-align:left">{html.escape(caption)}</caption>' if caption else ""
    return f'<table style="{_STYLE}">{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def figure(fig: Any, dpi: int = 90) -> str:
    """A matplotlib figure as an inline PNG ``<img>`` (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="figure"/>'


def _lines(text: str) -> str:
    return "".join(f"<div>{html.escape(ln.strip())}</div>" for ln in text.splitlines() if ln.strip())


def packing_html(p: Any) -> str:
    """:meth:`Packing.summary`'s verdict lines, its HBM table and its plot."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    head = p.summary().split("  per-GPU HBM (GB):")[0]
    t = p.hbm_table()
    tab = table(list(t.columns), t.itertuples(index=False, name=None), caption="per-GPU HBM (GB)")
    fig, ax = plt.subplots(figsize=(min(12, 2 + 0.35 * p.num_gpus), 3.2))
    p.plot(ax=ax)
    return f"<div>{_lines(head)}{tab}{figure(fig)}</div>"


def routing_html(s: Any) -> str:
    """The statistics of :meth:`RoutingStats.summary` as an HTML table."""
    dists = [("unique experts u", s.unique), ("reuse B*k/u", s.reuse), ("straggler u_g", s.gpu_unique_max),
             ("straggler n_g", s.gpu_assign_max), ("imbalance max/mean n_g", s.imbalance)]
    if s.layer_time is not None:
        dists += [("layer time [s]", s.layer_time), ("step time [s]", s.step_time)]
    rows = [[name, d.mean, d.std, d.sem, d.p50, d.p90, d.p99] for name, d in dists]
    return table(["quantity", "mean", "std", "sem", "p50", "p90", "p99"], rows,
                 caption=s.summary().splitlines()[0])
