"""Typed results of a comparison: :class:`SideResult` (one side at its
operating point) and :class:`SimulationResult` (both sides, the ratio, the qs
verdict and q*), with their exports (dict, flat record, pandas), summary and
plot."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from qsengine.decode.breakdown import StepBreakdown
from qsengine.specs import Cluster, Model, Plan
from qsengine.specs.twin import QsResult

if TYPE_CHECKING:
    from qsengine.packing import Packing
    from qsengine.routing import RoutingStats

__all__ = ["SideResult", "SimulationResult"]


@dataclass(frozen=True)
class SideResult:
    """One side of the comparison (the MoE or the dense model) at its best
    batch and plan. ``feasible=False`` carries the ``reason`` and no numbers."""

    model: Model
    feasible: bool
    reason: str = ""
    plan: Plan | None = None
    batch: int = 0
    replicas: int = 0
    admissible_batch: int = 0
    batch_limit: str = ""
    step: StepBreakdown | None = None
    packing: "Packing | None" = None
    routing: "RoutingStats | None" = None
    idle_gpus: int = 0
    #: colocated prefill: seconds each decode step is stalled on average by the prompts admitted in its
    #: place, batch · t_pf / O (docs/model.md "Prefill stalls"); 0 for other workloads
    prefill_stall: float = 0.0

    @property
    def cluster_batch(self) -> int:
        """Concurrent sequences over the whole cluster."""
        return self.batch * self.replicas

    @property
    def tpot(self) -> float:
        """Mean per-token latency a user sees (s): the decode step plus ``prefill_stall``."""
        return self.step.time + self.prefill_stall if self.step else math.inf

    @property
    def tpot_p99(self) -> float:
        """p99 per-token latency (s): the decode step's p99 plus ``prefill_stall``."""
        return self.step.time_p99 + self.prefill_stall if self.step else math.inf

    @property
    def tokens_per_second(self) -> float:
        """Decode tokens/s of the whole cluster."""
        return self.step.tokens_per_second * self.replicas if self.step else 0.0

    @property
    def tokens_per_second_per_user(self) -> float:
        return 1.0 / self.tpot if self.step else 0.0

    def tokens_per_second_per_gpu(self, gpus: int) -> float:
        return self.tokens_per_second / gpus

    def to_dict(self, gpus: int) -> dict[str, Any]:
        d: dict[str, Any] = {
            "model": self.model.id,
            "feasible": self.feasible,
            "reason": self.reason,
            "plan": self.plan.label if self.plan else None,
            "batch_per_replica": self.batch,
            "replicas": self.replicas,
            "cluster_batch": self.cluster_batch,
            "admissible_batch": self.admissible_batch,
            "batch_limit": self.batch_limit,
            "idle_gpus": self.idle_gpus,
            "total_params": self.model.total_params,
            "active_params": self.model.active_params,
        }
        if self.step is not None:
            d.update(
                tpot_mean_s=self.tpot,
                tpot_p50_s=self.step.time_p50 + self.prefill_stall,
                tpot_p99_s=self.tpot_p99,
                prefill_stall_s=self.prefill_stall,
                tokens_per_s=self.tokens_per_second,
                tokens_per_s_per_gpu=self.tokens_per_second_per_gpu(gpus),
                tokens_per_s_per_user=self.tokens_per_second_per_user,
                step_pieces=self.step.as_rows(),
            )
        return d


@dataclass(frozen=True)
class SimulationResult:
    """MoE vs its quality-matched dense twin on one cluster at one context.

    Attributes:
        moe, dense: the two sides.
        ratio: dense tokens/s ÷ MoE tokens/s at the operating point (equal
            latency: both sides under the same p99 TPOT target, 50 ms by
            default), or None when a side is infeasible there.
        qs: the :class:`qsengine.QsResult` record (s, q, qs, verdict, 1/qs).
        verdict: which side serves better ("dense", "moe", "tie",
            "dense-only" when only the dense model fits, "moe-only",
            "neither").
        agrees_with_qs: whether the simulated winner is the one the qs
            inequality predicts (None when not comparable).
        break_even_q: q* at which the ratio is 1 (None if not bracketed).
        inputs: everything the result came from, including the seed record.
        frontier: each side's Pareto frontier of tokens/s per GPU against
            tokens/s per user over plans and batches (a DataFrame, see
            :func:`qsengine.decode.frontier.frontier`); :meth:`ratio_at`
            compares the sides on it at equal latency.
    """

    moe: SideResult
    dense: SideResult
    cluster: Cluster
    context: int
    ratio: float | None
    qs: QsResult
    verdict: str
    agrees_with_qs: bool | None
    break_even_q: float | None
    inputs: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict, repr=False)
    frontier: Any = field(default=None, repr=False, compare=False)

    @property
    def ratio_max_throughput(self) -> float | None:
        """dense ÷ MoE tokens/s with no latency target: each side at the
        largest batch its HBM holds, at whatever TPOT that gives (the sides'
        TPOTs there are ``record["moe_max_tpot_ms"]`` and
        ``record["dense_max_tpot_ms"]``). None when a side does not pack."""
        return _finite_or_none(self.record.get("ratio_max_throughput"))

    def explain(self) -> dict[str, float] | None:
        """The ratio as a product of factors (``headroom``, ``weights``,
        ``attention``, ``communication``, ``other``; see
        :func:`qsengine.decode.why.explain`): their product is
        :attr:`ratio`; a factor above 1 favours the dense side. None when a
        side is infeasible. With prefill costed (``ratio_basis``
        "end-to-end") a last factor ``prefill`` = end-to-end ÷ decode-only
        ratio keeps the product equal to :attr:`ratio`."""
        from qsengine.decode.why import WHY

        if self.ratio is None:
            return None
        out = {k: float(self.record[f"why_{k}"]) for k in WHY}
        if self.record.get("ratio_basis") == "end-to-end":
            out["prefill"] = float(self.record["why_prefill"])
        return out

    def settings_operating_point(self) -> str:
        """Where both sides are operated, in words (fixed batch, latency target or none)."""
        slo, batch = self.inputs.get("slo_tpot"), self.inputs.get("batch")
        return (f"fixed batch {batch:,}" if batch is not None else
                f"p99 TPOT <= {slo * 1e3:.3g} ms" if slo is not None else
                "no latency target (largest batch that fits)")

    def settings_line(self) -> str:
        """The settings this result was computed with, in one line (also the
        last line of :meth:`summary`)."""
        from qsengine import __version__

        inp = self.inputs
        prec = inp.get("precision")
        prec = prec.get("name") if isinstance(prec, dict) else prec
        mb = inp.get("microbatches")
        seed = inp.get("seed")
        seed = seed.get("entropy") if isinstance(seed, dict) else seed
        op = self.settings_operating_point()
        opts = inp.get("options")
        kernels = opts.get("kernels", "calibrated") if isinstance(opts, dict) else "calibrated"
        mc = ("closed form (no Monte Carlo)" if mb == 0 else
              f"Monte Carlo to rtol {inp.get('rtol'):g}" if mb == "auto" else f"Monte Carlo {mb:,} microbatches")
        ctx, out = int(inp.get("context")), int(inp.get("output") or 0)
        laws = (inp.get("context_dist", "fixed"), inp.get("output_dist", "fixed"))
        rec = self.record
        if out and laws != ("fixed", "fixed"):  # length distributions: paged admission at the mean plus a margin
            work = (f"requests of {ctx:,} in ({laws[0]}) / {out:,} out ({laws[1]}) on average (admitted at "
                    f"{rec.get('moe_admit_context', 0):,} tokens per sequence on the MoE, "
                    f"{rec.get('dense_admit_context', 0):,} on the dense side; decode reads "
                    f"{rec.get('read_context', math.nan):,.1f} on average), prefill {inp.get('prefill')}")
        else:
            work = (f"decode only: every sequence at {ctx:,} tokens" if not out else
                    f"requests of {ctx:,} in / {out:,} out (admitted at {ctx + out:,} tokens, decode reads "
                    f"{ctx + (out + 1) / 2:,.1f} on average), prefill {inp.get('prefill')}")
        d = int(inp.get("draft_tokens") or 0)
        spec = (f"speculative decoding: {d} draft token(s) per step at acceptance {float(inp.get('acceptance')):g} "
                "(per accepted token)" if d else "no speculative decoding")
        return (f"settings: precision {prec}, routing {inp.get('routing')}, dense side {inp.get('dense')} "
                f"(q = {float(inp.get('q')):.3f}, twin attention {inp.get('twin_attention')}), {work}, "
                f"operating point: {op}, plan {inp.get('plan')} "
                f"(objective: highest throughput), serving {inp.get('serving', 'qsengine')}, {spec}, {mc}, "
                f"{kernels} kernels, "
                f"seed {seed}, qsengine {__version__}")

    def _repr_html_(self) -> str:
        """A notebook view: both sides as a table, the ratio and its factors,
        the settings, and the frontier and breakdown figure."""
        from qsengine._html import figure, table

        g = self.cluster.num_gpus
        rows = []
        for side, r in (("MoE", self.moe), ("dense", self.dense)):
            if not r.feasible:
                rows.append([side, r.model.id, "infeasible: " + r.reason, "", "", "", "", ""])
                continue
            assert r.step is not None and r.plan is not None
            rows.append([side, r.model.id, r.plan.label, r.cluster_batch, r.tpot * 1e3, r.tpot_p99 * 1e3,
                         r.tokens_per_second, r.tokens_per_second_per_gpu(g)])
        head = ["side", "model", "plan", "batch", "TPOT ms", "p99 ms", "tok/s", "tok/s/GPU"]
        caption = (f"{self.moe.model.id} vs {self.dense.model.id} on {self.cluster.label}, context {self.context:,}: "
                   + (f"ratio dense/MoE {self.ratio:.3f} -> {self.verdict}" if self.ratio is not None
                      else f"verdict {self.verdict}"))
        why = self.explain()
        parts = [table(head, rows, caption=caption)]
        if why is not None:
            parts.append(table(list(why), [[f"{v:.3g}" for v in why.values()]],
                               caption="why: factors that multiply to the ratio (> 1 favours dense)"))
        import html as _h

        parts.append(f"<div>{_h.escape(self.settings_line())}</div>")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(16, 3.8))
        self.plot(axes[:2])
        self.plot_why(axes[2])
        parts.append(figure(fig))
        return "".join(parts)

    def throughput_at(self, tpot: float, side: str, quantile: str = "mean", basis: str | None = None) -> float:
        """Tokens/s per GPU ``side`` ("moe" or "dense") reaches at a TPOT of
        ``tpot`` seconds (``quantile`` "mean" or "p99"), interpolated on its
        frontier; nan if it cannot serve that fast. ``basis``: "decode"
        (decode tokens/s) or "end-to-end" (a request workload's output
        tokens/s including prefill); default: the headline ratio's
        (``record["ratio_basis"]``). With colocated prefill the frontier's
        TPOTs include the prefill stalls on either basis."""
        from qsengine.decode.frontier import throughput_at

        if side not in ("moe", "dense"):
            raise ValueError(f"side={side!r}: must be 'moe' or 'dense'")
        if quantile not in ("mean", "p99"):
            raise ValueError(f"quantile={quantile!r}: must be 'mean' or 'p99'")
        if not (isinstance(tpot, (int, float)) and math.isfinite(tpot) and tpot > 0):
            raise ValueError(f"tpot={tpot!r}: must be a positive number of seconds")
        if basis is None:
            basis = str(self.record.get("ratio_basis") or "decode")
        if basis not in ("decode", "end-to-end"):
            raise ValueError(f"basis={basis!r}: must be 'decode' or 'end-to-end'")
        if basis == "end-to-end" and self.record.get("ratio_basis") != "end-to-end":
            raise ValueError(f"basis={basis!r}: needs a request workload with a prefill mode")
        front = self.frontier[self.frontier["side"] == side]
        value = "request_tokens_per_s_per_gpu" if basis == "end-to-end" else "tokens_per_s_per_gpu"
        return throughput_at(front, float(tpot), "tpot" if quantile == "mean" else "tpot_p99", value)

    def ratio_at(self, tpot: float, quantile: str = "mean", basis: str | None = None) -> float | None:
        """dense ÷ MoE tokens/s per GPU at equal latency: both sides at a TPOT
        of ``tpot`` seconds on their frontiers (interpolated between frontier
        points), on ``basis`` (see :meth:`throughput_at`; default the headline
        ratio's). None when a side cannot serve that fast."""
        d = self.throughput_at(tpot, "dense", quantile, basis)
        m = self.throughput_at(tpot, "moe", quantile, basis)
        if math.isnan(d) or math.isnan(m) or m <= 0:
            return None
        return d / m

    # ------------------------------------------------------------ export
    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON-able values (None where not available)."""
        from qsengine.decode.why import WHY

        g = self.cluster.num_gpus
        why = self.explain()
        return {
            "format": "qsengine.SimulationResult",
            "version": 1,
            "cluster": self.cluster.label,
            "gpus": g,
            "context": self.context,
            "ratio": self.ratio,
            "ratio_max_throughput": self.ratio_max_throughput,
            "verdict": self.verdict,
            "agrees_with_qs": self.agrees_with_qs,
            "break_even_q": self.break_even_q,
            "s": self.qs.s,
            "q": self.qs.q,
            "qs": self.qs.qs,
            "qs_verdict": _verdict_text(self.qs.verdict),
            **{f"why_{k}": (None if why is None else why[k]) for k in WHY},
            "dense_shape": self.record.get("dense_shape"),
            "moe_kv_bytes_per_token": self.record.get("moe_kv_bytes_per_token"),
            "dense_kv_bytes_per_token": self.record.get("dense_kv_bytes_per_token"),
            **{k: _finite_or_none(self.record.get(k)) for k in ("mc_microbatches", "mc_rse_mean", "mc_rse_p99")},
            # whole requests (nan -> None: no prefill costed, or a side infeasible)
            **{k: _finite_or_none(self.record.get(k)) for k in (
                "output", "prefill", "ratio_basis", "ratio_decode", "why_prefill",
                *(f"{side}_{name}" for side in ("moe", "dense")
                  for name in ("prefill_tokens_per_s_per_gpu", "request_tokens_per_s_per_gpu")))},
            "moe": self.moe.to_dict(g),
            "dense": self.dense.to_dict(g),
            "inputs": self.inputs,
        }

    def to_record(self) -> dict[str, Any]:
        """One flat row (scalars only) for tables and sweeps: the pipeline's
        record of this point (columns :data:`qsengine.decode.pipeline.RECORD_COLUMNS`)."""
        return dict(self.record)

    def to_pandas(self):  # -> pandas.DataFrame
        """Step-time breakdown of both sides as a long table."""
        import pandas as pd

        rows = []
        for side, r in (("moe", self.moe), ("dense", self.dense)):
            if r.step is None:
                rows.append({"side": side, "piece": "(infeasible)", "time_s": math.nan, "reason": r.reason})
                continue
            for row in r.step.as_rows():
                rows.append({"side": side, **row})
        return pd.DataFrame(rows)

    def summary(self) -> str:
        """A readable table of both sides and the verdict."""
        rec = self.record
        lines = [
            f"{self.moe.model.name} vs dense twin ({self.dense.model.id}) on {self.cluster.label}, "
            f"context {self.context:,} tokens",
            f"  dense side: {rec.get('dense_shape', '')}; KV cache {rec.get('dense_kv_bytes_per_token', 0):,.0f} B/token "
            f"(MoE {rec.get('moe_kv_bytes_per_token', 0):,.0f} B/token)",
            f"  s = {self.qs.s:.4f}, q = {self.qs.q:.3f}, qs = {self.qs.qs:.3f} -> {_verdict_text(self.qs.verdict)}",
        ]
        hdr = f"  {'':8s}{'plan':>22s}{'batch':>9s}{'TPOT ms':>10s}{'p99 ms':>9s}{'tok/s':>12s}{'tok/s/GPU':>11s}  limit"
        lines.append(hdr)
        for side, r in (("MoE", self.moe), ("dense", self.dense)):
            if not r.feasible:
                lines.append(f"  {side:8s} infeasible: {r.reason}")
                continue
            assert r.step is not None and r.plan is not None
            label = r.plan.label + (f" +{r.idle_gpus} idle" if r.idle_gpus else "")
            lines.append(
                f"  {side:8s}{label:>22s}{r.cluster_batch:>9,d}{r.tpot * 1e3:>10.2f}"
                f"{r.tpot_p99 * 1e3:>9.2f}{r.tokens_per_second:>12,.0f}"
                f"{r.tokens_per_second_per_gpu(self.cluster.num_gpus):>11,.0f}  {r.batch_limit}"
            )
        at = self.settings_operating_point()
        end_to_end = rec.get("ratio_basis") == "end-to-end"
        if end_to_end:
            lines.append(f"  whole requests, {int(rec['context']):,} in / {int(rec['output']):,} out, prefill "
                         f"{rec['prefill']}: prefill tok/s/GPU MoE {rec['moe_prefill_tokens_per_s_per_gpu']:,.0f}, "
                         f"dense {rec['dense_prefill_tokens_per_s_per_gpu']:,.0f}; end-to-end output tok/s/GPU MoE "
                         f"{rec['moe_request_tokens_per_s_per_gpu']:,.0f}, dense "
                         f"{rec['dense_request_tokens_per_s_per_gpu']:,.0f} (tok/s above are decode only"
                         + ("; TPOTs include the prefill stalls)" if rec["prefill"] == "colocated" else ")"))
        if self.ratio is not None:
            basis = f"end-to-end, prefill {rec['prefill']}" if end_to_end else "decode only"
            lines.append(f"  ratio dense/MoE ({basis}) = {self.ratio:.3f} at {at} -> {self.verdict} "
                         f"({'agrees' if self.agrees_with_qs else 'disagrees'} with the qs verdict)"
                         + (f"; decode only {rec['ratio_decode']:.3f}" if end_to_end else ""))
        else:
            lines.append(f"  verdict at {at}: {self.verdict}")
        rmax = self.ratio_max_throughput
        if rmax is not None and self.inputs.get("batch") is None and self.inputs.get("slo_tpot") is not None:
            lines.append(f"  at maximum throughput (largest batch each side's HBM holds): ratio {rmax:.3f}, "
                         f"TPOT MoE {rec['moe_max_tpot_ms']:.1f} ms vs dense {rec['dense_max_tpot_ms']:.1f} ms")
        why = self.explain()
        if why is not None:
            lines.append("  why (factors multiply to the ratio; > 1 favours dense): " + ", ".join(f"{k} x{v:.3g}" for k, v in why.items())
                         )
        if self.break_even_q is not None:
            lines.append(f"  break-even q* = {self.break_even_q:.3f}")
        lines.append("  " + self.settings_line())
        return "\n".join(lines)

    def __repr__(self) -> str:
        r = f"{self.ratio:.3f}" if self.ratio is not None else "n/a"
        return (f"SimulationResult({self.moe.model.id} on {self.cluster.label} @ {self.context}: "
                f"ratio={r}, verdict={self.verdict!r})")

    def plot(self, axes=None):
        """Both sides' latency-throughput frontiers (left) and their step-time
        breakdown at the chosen operating point (right); returns the two Axes."""
        import matplotlib.pyplot as plt

        if axes is None:
            _, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        self.plot_frontier(axes[0])
        self.plot_breakdown(axes[1])
        return axes

    def plot_frontier(self, ax=None):
        """Tokens/s per GPU against tokens/s per user (1/TPOT) for both sides,
        the chosen operating points marked; on the headline ratio's basis
        (end-to-end output tokens/s for a request workload with prefill)."""
        import matplotlib.pyplot as plt

        e2e = self.record.get("ratio_basis") == "end-to-end"
        col = "request_tokens_per_s_per_gpu" if e2e else "tokens_per_s_per_gpu"
        if ax is None:
            _, ax = plt.subplots(figsize=(6, 4.2))
        for side, r, color, label in (("moe", self.moe, "tab:red", f"MoE ({self.moe.model.id})"),
                                      ("dense", self.dense, "tab:blue", f"dense ({self.dense.model.id})")):
            f = self.frontier[self.frontier["side"] == side] if self.frontier is not None else None
            if f is not None and len(f):
                ax.plot(f["tokens_per_s_per_user"], f[col], "-o", ms=3, color=color, label=label)
            if r.feasible:
                y = self.record.get(f"{side}_request_tokens_per_s_per_gpu") if e2e else \
                    r.tokens_per_second_per_gpu(self.cluster.num_gpus)
                ax.plot([r.tokens_per_second_per_user], [y], "*",
                        ms=12, color=color, markeredgecolor="k", label=f"{side} operating point ({r.batch_limit})")
        ax.set_xlabel("tokens/s per user (1 / TPOT)")
        ax.set_ylabel("output tokens/s per GPU" + (" (end to end)" if e2e else ""))
        ax.set_title(f"{self.moe.model.id} on {self.cluster.label}, context {self.context:,}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        return ax

    def plot_why(self, ax=None):
        """The why factors (:meth:`explain`) as bars on a log axis, their
        product (the ratio) as the last bar; None-safe: an infeasible side
        gives an empty axis with its reason (matplotlib Axes)."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3.6))
        why = self.explain()
        if why is None or self.ratio is None:
            ax.text(0.5, 0.5, f"no ratio: {self.verdict}", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            return ax
        names = [*why, "ratio"]
        vals = [*why.values(), self.ratio]
        colors = ["tab:blue" if v >= 1 else "tab:red" for v in vals[:-1]] + ["k"]
        ax.barh(names[::-1], [math.log10(v) for v in vals][::-1], color=colors[::-1])
        ax.axvline(0.0, color="k", lw=0.8)
        lim = max(0.1, max(abs(math.log10(v)) for v in vals) * 1.2)
        ax.set_xlim(-lim, lim)
        ticks = [t for t in (0.1, 0.2, 0.33, 0.5, 0.67, 0.8, 1, 1.25, 1.5, 2, 3, 5, 10) if abs(math.log10(t)) <= lim]
        ax.set_xticks([math.log10(t) for t in ticks], [f"{t:g}x" for t in ticks])
        ax.set_xlabel("factor of dense / MoE (right: favours the dense twin)")
        ax.set_title(f"why: {self.settings_operating_point()}", fontsize=9)
        return ax

    def plot_breakdown(self, ax=None):
        """Bar chart of the step-time breakdown of both sides (matplotlib Axes)."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(7, 4))
        names: list[str] = []
        for r in (self.moe, self.dense):
            if r.step:
                for p in r.step.pieces:
                    if p.name not in names:
                        names.append(p.name)
        bottoms = np.zeros(2)
        cmap = plt.get_cmap("tab10")
        for i, name in enumerate(names):
            vals = []
            for r in (self.moe, self.dense):
                t = 0.0
                if r.step:
                    t = sum(p.time for p in r.step.pieces if p.name == name) * 1e3
                vals.append(t)
            ax.bar(["MoE", "dense twin"], vals, bottom=bottoms, label=name, color=cmap(i % 10))
            bottoms += np.array(vals)
        ax.set_ylabel("time per decode step (ms)")
        ax.set_title(f"{self.moe.model.id} on {self.cluster.label}, context {self.context}")
        ax.legend(fontsize=7)
        return ax


def _finite_or_none(v: Any) -> Any:
    """None for a missing or non-finite number (the dict form has no NaN)."""
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


def _verdict_text(v: Any) -> str:
    return str(getattr(v, "value", v))
