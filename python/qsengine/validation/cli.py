"""``qsengine validate``: the current step model against published decode measurements.

Each row of ``measurements.csv`` (model, accelerator, plan, precision,
context, concurrency, engine, metric, value, source URL and date) is predicted
with :func:`qsengine.decode.step.decode_step` at the measured concurrency (the batch
of one replica) and context; the command prints predicted against measured
per row, the MAPE, the MoE-vs-dense bias (median predicted/measured of MoE
rows divided by that of dense rows) and writes a predicted-vs-measured figure.
Nothing is fitted to these rows.

Metrics: ``mean_tpot_ms`` (time per output token of one replica, i.e. the
decode step time at that batch). The comparison is on *throughput*
(``concurrency / TPOT``) so "predicted/measured > 1" means qsengine predicts
more tokens per second than was measured.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["ValidationRow", "ValidationReport", "load_measurements", "validate", "add_parser", "MEASUREMENTS"]

MEASUREMENTS = Path(__file__).resolve().parent / "measurements.csv"
REQUIRED = ("id", "kind", "model", "accelerator", "gpus", "tp", "pp", "dp", "ep", "etp", "attn_dp", "precision",
            "input_len", "output_len", "context", "concurrency", "engine", "engine_version", "metric", "value",
            "source_url", "source_date", "notes")
METRICS = ("mean_tpot_ms",)
#: Largest measurements file read (the shipped one is a few kB).
MAX_BYTES = 16 << 20


@dataclass(frozen=True)
class ValidationRow:
    """One measured row and its prediction (throughput in tokens/s of one replica)."""

    id: str
    kind: str
    measured_tps: float
    predicted_tps: float

    @property
    def ratio(self) -> float:
        """predicted / measured throughput."""
        return self.predicted_tps / self.measured_tps


@dataclass(frozen=True)
class ValidationReport:
    """All rows with the summary statistics.

    Attributes:
        rows: per-row results.
        mape: mean |predicted - measured| / measured over all rows.
        moe_dense_bias: median ratio of MoE rows / median ratio of dense rows
            (nan when one kind is absent).
    """

    rows: tuple[ValidationRow, ...]
    mape: float
    moe_dense_bias: float


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
        for f in ("value", "concurrency", "context"):
            _positive(r, f)
        if float(r["concurrency"]) != int(float(r["concurrency"])):
            raise ValueError(f"row {r['id']!r}: field 'concurrency' = {r['concurrency']!r}: must be an integer")
        if not r["source_url"].startswith("https://"):
            raise ValueError(f"row {r['id']!r}: field 'source_url' = {r['source_url']!r}: must be an https URL")
    return rows


def _predict(r: dict[str, str], kernels: str = "calibrated") -> float:
    """Predicted decode tokens/s of one replica for a measurement row
    (``kernels``: :attr:`qsengine.StepOptions.kernels`)."""
    from qsengine.specs import Plan, as_precision, load_accelerator, load_model
    from qsengine.decode.step import StepOptions, decode_step

    try:
        ints = {f: int(r[f]) for f in ("tp", "pp", "dp", "ep", "attn_dp")}
        etp = int(r["etp"]) if r["etp"] else None
    except ValueError as exc:
        raise ValueError(f"row {r['id']!r}: plan fields tp/pp/dp/ep/etp/attn_dp must be integers ({exc})") from exc
    plan = Plan(tp=ints["tp"], pp=ints["pp"], dp=ints["dp"], ep=ints["ep"], etp=etp, attn_dp=bool(ints["attn_dp"]))
    batch = int(float(r["concurrency"]))
    step = decode_step(load_model(r["model"]), as_precision(r["precision"]), load_accelerator(r["accelerator"]),
                       plan, batch, float(r["context"]), options=StepOptions(kernels=kernels))  # type: ignore[arg-type]
    return batch / step.time


def validate(path: str | Path = MEASUREMENTS, kernels: str = "calibrated") -> ValidationReport:
    """Predict every row of ``path`` with the current step model (``kernels``:
    ``"calibrated"`` (default) or ``"roofline"``, :attr:`qsengine.StepOptions.kernels`)."""
    rows = []
    for r in load_measurements(path):
        measured = int(float(r["concurrency"])) / (float(r["value"]) * 1e-3)
        rows.append(ValidationRow(r["id"], r["kind"], measured, _predict(r, kernels)))
    ratio = np.array([x.ratio for x in rows])
    kinds = np.array([x.kind for x in rows])
    mape = float(np.mean(np.abs(ratio - 1.0)))
    bias = (float(np.median(ratio[kinds == "moe"]) / np.median(ratio[kinds == "dense"]))
            if (kinds == "moe").any() and (kinds == "dense").any() else float("nan"))
    return ValidationReport(tuple(rows), mape, bias)


def write_figure(rep: ValidationReport, path: str | Path) -> None:
    """Log-log predicted vs measured throughput, dense and MoE marked apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for kind, mk in (("dense", "o"), ("moe", "^")):
        xs = [r.measured_tps for r in rep.rows if r.kind == kind]
        ys = [r.predicted_tps for r in rep.rows if r.kind == kind]
        ax.scatter(xs, ys, marker=mk, label=kind, alpha=0.8)
    lo = min(min(r.measured_tps, r.predicted_tps) for r in rep.rows) / 1.5
    hi = max(max(r.measured_tps, r.predicted_tps) for r in rep.rows) * 1.5
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8, label="predicted = measured")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured decode tokens/s (replica)")
    ax.set_ylabel("predicted decode tokens/s (replica)")
    ax.set_title(f"MAPE {rep.mape:.2f}, MoE/dense bias {rep.moe_dense_bias:.2f}")
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise ValueError(f"figure={str(path)!r}: cannot write ({exc.strerror or exc})") from exc
    finally:
        plt.close(fig)


def _run(args: argparse.Namespace) -> int:
    rep = validate(args.measurements, args.kernels)
    print(f"{'id':44s} {'kind':5s} {'measured tok/s':>14s} {'predicted':>10s} {'pred/meas':>9s}")
    for r in rep.rows:
        print(f"{r.id:44s} {r.kind:5s} {r.measured_tps:14.1f} {r.predicted_tps:10.1f} {r.ratio:9.2f}")
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
