"""Where a sweep's chunks run: the evaluation of one chunk (a pure function,
shipped to wherever the executor puts it) and the drivers (in-process
threads, ``concurrent.futures`` executors, Dask), which hand results to the
caller as they complete. Dask is imported only here, only when used."""

from __future__ import annotations

import concurrent.futures as cf
import os
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from qsengine.sweeps.grid import point_seed
from qsengine.sweeps.tables import _columns_table, _records_table

#: Default points per chunk: closed-form points are cheap, Monte Carlo ones are not.
#: With the default evaluator closed-form chunks go to the vectorised pipeline
#: (qsengine.decode.pipeline) in one call, so they are large; a custom evaluator is
#: called per point and keeps the small chunks.
CLOSED_FORM_CHUNK = 256
CLOSED_FORM_FAST_CHUNK = 65_536
MONTE_CARLO_CHUNK = 8

Evaluator = Callable[[dict[str, Any], np.random.SeedSequence, "int | None"], dict[str, Any]]


def simulate_point(kwargs: dict[str, Any], seed: np.random.SeedSequence, threads: int | None) -> dict[str, Any]:
    """The default evaluator: ``simulate(**kwargs, seed=seed).to_record()``."""
    from qsengine.decode.simulate import simulate

    import warnings

    from qsengine.decode.point import ContextWarning

    with warnings.catch_warnings():  # the sweep warned once per model and context, before any work
        warnings.simplefilter("ignore", ContextWarning)
        return simulate(**kwargs, seed=seed, threads=threads).to_record()


@dataclass
class _Chunk:
    """One task: unique points ``rows`` (indices into the sweep's unique
    points) with their ids, as fast-path columns (closed form, default
    evaluator) or as (id, simulate kwargs) pairs."""

    rows: np.ndarray
    ids: list[str]
    columns: dict[str, tuple[list[Any], np.ndarray]] | None = None
    points: list[tuple[str, dict[str, Any]]] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def kwargs(self) -> list[tuple[str, dict[str, Any]]]:
        if self.points is not None:
            return self.points
        assert self.columns is not None
        return [(pid, {k: vals[int(c[i])] for k, (vals, c) in self.columns.items()})
                for i, pid in enumerate(self.ids)]


def _run_chunk(chunk: _Chunk, entropy: Any, spawn_key: tuple[int, ...], threads: int | None,
               evaluate: Evaluator):
    """Evaluate one chunk; returns its results as an arrow table (one row per point, in order)."""
    if chunk.columns is not None:
        # closed form: no randomness (the seed is not used), one vectorised call
        from qsengine.decode.pipeline import evaluate_columns

        try:
            return _columns_table(evaluate_columns(chunk.columns, len(chunk), check_points=False))
        except Exception:  # noqa: BLE001 - re-run point by point: the failing point is named below
            pass
    root = np.random.SeedSequence(entropy, spawn_key=spawn_key)
    rows = []
    for pid, kwargs in chunk.kwargs():
        try:
            rec = evaluate(kwargs, point_seed(root, pid), threads)
        except Exception as exc:
            exc.add_note(f"qsengine.sweep: while evaluating point {pid} {kwargs}")
            raise
        rows.append(rec)
    return _records_table(rows)


def _is_dask_client(x: Any) -> bool:
    mod = type(x).__module__ or ""
    return mod.startswith("distributed") and type(x).__name__ == "Client"


def _drive_inprocess(chunks: list[_Chunk], args, on_done, workers: int) -> None:
    """Run chunks in this process. Fast-path chunks (numpy on large arrays and
    the core, both mostly without the GIL) run on ``workers`` threads; the
    others one after another (the core already uses every core per point)."""
    fast = [i for i, ch in enumerate(chunks) if ch.columns is not None]
    rest = range(len(chunks))
    if workers > 1 and len(fast) > 1:
        with cf.ThreadPoolExecutor(min(workers, len(fast)), thread_name_prefix="qsengine-sweep") as ex:
            _drive_futures(ex, [chunks[i] for i in fast], args, lambda j, table: on_done(fast[j], table), 0, None)
        rest = [i for i in rest if chunks[i].columns is None]
    for i in rest:
        on_done(i, _run_chunk(chunks[i], *args))


def _drive_futures(ex: cf.Executor, chunks, args, on_done, retries: int,
                   make_executor: Callable[[], cf.Executor] | None) -> None:
    """Run chunks on a concurrent.futures executor; resubmit failed chunks.
    ``make_executor`` (own pools only) replaces a pool broken by a dead worker."""
    gen = 0
    pending: dict[cf.Future, tuple[int, int, int]] = {}
    for i, ch in enumerate(chunks):
        pending[ex.submit(_run_chunk, ch, *args)] = (i, 0, gen)
    try:
        while pending:
            done, _ = cf.wait(list(pending), return_when=cf.FIRST_COMPLETED)
            for fut in done:
                i, attempt, fgen = pending.pop(fut)
                try:
                    rows = fut.result()
                except cf.BrokenExecutor:
                    if make_executor is None or attempt >= retries:
                        raise
                    if fgen == gen:  # first failure seen from this pool: replace it
                        ex.shutdown(wait=False, cancel_futures=True)
                        ex = make_executor()
                        gen += 1
                    pending[ex.submit(_run_chunk, chunks[i], *args)] = (i, attempt + 1, gen)
                except Exception:
                    if attempt >= retries:
                        raise
                    pending[ex.submit(_run_chunk, chunks[i], *args)] = (i, attempt + 1, gen)
                else:
                    on_done(i, rows)
    except BaseException:
        for fut in pending:
            fut.cancel()
        raise
    finally:
        if make_executor is not None:
            ex.shutdown(wait=False, cancel_futures=True)


def _drive_dask(client, chunks, args, on_done, retries: int) -> None:
    """Run chunks on Dask, as many in flight as the cluster has threads: a
    chunk is submitted only when a slot frees, so no chunk waits behind a long
    one on a busy worker while another worker idles (tasks of unknown, very
    unequal cost; Dask does not steal them reliably). Slots are re-read from
    the scheduler, so workers that join are used."""
    from collections import deque

    from distributed import as_completed

    token = uuid.uuid4().hex[:12]

    def submit(i: int, attempt: int):
        return client.submit(_run_chunk, chunks[i], *args, key=f"qsengine-sweep-{token}-{i}-{attempt}",
                             retries=retries, pure=False)

    waiting = deque(range(len(chunks)))
    futs: dict[Any, tuple[int, int]] = {}
    ac = as_completed()

    def top_up() -> None:
        slots = _threads_of(client)
        while waiting and len(futs) < slots:
            i = waiting.popleft()
            f = submit(i, 0)
            futs[f] = (i, 0)
            ac.add(f)

    try:
        top_up()
        for fut in ac:
            i, attempt = futs.pop(fut)
            try:
                rows = fut.result()
            except Exception:  # KilledWorker (its worker died too often) or an error after retries
                if attempt >= retries:
                    raise
                nf = submit(i, attempt + 1)
                futs[nf] = (i, attempt + 1)
                ac.add(nf)
                continue
            fut.release()
            on_done(i, rows)
            top_up()
    except BaseException:
        client.cancel(list(futs))
        raise


def _threads_of(client) -> int:
    """Threads of a Dask cluster's workers (at least 1)."""
    try:
        return max(1, sum(int(w.get("nthreads", 1)) for w in client.scheduler_info()["workers"].values()))
    except Exception:  # noqa: BLE001 - no scheduler info yet
        return 1


def _workers_of(executor: Any) -> int:
    if _is_dask_client(executor):
        try:
            return max(1, len(executor.scheduler_info()["workers"]))
        except Exception:  # noqa: BLE001
            return 1
    return max(1, getattr(executor, "_max_workers", None) or os.cpu_count() or 1)
