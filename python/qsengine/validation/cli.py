"""``qsengine validate``: the current model against published measurements.

Each row of ``measurements.csv`` (model, accelerator, plan, precision, request
lengths or context, concurrency, engine, metric, value, source URL and date)
is predicted and compared; the command prints predicted against measured per
row, the MAPE and the MoE-vs-dense bias (median predicted/measured of MoE rows
divided by that of dense rows) overall and per source, and writes a
predicted-vs-measured figure. Nothing is fitted to these rows: the kernel
fits come from measured kernel tables (``docs/calibration.md``), so every row
is a held-out row.

Metrics (:data:`METRICS`), each compared as a throughput so that
"predicted/measured > 1" means qsengine predicts more tokens per second than
was measured:

* ``mean_tpot_ms``: an online benchmark at a fixed concurrency (one replica):
  the mean time per output token. Measured throughput = concurrency / TPOT;
  predicted = concurrency / the decode step time at that batch and ``context``
  (:func:`qsengine.decode.step.decode_step`).
* ``output_tps_per_gpu``: an offline maximum-throughput benchmark (every
  request queued at once, e.g. ``trtllm-bench throughput``): output tokens/s
  per GPU, prefill on the same GPUs. Predicted by the pipeline
  (:func:`qsengine.simulate`) at the row's plan with the request workload
  ``context=input_len, output=output_len, prefill="colocated"``, no TPOT
  target (the HBM-maximum batch): the side's end-to-end
  ``request_tokens_per_s_per_gpu``.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qsengine.specs import Plan

__all__ = ["ValidationRow", "ValidationReport", "load_measurements", "validate", "add_parser", "MEASUREMENTS",
           "METRICS"]

MEASUREMENTS = Path(__file__).resolve().parent / "measurements.csv"
REQUIRED = ("id", "kind", "model", "accelerator", "gpus", "tp", "pp", "dp", "ep", "etp", "attn_dp", "precision",
            "input_len", "output_len", "context", "concurrency", "engine", "engine_version", "metric", "value",
            "source_url", "source_date", "notes")
#: Each metric and the fields a row of it must give as numbers > 0 (see the module docstring).
METRICS: dict[str, tuple[str, ...]] = {
    "mean_tpot_ms": ("value", "concurrency", "context"),
    "output_tps_per_gpu": ("value", "input_len", "output_len"),
}
#: The MoE model whose comparison point carries a dense row's prediction (only its dense side is read).
_CARRIER_MOE = "qwen3-30b-a3b"
#: Largest measurements file read (the shipped one is a few kB).
MAX_BYTES = 16 << 20


@dataclass(frozen=True)
class ValidationRow:
    """One measured row and its prediction, as throughputs in tokens/s (of one
    replica for ``mean_tpot_ms`` rows, per GPU for ``output_tps_per_gpu``)."""

    id: str
    kind: str
    measured_tps: float
    predicted_tps: float
    metric: str = "mean_tpot_ms"
    source: str = ""

    @property
    def ratio(self) -> float:
        """predicted / measured throughput."""
        return self.predicted_tps / self.measured_tps


@dataclass(frozen=True)
class SourceSummary:
    """The summary of the rows of one source: count, MAPE and MoE-vs-dense bias
    (nan where the source has rows of one kind only)."""

    rows: int
    mape: float
    moe_dense_bias: float


@dataclass(frozen=True)
class ValidationReport:
    """All rows with the summary statistics.

    Attributes:
        rows: per-row results.
        mape: mean |predicted - measured| / measured over all rows.
        moe_dense_bias: median ratio of MoE rows / median ratio of dense rows
            (nan when one kind is absent).
        by_source: the same per source (the ``owner/repository`` of the row's
            source URL), in first-seen order: rows of one source share their
            engine and method, so their bias is not confounded by those.
    """

    rows: tuple[ValidationRow, ...]
    mape: float
    moe_dense_bias: float
    by_source: dict[str, SourceSummary] = field(default_factory=dict)


def _read(path: str | Path) -> str:
    p = Path(path)
    try:
        if not p.is_file():
            raise ValueError(f"measurements={str(path)!r}: not a regular file")
        if p.stat().st_size > MAX_BYTES:
            raise ValueError(f"measurements={str(path)!r}: larger than {MAX_BYTES} bytes")
        return p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"measurements={str(path)!r}: cannot read ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"measurements={str(path)!r}: not UTF-8 text") from exc


def _positive(r: dict[str, str], field: str) -> float:
    try:
        v = float(r[field])
    except (TypeError, ValueError):
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"row {r.get('id')!r}: field {field!r} = {r.get(field)!r}: must be a finite number > 0")
    return v


def _integer(r: dict[str, str], field: str) -> int:
    v = _positive(r, field)
    if v != int(v):
        raise ValueError(f"row {r['id']!r}: field {field!r} = {r[field]!r}: must be an integer")
    return int(v)


def load_measurements(path: str | Path = MEASUREMENTS) -> list[dict[str, str]]:
    """Rows of a measurements CSV, checked for the required columns and values
    (a ``ValueError`` naming the file, row, field and rule otherwise)."""
    try:
        rows = list(csv.DictReader(io.StringIO(_read(path))))
    except csv.Error as exc:
        raise ValueError(f"measurements={str(path)!r}: not a CSV file ({exc})") from exc
    if not rows:
        raise ValueError(f"measurements={str(path)!r}: no rows")
    missing = [c for c in REQUIRED if c not in rows[0]]
    if missing:
        raise ValueError(f"measurements={str(path)!r}: missing columns {missing}")
    for r in rows:
        for c in REQUIRED:
            if not isinstance(r.get(c), str):
                raise ValueError(f"row {r.get('id')!r}: field {c!r} is missing")
        if r["metric"] not in METRICS:
            raise ValueError(f"row {r['id']!r}: field 'metric' = {r['metric']!r}: must be one of {list(METRICS)}")
        if r["kind"] not in ("dense", "moe"):
            raise ValueError(f"row {r['id']!r}: field 'kind' = {r['kind']!r}: must be 'dense' or 'moe'")
        for f in METRICS[r["metric"]]:
            _positive(r, f)
        for f in ("concurrency", "input_len", "output_len"):
            if f in METRICS[r["metric"]]:
                _integer(r, f)
        if r.get("requests"):  # optional: the number of requests of a finite offline benchmark
            if r["metric"] != "output_tps_per_gpu":
                raise ValueError(f"row {r['id']!r}: field 'requests' = {r['requests']!r}: only for metric "
                                 "'output_tps_per_gpu' (a finite offline benchmark)")
            _integer(r, "requests")
        if not r["source_url"].startswith("https://"):
            raise ValueError(f"row {r['id']!r}: field 'source_url' = {r['source_url']!r}: must be an https URL")
    return rows


def _plan(r: dict[str, str]) -> Plan:
    try:
        ints = {f: int(r[f]) for f in ("tp", "pp", "dp", "ep", "attn_dp")}
        etp = int(r["etp"]) if r["etp"] else None
    except ValueError as exc:
        raise ValueError(f"row {r['id']!r}: plan fields tp/pp/dp/ep/etp/attn_dp must be integers ({exc})") from exc
    return Plan(tp=ints["tp"], pp=ints["pp"], dp=ints["dp"], ep=ints["ep"], etp=etp, attn_dp=bool(ints["attn_dp"]))


def _predict(r: dict[str, str], kernels: str = "calibrated") -> float:
    """Predicted throughput of a measurement row, in the units of
    :class:`ValidationRow` (``kernels``: :attr:`qsengine.StepOptions.kernels`)."""
    from qsengine.specs import as_precision, load_accelerator, load_model
    from qsengine.decode.step import StepOptions, decode_step

    plan = _plan(r)
    options = StepOptions(kernels=kernels)  # type: ignore[arg-type]
    if r["metric"] == "mean_tpot_ms":
        batch = int(float(r["concurrency"]))
        step = decode_step(load_model(r["model"]), as_precision(r["precision"]), load_accelerator(r["accelerator"]),
                           plan, batch, float(r["context"]), options=options)
        return batch / step.time
    # output_tps_per_gpu: the pipeline at the row's plan, HBM-maximum batch, colocated prefill
    import warnings

    from qsengine import simulate
    from qsengine.decode import ContextWarning

    moe = r["kind"] == "moe"
    side = "moe" if moe else "dense"

    def run(batch: int | None) -> dict:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ContextWarning)  # the engine ran it: past max_context is the row's fact
            return simulate(model=r["model"] if moe else _CARRIER_MOE, dense=None if moe else r["model"],
                            cluster=f"{int(r['gpus'])}x{r['accelerator']}", context=int(r["input_len"]),
                            output=int(r["output_len"]), prefill="colocated", plan=plan, precision=r["precision"],
                            microbatches=0, slo_tpot=None, break_even=False, options=options,
                            batch=batch).to_record()

    rec = run(None)
    if not rec[f"{side}_feasible"]:
        return 0.0
    steady = float(rec[f"{side}_request_tokens_per_s_per_gpu"])
    n_req = r.get("requests") or ""
    if not n_req:
        return steady
    # A finite offline benchmark of N equal requests: the engine runs them in waves of its
    # HBM-maximum batch B (all start and finish together), the last wave with the remainder;
    # the measured figure is N·O over the whole run: N / sum_w (b_w / R(b_w)) per GPU, where
    # R(b) is the end-to-end output tokens/s per GPU at a fixed batch b (prefill included).
    big = int(rec[f"{side}_batch"]) * Plan.from_label(rec[f"{side}_plan"]).dp  # per replica -> cluster
    n = _integer(r, "requests")
    waves = [big] * (n // big) + ([n % big] if n % big else [])
    rate = {b: (steady if b == big else float(run(b)[f"{side}_request_tokens_per_s_per_gpu"])) for b in set(waves)}
    return n / sum(b / rate[b] for b in waves)


def _measured(r: dict[str, str]) -> float:
    if r["metric"] == "mean_tpot_ms":
        return int(float(r["concurrency"])) / (float(r["value"]) * 1e-3)
    return float(r["value"])


def _source(url: str) -> str:
    """``owner/repository`` of a GitHub URL, else the host."""
    parts = url.split("/")
    return "/".join(parts[3:5]) if len(parts) > 4 and parts[2] == "github.com" else parts[2]


def _summary(rows: list[ValidationRow]) -> tuple[float, float]:
    ratio = np.array([x.ratio for x in rows])
    kinds = np.array([x.kind for x in rows])
    mape = float(np.mean(np.abs(ratio - 1.0)))
    bias = (float(np.median(ratio[kinds == "moe"]) / np.median(ratio[kinds == "dense"]))
            if (kinds == "moe").any() and (kinds == "dense").any() else float("nan"))
    return mape, bias


def validate(path: str | Path = MEASUREMENTS, kernels: str = "calibrated") -> ValidationReport:
    """Predict every row of ``path`` with the current model (``kernels``:
    ``"calibrated"`` (default) or ``"roofline"``, :attr:`qsengine.StepOptions.kernels`)."""
    rows = [ValidationRow(r["id"], r["kind"], _measured(r), _predict(r, kernels), r["metric"], _source(r["source_url"]))
            for r in load_measurements(path)]
    mape, bias = _summary(rows)
    by_source = {}
    for src in dict.fromkeys(x.source for x in rows):
        sub = [x for x in rows if x.source == src]
        by_source[src] = SourceSummary(len(sub), *_summary(sub))
    return ValidationReport(tuple(rows), mape, bias, by_source)


def write_figure(rep: ValidationReport, path: str | Path) -> None:
    """Log-log predicted vs measured throughput: dense and MoE marked apart,
    one colour per source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for s, src in enumerate(rep.by_source):
        for kind, mk in (("dense", "o"), ("moe", "^")):
            sel = [r for r in rep.rows if r.kind == kind and r.source == src]
            if sel:
                ax.scatter([r.measured_tps for r in sel], [max(r.predicted_tps, 1e-3) for r in sel], marker=mk,
                           color=colours[s % len(colours)], alpha=0.8, label=f"{src}, {kind}")
    lo = min(min(r.measured_tps, max(r.predicted_tps, 1e-3)) for r in rep.rows) / 1.5
    hi = max(max(r.measured_tps, r.predicted_tps) for r in rep.rows) * 1.5
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8, label="predicted = measured")
    for f in (0.75, 1.25):
        ax.plot([lo, hi], [lo * f, hi * f], "k:", lw=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured tokens/s (replica: mean_tpot_ms rows; per GPU: output_tps_per_gpu rows)")
    ax.set_ylabel("predicted tokens/s (same units)")
    ax.set_title(f"{len(rep.rows)} rows: MAPE {rep.mape:.2f}, MoE/dense bias {rep.moe_dense_bias:.2f}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise ValueError(f"figure={str(path)!r}: cannot write ({exc.strerror or exc})") from exc
    finally:
        plt.close(fig)


def _run(args: argparse.Namespace) -> int:
    rep = validate(args.measurements, args.kernels)
    print(f"{'id':52s} {'kind':5s} {'metric':18s} {'measured':>10s} {'predicted':>10s} {'pred/meas':>9s}")
    for r in rep.rows:
        print(f"{r.id:52s} {r.kind:5s} {r.metric:18s} {r.measured_tps:10.1f} {r.predicted_tps:10.1f} {r.ratio:9.2f}")
    for src, sm in rep.by_source.items():
        print(f"source {src}: rows {sm.rows}  MAPE {sm.mape:.3f}  MoE-vs-dense bias {sm.moe_dense_bias:.3f}")
    print(f"rows: {len(rep.rows)}  MAPE: {rep.mape:.3f}  MoE-vs-dense bias: {rep.moe_dense_bias:.3f}")
    if args.figure:
        write_figure(rep, args.figure)
        print(f"figure: {args.figure}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``qsengine validate``."""
    p = sub.add_parser("validate", help="compare the step model with published decode measurements")
    p.add_argument("--measurements", type=Path, default=MEASUREMENTS, help="measurements CSV (default: shipped)")
    p.add_argument("--figure", type=Path, default=Path("validation.png"), help="predicted-vs-measured PNG path")
    p.add_argument("--kernels", choices=("calibrated", "roofline"), default="calibrated",
                   help="step model kernels (StepOptions.kernels; default: calibrated)")
    p.set_defaults(handler=_run)
