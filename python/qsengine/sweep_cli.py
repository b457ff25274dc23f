"""``qsengine sweep`` and ``qsengine report``: sweeps from a TOML file, and the
standard figures from a results directory.

SWEEP.toml::

    [sweep]                 # optional
    seed = 20261128         # sweep seed (recorded; reused on resume)
    chunk_size = 64         # points per task (results do not depend on it)

    [grid]                  # lists are swept as a cartesian product
    model = ["qwen3-30b-a3b", "mixtral-8x7b"]
    cluster = ["8xh100", "8xh200"]
    context = [4096, 32768]
    microbatches = [0]

Dask: ``--workers N`` starts a local cluster of N single-threaded worker
processes bound to 127.0.0.1; ``--scheduler ADDRESS`` connects to a running
scheduler (``tls://`` addresses with ``--tls-ca-file/--tls-cert/--tls-key``).
"""

from __future__ import annotations

import contextlib
import io
import math
import shlex
import sys
import tomllib
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "load_sweep_toml", "report"]

_SWEEP_KEYS = ("seed", "chunk_size", "retries")
MAX_TOML_BYTES = 4 * 1024 * 1024


def load_sweep_toml(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(grid, options)`` from a sweep TOML file (validated by :func:`qsengine.sweep`)."""
    from qsengine.specs._validate import did_you_mean
    from qsengine.specs.loaders import _read

    p = Path(path)
    text = _read(p, str(p), kind="sweep files", limit=MAX_TOML_BYTES)  # bounded, regular file, UTF-8
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{p}: not valid TOML: {exc}") from None
    except RecursionError:
        raise ValueError(f"{p}: not valid TOML: nested too deeply") from None
    for k in doc:
        if k not in ("grid", "sweep"):
            raise ValueError(f"{p}: unknown table [{k}]{did_you_mean(k, ['grid', 'sweep'])}; "
                             "expected [grid] and optionally [sweep]")
    grid = doc.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise ValueError(f"{p}: needs a non-empty [grid] table of lists (model, cluster, context, ...)")
    opts = doc.get("sweep", {})
    if not isinstance(opts, dict):
        raise ValueError(f"{p}: [sweep] must be a table")
    for k in opts:
        if k not in _SWEEP_KEYS:
            raise ValueError(f"{p}: [sweep] unknown key {k!r}{did_you_mean(k, _SWEEP_KEYS)}; "
                             f"known: {', '.join(_SWEEP_KEYS)}")
    return grid, opts


def write_results(df, out: Path, metadata: dict[str, str] | None = None) -> list[Path]:
    """``results.parquet`` (versioned schema metadata, plus ``metadata``) and
    ``results.csv`` in ``out``, each written atomically."""
    import pyarrow as pa

    from qsengine import __version__, code_fingerprint
    from qsengine.sweeps.checkpoint import atomic_write_bytes, results_metadata, table_to_parquet_bytes

    pq_path, csv_path = out / "results.parquet", out / "results.csv"
    table = pa.Table.from_pandas(df, preserve_index=False)
    extra = {k.encode(): v.encode() for k, v in (metadata or {}).items()}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           **results_metadata(__version__, code_fingerprint()), **extra})
    atomic_write_bytes(pq_path, table_to_parquet_bytes(table))
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    atomic_write_bytes(csv_path, buf.getvalue().encode("utf-8"))
    return [pq_path, csv_path]


def add_executor_args(p) -> None:
    """``--scheduler`` / ``--workers`` and the TLS files (``sweep`` and ``study``)."""
    where = p.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="ADDRESS", help="a running Dask scheduler (tcp://host:8786)")
    where.add_argument("--workers", type=int, metavar="N",
                       help="start a local Dask cluster of N single-threaded worker processes on 127.0.0.1")
    p.add_argument("--tls-ca-file", default=None, help="CA certificate for a tls:// scheduler")
    p.add_argument("--tls-cert", default=None, help="client certificate for a tls:// scheduler")
    p.add_argument("--tls-key", default=None, help="client private key for a tls:// scheduler")


@contextlib.contextmanager
def executor_from_args(args):
    """The executor ``--workers`` / ``--scheduler`` ask for (None: in-process).

    A local Dask cluster's processes are started with SIGINT ignored (the
    disposition is inherited by the processes it spawns), so a Ctrl-C reaches
    only this process, which stops the sweep, keeps the checkpoint and says
    how to resume; no worker prints a traceback. Dask's logging is silenced
    while an interrupted cluster shuts down."""
    import logging
    import signal
    import warnings

    tls = (args.tls_ca_file, args.tls_cert, args.tls_key)
    if any(tls) and not all(tls):
        raise ValueError("--tls-ca-file, --tls-cert and --tls-key go together")
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers {args.workers}: must be >= 1")
    cluster = client = None
    try:
        if args.workers is not None:
            from distributed import Client, LocalCluster

            old = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                with warnings.catch_warnings():
                    # its HTTP server moves to a free port when 8787 is taken (another cluster): not news
                    warnings.filterwarnings("ignore", message=r"Port \d+ is already in use", category=UserWarning)
                    # bound to localhost: a laptop sweep never listens on the network;
                    # silence_logs: the workers' warnings (e.g. tasks cancelled by a Ctrl-C) stay quiet, errors show
                    cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                                           host="127.0.0.1", dashboard_address=None, silence_logs=logging.ERROR)
            finally:
                signal.signal(signal.SIGINT, old)
            client = Client(cluster)
        elif args.scheduler is not None:
            from distributed import Client

            security = None
            if all(tls):
                from distributed.security import Security

                security = Security(tls_ca_file=args.tls_ca_file, tls_client_cert=args.tls_cert,
                                    tls_client_key=args.tls_key, require_encryption=True)
            client = Client(args.scheduler, security=security)
        yield client
    except KeyboardInterrupt:
        logging.getLogger("distributed").setLevel(logging.CRITICAL)
        raise
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()


def interrupted_message(checkpoint: Path, total: int, command: str) -> str:
    """What a Ctrl-C kept, and the command that resumes."""
    kept = 0
    try:
        from qsengine.sweeps.checkpoint import Checkpoint

        ck = Checkpoint(checkpoint)
        if ck.chunk_files():
            kept = sum(t.num_rows for t in ck.scan(None, ["point_id"]).tables)
    except Exception:  # noqa: BLE001 - the message itself must not fail
        pass
    return (f"qsengine: interrupted; {kept:,} of {total:,} points are kept in {checkpoint}/\n"
            f"resume with: {command}")


def _grid_size(grid: Any) -> int:
    if isinstance(grid, dict):
        return math.prod(len(v) if isinstance(v, list) else 1 for v in grid.values())
    return len(grid)


def _estimate(grid: Any, seed: Any) -> tuple[int, float] | None:
    """(Monte Carlo points, seconds one of them took here) or None without any:
    the first Monte Carlo point of the grid is run once and timed."""
    import time

    from qsengine.decode.simulate import simulate

    if not isinstance(grid, dict):
        return None
    axes = {k: (v if isinstance(v, list) else [v]) for k, v in grid.items()}
    mb = axes.get("microbatches", [0])
    mc = _grid_size(grid) // len(mb) * sum(1 for x in mb if x != 0)
    if mc == 0:
        return None
    first = {k: v[0] for k, v in axes.items()}
    first["microbatches"] = next(x for x in mb if x != 0)
    t0 = time.perf_counter()
    simulate(**first, seed=seed if isinstance(seed, int) else None)
    return mc, time.perf_counter() - t0


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else (f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h")


def _run_sweep_cli(args) -> int:
    from qsengine.sweeps import sweep

    grid, opts = load_sweep_toml(args.file)
    seed = args.seed if args.seed is not None else opts.get("seed")
    chunk = args.chunk_size if args.chunk_size is not None else opts.get("chunk_size")
    retries = opts.get("retries", 3)
    out = Path(args.out)
    if "microbatches" not in grid:
        # a file without microbatches means the closed form, never a silent Monte Carlo per point
        grid = {**grid, "microbatches": [0]}
        print('microbatches not given: closed form (microbatches = 0); add microbatches = ["auto"] to [grid] '
              "for the routing Monte Carlo", file=sys.stderr)
    est = _estimate(grid, seed)
    if est is not None:
        mc, one = est
        workers = args.workers or 1
        print(f"{mc:,} Monte Carlo points; one took {one:.1f} s here, so about {_duration(mc * one / workers)}"
              f"{f' on {workers} workers' if workers > 1 else ''} before any resume (closed-form points add "
              "little)", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with executor_from_args(args) as executor:
            df = sweep(grid, executor=executor, checkpoint=out, resume=not args.no_resume,
                       progress=not args.no_progress and sys.stderr.isatty(), seed=seed, chunk_size=chunk,
                       retries=retries)
    except KeyboardInterrupt:
        argv = getattr(args, "_argv", None)
        cmd = ("qsengine " + " ".join(shlex.quote(a) for a in argv if a != "--no-resume")) if argv \
            else f"qsengine sweep {args.file} --out {out}"
        print(interrupted_message(out, _grid_size(grid), cmd), file=sys.stderr)
        return 130
    paths = write_results(df, out)
    info = df.attrs["sweep"]
    print(f"{len(df)} points ({info['computed_points']} computed, {info['resumed_points']} from the checkpoint) "
          f"in {info['elapsed_s']:.1f} s; seed entropy {info['seed']['entropy']}")
    for p in paths:
        print(p)
    return 0


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def _col(df, name: str):
    if name in df.columns:
        return name
    if f"in_{name}" in df.columns:
        return f"in_{name}"
    return None


def _cluster_name(label: Any) -> str:
    """Canonical display name (8×H100) of a cluster label, or the label."""
    try:
        from qsengine.study import cluster_display

        return cluster_display(str(label))
    except (ValueError, TypeError):
        return str(label)


def _aggregated(df, keep: tuple[str, ...]) -> str:
    """The swept inputs (other than ``keep``) with more than one value, as
    text: what a per-(model, cluster, context) figure takes the median over."""
    parts = []
    for col in df.columns:
        if not col.startswith("in_") or col in keep:
            continue
        n = df[col].astype(str).nunique()
        if n > 1:
            parts.append(f"{col[3:]} ({n} values)")
    return ", ".join(parts)


def report(path: str | Path, out: str | Path | None = None) -> list[Path]:
    """Draw the standard figures of a sweep's results; returns the PNG paths.

    * ``ratio_heatmap.png``: dense/MoE throughput ratio over context × cluster,
      one panel per model (the median over any other swept input, which
      the figure then states in its title; cells where only one side fits
      are labelled);
    * ``break_even_q.png``: break-even q* vs context, one line per cluster;
    * ``throughput.png``: tokens/s per GPU and admitted batch of the MoE and
      its dense twin vs context (the fragmentation + HBM-headroom penalties).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    from qsengine.sweeps.checkpoint import read_results_table
    from qsengine.sweeps import load_results

    src = Path(path)
    results = src if src.is_file() else src / "results.parquet"
    # load_results reads any parquet; the versioned reader refuses other formats
    df = read_results_table(results).to_pandas() if results.is_file() else load_results(src)
    dest = Path(out) if out is not None else (src if src.is_dir() else src.parent)
    dest.mkdir(parents=True, exist_ok=True)
    cm, cc, ct = _col(df, "model"), _col(df, "cluster"), _col(df, "context")
    if not (cm and cc and ct) or len(df) == 0:
        raise ValueError(f"{src}: results need model, cluster and context columns (got {list(df.columns)[:8]}...)")
    models = list(dict.fromkeys(df[cm]))
    written: list[Path] = []
    df = df.copy()
    df[cc] = df[cc].map({c: _cluster_name(c) for c in dict.fromkeys(df[cc])})
    agg = _aggregated(df, ("in_model", "in_cluster", "in_context", cm, cc, ct))
    note = f"median over {agg}" if agg else ""
    n_ctx = len(set(df[ct]))
    n_cl = len(set(df[cc]))

    def panels(n: int, w: float = 5.5, h: float = 3.8, wide: bool = False):
        ncol = 1 if wide else min(2, n)
        nrow = math.ceil(n / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(w * ncol, h * nrow), squeeze=False)
        for ax in list(axes.flat)[n:]:
            ax.set_visible(False)
        return fig, list(axes.flat)

    def save(fig, name: str, legend_right: bool = False) -> None:
        p = dest / name
        if note:
            fig.suptitle(f"each point: the {note} (swept)", fontsize=9)
        fig.tight_layout(rect=(0, 0, 0.82 if legend_right else 1, 0.96 if note else 1))
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)

    def context_ticks(ax, contexts) -> None:
        from qsengine.study import format_tokens

        ticks = sorted(set(int(t) for t in contexts))
        step = max(1, math.ceil(len(ticks) / 8))
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
        ax.set_xticks(ticks[::step], [format_tokens(t) for t in ticks[::step]],
                      rotation=30 if len(ticks[::step]) > 5 else 0)

    if "ratio" in df.columns:
        fig, axes = panels(len(models), w=max(5.5, 1.6 + 0.7 * n_ctx), h=max(3.8, 1.4 + 0.38 * n_cl),
                           wide=n_ctx > 8)
        for ax, m in zip(axes, models):
            sub = df[df[cm] == m]
            clusters = list(dict.fromkeys(sub[cc]))
            contexts = sorted(set(int(x) for x in sub[ct]))
            grid = np.full((len(clusters), len(contexts)), np.nan)
            labels = [["" for _ in contexts] for _ in clusters]
            for (c, t), g in sub.groupby([cc, ct], sort=False):
                i, j = clusters.index(c), contexts.index(int(t))
                r = g["ratio"].astype(float)
                grid[i, j] = float(np.nanmedian(r)) if r.notna().any() else np.nan
                if np.isnan(grid[i, j]) and "verdict" in g.columns:
                    labels[i][j] = str(g["verdict"].iloc[0])
                elif not np.isnan(grid[i, j]):
                    labels[i][j] = f"{grid[i, j]:.2f}"
            finite = grid[np.isfinite(grid)]
            span = max(abs(np.log2(finite)).max(), 0.1) if finite.size else 1.0
            im = ax.imshow(np.log2(grid), cmap="RdBu_r", vmin=-span, vmax=span, aspect="auto")
            from qsengine.study import format_tokens

            ax.set_xticks(range(len(contexts)), [format_tokens(t) for t in contexts],
                          rotation=45 if len(contexts) > 6 else 0, fontsize=7 if len(contexts) > 10 else 9)
            ax.set_yticks(range(len(clusters)), clusters, fontsize=7 if len(clusters) > 10 else 9)
            short = {"dense-only": "dense\nonly", "moe-only": "MoE\nonly", "neither": "none"}
            size = 7 if len(contexts) <= 8 else 5.5
            for i in range(len(clusters)):
                for j in range(len(contexts)):
                    ax.text(j, i, short.get(labels[i][j], labels[i][j]), ha="center", va="center", fontsize=size)
            ax.set_xlabel("context")
            ax.set_title(f"{m}: dense/MoE throughput ratio", fontsize=9)
            fig.colorbar(im, ax=ax, label="log2 ratio (red: dense twin wins, blue: MoE wins)")
        save(fig, "ratio_heatmap.png")

    if "break_even_q" in df.columns and df["break_even_q"].astype(float).notna().any():
        fig, axes = panels(len(models))
        for ax, m in zip(axes, models):
            sub = df[df[cm] == m]
            for c in dict.fromkeys(sub[cc]):
                s = sub[sub[cc] == c].groupby(ct)["break_even_q"].median().sort_index()
                ax.plot(s.index, s.values, marker="o", label=str(c))
            if "q" in sub.columns:
                ax.axhline(float(sub["q"].median()), color="gray", ls=":", lw=0.8, label="q swept (median)")
            context_ticks(ax, sub[ct])
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel("break-even q*")
            ax.set_title(f"{m}: dense twin wins below q*", fontsize=9)
        handles, labels_ = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels_, loc="center left", bbox_to_anchor=(0.83, 0.5), fontsize=7, frameon=False)
        save(fig, "break_even_q.png", legend_right=True)

    pairs = [("tokens_per_s_per_gpu", "tokens/s per GPU"), ("batch", "concurrent sequences")]
    avail = [(k, lab) for k, lab in pairs if f"moe_{k}" in df.columns and f"dense_{k}" in df.columns]
    if avail:
        fig, axes = plt.subplots(len(avail), len(models), figsize=(4.5 * len(models), 3.5 * len(avail)),
                                 squeeze=False)
        for col, m in enumerate(models):
            sub = df[df[cm] == m]
            for row, (k, lab) in enumerate(avail):
                ax = axes[row][col]
                for n, c in enumerate(dict.fromkeys(sub[cc])):
                    s = sub[sub[cc] == c].groupby(ct)[[f"moe_{k}", f"dense_{k}"]].median().sort_index()
                    color = plt.get_cmap("tab10")(n % 10)
                    ax.plot(s.index, s[f"moe_{k}"], marker="o", color=color, label=f"{c} MoE")
                    ax.plot(s.index, s[f"dense_{k}"], marker="s", ls="--", color=color, label=f"{c} dense")
                context_ticks(ax, sub[ct])
                ax.set_yscale("log")
                ax.set_xlabel("context (tokens)")
                ax.set_ylabel(lab)
                ax.set_title(m, fontsize=9)
        from matplotlib.lines import Line2D

        clusters_all = list(dict.fromkeys(df[cc]))
        handles = [Line2D([], [], color=plt.get_cmap("tab10")(n % 10), label=str(c)) for n, c in enumerate(clusters_all)]
        handles += [Line2D([], [], color="k", marker="o", label="MoE"),
                    Line2D([], [], color="k", marker="s", ls="--", label="dense twin")]
        fig.legend(handles=handles, loc="center left", bbox_to_anchor=(0.83, 0.5), fontsize=7, frameon=False)
        save(fig, "throughput.png", legend_right=True)
    return written


def _run_report_cli(args) -> int:
    for p in report(args.dir, args.out):
        print(p)
    return 0


def add_parser(sub) -> None:
    """``qsengine sweep`` and ``qsengine report``."""
    p = sub.add_parser("sweep", help="run a grid of simulate points (local, process pool or Dask), checkpointed")
    p.add_argument("file", type=Path, metavar="SWEEP.toml", help="[grid] table of lists, optional [sweep] table")
    p.add_argument("--out", type=Path, required=True, help="directory: checkpoint chunks + results.parquet/csv")
    add_executor_args(p)
    p.add_argument("--no-resume", action="store_true", help="discard the checkpoint in --out and start over")
    p.add_argument("--seed", type=int, default=None, help="sweep seed (overrides [sweep] seed)")
    p.add_argument("--chunk-size", type=int, default=None, help="points per task (overrides [sweep] chunk_size)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is shown only on a terminal)")
    p.set_defaults(handler=_run_sweep_cli)

    r = sub.add_parser("report", help="standard figures from a sweep results directory")
    r.add_argument("dir", type=Path, metavar="DIR", help="a sweep --out directory (or a results.parquet)")
    r.add_argument("--out", type=Path, default=None, help="where to save the PNGs (default: DIR)")
    r.set_defaults(handler=_run_report_cli)


if __name__ == "__main__":  # pragma: no cover
    from qsengine.cli import main

    sys.exit(main(["sweep", *sys.argv[1:]]))
