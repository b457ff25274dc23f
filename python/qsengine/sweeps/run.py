"""The sweep itself: validate, identify, chunk what is not done, drive the
chunks, checkpoint each as it completes, assemble (ARCHITECTURE.md, "Sweeps")."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qsengine._seed import SeedLike, as_seed_sequence, seed_record
from qsengine.decode.point import canonical_json
from qsengine.sweeps.checkpoint import FORMAT_VERSION, Checkpoint
from qsengine.sweeps.executors import (
    CLOSED_FORM_CHUNK,
    CLOSED_FORM_FAST_CHUNK,
    MONTE_CARLO_CHUNK,
    Evaluator,
    _Chunk,
    _drive_dask,
    _drive_futures,
    _drive_inprocess,
    _is_dask_client,
    _workers_of,
    simulate_point,
)
from qsengine.sweeps.grid import _expand, _is_int, _Points
from qsengine.sweeps.tables import _assemble, _concat, _inputs_table

__all__ = ["sweep", "load_results"]


def _check_meta(ck: Checkpoint, meta: dict[str, Any], points: _Points, seed_rec: dict[str, Any],
                version: str, code: str) -> None:
    what = []
    if meta.get("grid_hash") != points.grid_hash:
        what.append("grid")
    if meta.get("seed") != seed_rec:
        what.append("seed")
    if meta.get("qsengine_version") != version:
        what.append(f"qsengine version ({meta.get('qsengine_version')} there, {version} here)")
    if what:
        raise ValueError(f"checkpoint {ck.path} was written for a different {'/'.join(what)}; "
                         "use a new directory or resume=False to overwrite")
    # the same version at every commit: only the code fingerprint tells older code's results
    # apart; a checkpoint without one (written before it was recorded) cannot be trusted either
    there = meta.get("code")
    if there != code:
        there = f"{there} there" if "code" in meta else "none there: written before qsengine recorded it"
        raise ValueError(f"checkpoint {ck.path} was written by other code (code fingerprint {there}; {code} here), "
                         "its results may differ from this code's: delete the directory, use a new one or pass "
                         "resume=False (qsengine sweep/study: --no-resume) to start over")


def sweep(
    grid: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    executor: Any = None,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = True,
    progress: bool = True,
    seed: SeedLike = None,
    chunk_size: int | None = None,
    *,
    threads: int | None = None,
    retries: int = 3,
    strict: bool = False,
    _evaluate: Evaluator | None = None,
):
    """Run :func:`qsengine.simulate` over every point of ``grid``.

    Args:
        grid: a dict of lists (the cartesian product is swept, in the order
            of :data:`FIELDS`, last field fastest) or a list of point dicts.
            Fields are simulate's arguments: ``model``, ``cluster``,
            ``context`` (required), ``q``, ``dense``, ``routing``, ``plan``,
            ``precision``, ``microbatches``, ``rtol``, ``slo_tpot``, ``batch``,
            ``twin_attention``, ``break_even``, ``options``, ``output``, ``prefill``, ``draft_tokens``,
            ``acceptance`` (:data:`qsengine.decode.point.FIELDS`). A scalar is a one-value axis.
        executor: None (in-process; the C++ core uses all cores per point),
            ``"processes"`` (a process pool over the cores, one core per
            point), a ``dask.distributed.Client`` or a scheduler address
            (``"tcp://host:8786"``), or any ``concurrent.futures.Executor``.
        checkpoint: a directory; each completed chunk is written there
            atomically as parquet, with ``meta.json``.
        resume: reuse the checkpoint's completed points (refused if it was
            written for another grid, seed or qsengine version, or by other
            code: :func:`qsengine.code_fingerprint`, recorded in ``meta.json``
            as ``code``); False clears the checkpoint's files and starts over.
        progress: a tqdm bar with an ETA (only on a terminal).
        seed: the sweep seed (None | int | SeedSequence). With None and an
            existing checkpoint, the checkpoint's seed is reused; otherwise
            fresh entropy is drawn. Recorded in ``df.attrs["sweep"]["seed"]``.
        chunk_size: points per task (default: 256 for closed-form points,
            small for Monte Carlo points). Results do not depend on it.
        threads: C++ threads per point (default: all cores in-process, 1 in
            worker processes and on Dask). Results do not depend on it.
        retries: times a failed chunk (dead worker, error) is resubmitted.
        strict: a context beyond a model's maximum context is an error
            (default: a :class:`qsengine.ContextWarning`, once per distinct
            model and context, before any work).

    Returns:
        pandas.DataFrame, one row per grid point in grid order: ``point_id``,
        the inputs as ``in_<field>``, and every result field (infeasible
        points included, with ``moe_reason`` / ``dense_reason``).

    Raises:
        ValueError, TypeError: a bad grid (before any work), a mismatched
            checkpoint. KeyboardInterrupt: completed chunks are on disk.
    """
    import pyarrow as pa

    from qsengine import __version__, code_fingerprint

    t0 = time.perf_counter()
    if chunk_size is not None and (not _is_int(chunk_size) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r}: must be an int >= 1 or None")
    if not _is_int(retries) or retries < 0:
        raise ValueError(f"retries={retries!r}: must be an int >= 0")
    if not (executor is None or executor == "processes" or isinstance(executor, (str, cf.Executor))
            or _is_dask_client(executor)):
        raise TypeError(f"executor={executor!r}: must be None, 'processes', a dask.distributed.Client, "
                        "a scheduler address or a concurrent.futures.Executor")
    if isinstance(executor, str) and executor != "processes" and "://" not in executor:
        raise ValueError(f"executor={executor!r}: must be 'processes' or a scheduler address like "
                         "'tcp://host:8786'")
    points = _expand(grid, strict)
    evaluate = _evaluate or simulate_point

    ck = Checkpoint(checkpoint) if checkpoint is not None else None
    meta = None
    if ck is not None:
        if resume:
            meta = ck.read_meta()
            if meta is None and ck.chunk_files():
                raise ValueError(f"checkpoint {ck.path} has chunks but no meta.json; "
                                 "use a new directory or resume=False to overwrite")
        else:
            ck.clear()
    if seed is None and meta is not None and isinstance(meta.get("seed"), dict):
        root = np.random.SeedSequence(meta["seed"]["entropy"], spawn_key=tuple(meta["seed"]["spawn_key"]))
    else:
        root = as_seed_sequence(seed)
    seed_rec = seed_record(root)
    info = {"format_version": FORMAT_VERSION, "grid_hash": points.grid_hash, "seed": seed_rec,
            "qsengine_version": __version__, "code": code_fingerprint(), "points": len(points.ids),
            "unique_points": len(points.unique)}
    info["grid_fingerprint"] = hashlib.sha256(canonical_json(info).encode()).hexdigest()[:32]

    inputs = _inputs_table(points)
    unique_ids = points.unique_ids
    tables: list = []
    done: set[str] = set()
    if ck is not None:
        if meta is not None:
            _check_meta(ck, meta, points, seed_rec, __version__, info["code"])
            scan = ck.scan(set(unique_ids), ["point_id", *inputs.column_names[1:]])
            tables, done = scan.tables, scan.done
        else:
            ck.write_meta(info)

    # chunks of the points still to do, in grid order; closed-form ones large
    todo = np.array([pid not in done for pid in unique_ids], dtype=bool) if done else \
        np.ones(len(unique_ids), dtype=bool)
    mb = points.codes["microbatches"][points.unique]
    zero = np.array([v.arg == 0 for v in points.values["microbatches"]], dtype=bool)[mb]
    closed, monte = np.flatnonzero(todo & zero), np.flatnonzero(todo & ~zero)
    if executor is None:
        workers = threads or os.cpu_count() or 1
    else:
        workers = _workers_of(executor) if not isinstance(executor, str) else 1
    mc_size = chunk_size or (MONTE_CARLO_CHUNK if executor is None
                             else max(1, min(MONTE_CARLO_CHUNK, math.ceil(monte.size / (4 * workers)))))
    fast = evaluate is simulate_point
    if chunk_size:
        cf_size = chunk_size
    elif not fast:
        cf_size = CLOSED_FORM_CHUNK
    else:  # fast path: big chunks (a chunk shares its MoE sides and q* searches), two per worker or
        # thread so that uneven halves even out: bench_sweep's grid splits 2.1 s / 1.3 s of work in
        # two, and 4 chunks on 2 threads ran 44-45k points/s against 40-42k with 2 (8: 38k)
        per = 2 * workers
        cf_size = max(CLOSED_FORM_CHUNK, min(CLOSED_FORM_FAST_CHUNK, math.ceil(closed.size / per)))

    def chunk(rows: np.ndarray, columns: bool) -> _Chunk:
        ids = [unique_ids[r] for r in rows.tolist()]
        pos = points.unique[rows]
        if columns:
            return _Chunk(rows, ids, columns=points.arg_columns(pos))
        return _Chunk(rows, ids, points=[(pid, points.kwargs(p)) for pid, p in zip(ids, pos.tolist())])

    chunks = [chunk(group[s:s + size], fast and group is closed)
              for group, size in ((closed, cf_size), (monte, mc_size)) for s in range(0, group.size, size)]
    if threads is None and executor is not None:
        threads = 1
    args = (root.entropy, tuple(root.spawn_key), threads, evaluate)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(points.unique), initial=len(done), unit="pt", desc="qsengine sweep", smoothing=0.05,
               disable=not progress or not sys.stderr.isatty())

    def on_done(i: int, table) -> None:
        ins = inputs.take(pa.array(chunks[i].rows))
        for name in reversed(ins.column_names):
            table = table.add_column(0, name, ins.column(name))
        if ck is not None:
            ck.write_chunk(table)
        tables.append(table)
        bar.update(len(chunks[i]))

    own_client = None
    try:
        if not chunks:
            pass
        elif executor is None:
            _drive_inprocess(chunks, args, on_done, workers)
        elif executor == "processes":
            import multiprocessing

            ctx = multiprocessing.get_context("spawn")  # no fork with the C++ thread pool alive

            def make() -> cf.Executor:
                return cf.ProcessPoolExecutor(max_workers=os.cpu_count() or 1, mp_context=ctx)

            _drive_futures(make(), chunks, args, on_done, retries, make)
        elif isinstance(executor, str):
            from distributed import Client

            own_client = Client(executor)
            _drive_dask(own_client, chunks, args, on_done, retries)
        elif _is_dask_client(executor):
            _drive_dask(executor, chunks, args, on_done, retries)
        else:
            _drive_futures(executor, chunks, args, on_done, retries, None)
    finally:
        bar.close()
        if own_client is not None:
            own_client.close()

    df = _assemble(points, inputs, tables)
    df.attrs["sweep"] = {**info, "computed_points": int(todo.sum()), "resumed_points": len(done),
                         "elapsed_s": time.perf_counter() - t0,
                         "checkpoint": str(ck.path) if ck is not None else None}
    return df


def load_results(path: str | os.PathLike[str]):
    """Results of a sweep directory as a DataFrame: ``results.parquet`` if the
    sweep finished, otherwise the verified chunks of its checkpoint (any
    order; corrupted chunks are reported and skipped)."""
    import pandas as pd

    from qsengine.sweeps.checkpoint import read_results_table

    p = Path(path)
    if p.is_file():
        return read_results_table(p).to_pandas()
    if (p / "results.parquet").exists():
        return read_results_table(p / "results.parquet").to_pandas()
    ck = Checkpoint(p)
    ck.read_meta()
    files = ck.chunk_files()
    if not files:
        raise ValueError(f"{p}: no results.parquet and no checkpoint chunks")
    scan = ck.scan(None, ["point_id"])
    if not scan.tables:
        return pd.DataFrame()
    return _concat(scan.tables).to_pandas()
