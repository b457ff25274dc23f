"""qsengine.sweep: :func:`qsengine.simulate` over a grid of points, on one
machine or a Dask cluster, checkpointed so that nothing completed is lost.

How a sweep runs (see ARCHITECTURE.md, "Sweeps"):

1. **Validate** the whole grid before any work: unknown fields (with a
   did-you-mean), empty lists, values of the wrong type, and every point's
   specs (names resolved with the loaders, dense twin built, plan checked).
2. **Identify** each point by its content: ``point_id`` is a SHA-256 of the
   canonical JSON of its inputs (names resolved to the full spec content,
   defaults filled in). Its seed is
   ``SeedSequence(entropy=sweep_seed.entropy, spawn_key=sweep_seed.spawn_key +
   words(point_id))``: never its position, chunk or worker, so a point's result
   is identical whichever executor or chunking ran it. Identical points in a
   grid are computed once.
3. **Chunk** the points not yet done (grid order); closed-form points
   (``microbatches=0``) go in large chunks, Monte Carlo points in small ones.
4. **Run** the chunks in-process, in a process pool, on any
   ``concurrent.futures.Executor`` or on Dask; results are taken as they
   complete, each chunk is written to the checkpoint atomically, a chunk whose
   worker died is resubmitted (up to ``retries`` times).
5. **Assemble** one row per grid point in grid order: ``point_id``, the inputs
   as ``in_<field>`` columns, and every field of
   :meth:`qsengine.SimulationResult.to_record`.

Dask is imported only when a Dask executor is used.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import math
import numbers
import os
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from qsengine._checkpoint import FORMAT_VERSION, Checkpoint
from qsengine._groups import factorize, group
from qsengine._seed import SeedLike, as_seed_sequence, seed_record
from qsengine.decode.point import FIELDS as POINT_FIELDS
from qsengine.decode.point import Validator, Value, canonical_json

__all__ = ["sweep", "load_results", "FIELDS", "point_id", "point_seed"]

#: Grid fields, their defaults (those of :func:`qsengine.simulate`); ``...`` = required.
FIELDS: dict[str, Any] = POINT_FIELDS

#: Default points per chunk: closed-form points are cheap, Monte Carlo ones are not.
#: With the default evaluator closed-form chunks go to the vectorised fast path
#: (qsengine.decode.pipeline) in one call, so they are large; a custom evaluator is
#: called per point and keeps the small chunks.
CLOSED_FORM_CHUNK = 256
CLOSED_FORM_FAST_CHUNK = 65_536
MONTE_CARLO_CHUNK = 8

Evaluator = Callable[[dict[str, Any], np.random.SeedSequence, "int | None"], dict[str, Any]]


def point_id(text: str) -> str:
    """The stable id of a point: 32 hex digits of SHA-256 of its canonical JSON ``text``."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def point_seed(root: np.random.SeedSequence, pid: str) -> np.random.SeedSequence:
    """The seed of point ``pid`` under the sweep seed ``root``: the root's
    entropy, with the point id's four 32-bit words appended to its spawn key."""
    words = tuple(int(pid[i:i + 8], 16) for i in range(0, 32, 8))
    return np.random.SeedSequence(root.entropy, spawn_key=tuple(root.spawn_key) + words)


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------


def _err(field: str, value: Any, rule: str, exc: type[Exception] = ValueError) -> Exception:
    return exc(f"grid: field {field!r} = {value!r}: {rule}")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


@dataclass
class _Points:
    """The validated grid, column-wise: per field its distinct values and the
    value code of every grid position; the point id of every position; the
    unique points (first occurrence of each id, in grid order)."""

    values: dict[str, list[Value]]  # field -> distinct validated values
    codes: dict[str, np.ndarray]  # field -> value code per grid position
    ids: list[str]  # point id per grid position
    unique: np.ndarray  # grid position of each unique point (grid order)
    unique_of: np.ndarray  # per grid position: its unique point's index
    grid_hash: str

    @property
    def unique_ids(self) -> list[str]:
        return [self.ids[i] for i in self.unique.tolist()]

    def kwargs(self, pos: int) -> dict[str, Any]:
        return {k: self.values[k][int(c[pos])].arg for k, c in self.codes.items()}

    def arg_columns(self, positions: np.ndarray) -> dict[str, tuple[list[Any], np.ndarray]]:
        """The points at ``positions`` as fast-path columns (simulate's arguments)."""
        return {k: ([v.arg for v in self.values[k]], c[positions]) for k, c in self.codes.items()}


def _as_values(field: str, v: Any) -> list[Any]:
    if isinstance(v, (list, tuple, range, np.ndarray)):
        vals = list(v.tolist() if isinstance(v, np.ndarray) else v)
        if not vals:
            raise ValueError(f"grid: field {field!r} = {v!r}: empty list (give at least one value)")
        return vals
    if isinstance(v, (set, frozenset, Mapping)) or hasattr(v, "__next__"):
        raise _err(field, v, f"must be a list of values (order matters), got {type(v).__name__}", TypeError)
    return [v]  # a scalar is a one-value axis


def _check_fields(keys, where: str) -> None:
    from qsengine.specs._validate import did_you_mean

    for k in keys:
        if not isinstance(k, str):
            raise TypeError(f"{where}: field names must be strings, got {k!r}")
        if k not in FIELDS:
            hint = did_you_mean(k, FIELDS)
            extra = " (the seed is the sweep's seed=, threads are set per executor)" if k in ("seed", "threads") \
                else ""
            raise ValueError(f"{where}: unknown field {k!r}{hint}{extra}; known fields: {', '.join(FIELDS)}")
    for k, d in FIELDS.items():
        if d is ... and k not in keys:
            raise ValueError(f"{where}: required field {k!r} is missing")


def _expand(grid: Mapping[str, Any] | Sequence[Mapping[str, Any]], strict: bool = False) -> _Points:
    """Validate the whole grid (before any work) with the points' one
    :class:`~qsengine.decode.point.Validator` and list its points."""
    val = Validator(strict)

    def checked(k: str, v: Any, where: str) -> Value:
        try:
            return val.value(k, v)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{where}: {exc}") from None

    values: dict[str, list[Value]] = {}
    codes: dict[str, np.ndarray] = {}
    if isinstance(grid, Mapping):
        _check_fields(list(grid), "grid")
        axes = {k: [checked(k, v, "grid") for v in (_as_values(k, grid[k]) if k in grid else [FIELDS[k]])]
                for k in FIELDS}
        n = math.prod(len(v) for v in axes.values())
        stride = n
        for k, vals in axes.items():  # the cartesian product, last field fastest
            stride //= len(vals)
            values[k] = vals
            codes[k] = (np.arange(n, dtype=np.int64) // stride) % len(vals)
    elif isinstance(grid, Sequence) and not isinstance(grid, (str, bytes)):
        if not grid:
            raise ValueError("grid: empty list of points (give at least one)")
        n = len(grid)
        index: dict[str, dict[int, int]] = {k: {} for k in FIELDS}
        for k in FIELDS:
            values[k] = []
            codes[k] = np.empty(n, dtype=np.int64)
        for i, p in enumerate(grid):
            if not isinstance(p, Mapping):
                raise TypeError(f"grid point {i}: must be a dict of field values, got {type(p).__name__}")
            _check_fields(list(p), f"grid point {i}")
            for k, d in FIELDS.items():
                v = checked(k, p.get(k, d), f"grid point {i}")
                c = index[k].get(id(v))  # the validator returns one Value per distinct raw value
                if c is None:
                    c = index[k][id(v)] = len(values[k])
                    values[k].append(v)
                codes[k][i] = c
    else:
        raise TypeError(f"grid: must be a dict of lists or a list of point dicts, got {type(grid).__name__}")

    # cross-field checks once per distinct combination that matters, in grid order
    val.points(values, codes, n, lambda i, pv: f"grid point {i} (model={pv['model'].display!r}, "
                                              f"cluster={pv['cluster'].display!r}, context={pv['context'].display})")

    ids = _point_ids(n, values, codes)
    unique_of, unique = factorize(np.asarray(ids, dtype=object))
    grid_hash = hashlib.sha256("".join(ids).encode()).hexdigest()[:32]
    return _Points(values=values, codes=codes, ids=ids, unique=unique, unique_of=unique_of,
                   grid_hash=grid_hash)


def _point_ids(n: int, values: dict[str, list[Value]], codes: dict[str, np.ndarray]) -> list[str]:
    """:func:`point_id` of every position, i.e. SHA-256 of the canonical JSON
    ``{"model":...,"cluster":...,...}`` (fields in :data:`FIELDS` order).

    The JSON of a position is the concatenation of one part per field, so the
    hash is built as a trie over the fields: the hash state of each distinct
    prefix is computed once and copied for its children. Fields with one value
    are folded into the part before them; the cost is about one state copy and
    one digest per point."""
    parts = {k: [(("," if j else "{") + f'"{k}":{v.canon}').encode() for v in values[k]]
             for j, k in enumerate(FIELDS)}
    levels: list[tuple[np.ndarray, list[bytes]]] = []  # (code per position, part per code) of varying fields
    head = b""
    for k in FIELDS:
        c = codes[k]
        if len(values[k]) == 1 or (n and int(c.min()) == int(c.max())):
            piece = parts[k][int(c[0])] if n else parts[k][0]
            if levels:  # fold a constant field into the part of the varying field before it
                cs, ps = levels[-1]
                levels[-1] = (cs, [x + piece for x in ps])
            else:
                head += piece
        else:
            levels.append((c, list(parts[k])))
    if not levels:
        return [point_id((head + b"}").decode())] * n
    cs, ps = levels[-1]
    levels[-1] = (cs, [x + b"}" for x in ps])
    states = [hashlib.sha256(head)]
    parent = np.zeros(n, dtype=np.int64)  # the prefix group of each position
    for depth, (c, ps) in enumerate(levels):
        child, first = group(n, parent, c)
        copies = [h.copy for h in states]
        pairs = zip(parent[first].tolist(), c[first].tolist())
        if depth < len(levels) - 1:
            states = []
            for pc, cc in pairs:
                h = copies[pc]()
                h.update(ps[cc])
                states.append(h)
            parent = child
            continue
        digests = []
        for pc, cc in pairs:
            h = copies[pc]()
            h.update(ps[cc])
            digests.append(h.hexdigest()[:32])
        if first.size == n and not (first - np.arange(n)).any():  # every position distinct, in order
            return digests
        return [digests[g] for g in child.tolist()]
    raise AssertionError("unreachable")  # pragma: no cover


# ---------------------------------------------------------------------------
# evaluation (runs wherever the executor puts it: keep it a pure function)
# ---------------------------------------------------------------------------


def simulate_point(kwargs: dict[str, Any], seed: np.random.SeedSequence, threads: int | None) -> dict[str, Any]:
    """The default evaluator: ``simulate(**kwargs, seed=seed).to_record()``."""
    from qsengine.decode.simulate import simulate

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


# ---------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------


def _column(values: list[Any]):
    """A typed arrow column: ints, floats (None -> NaN), bools (None -> null), else strings."""
    import pyarrow as pa

    present = [v for v in values if v is not None]
    if present and all(isinstance(v, (bool, np.bool_)) for v in present):
        return pa.array([None if v is None else bool(v) for v in values], type=pa.bool_())
    if present and all(_is_int(v) for v in present) and len(present) == len(values):
        return pa.array([int(v) for v in values], type=pa.int64())
    if present and all(_is_real(v) for v in present):
        return pa.array([math.nan if v is None else float(v) for v in values], type=pa.float64())
    if not present:
        return pa.array(values, type=pa.null())
    return pa.array([None if v is None else str(v) for v in values], type=pa.string())


def _records_table(rows: list[dict[str, Any]]):
    import pyarrow as pa

    names: dict[str, None] = {}
    for r in rows:
        for k in r:
            names.setdefault(k, None)
    return pa.table({k: _column([r.get(k) for r in rows]) for k in names})


def _columns_table(cols: Mapping[str, np.ndarray]):
    """The fast path's result columns as the table :func:`_records_table`
    makes of the same records (same names, order and arrow types)."""
    import pyarrow as pa

    from qsengine.decode.pipeline import RECORD_COLUMNS

    types = {"str": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(), "bool?": pa.bool_()}
    return pa.table({name: pa.array(cols[name], type=types[kind]) for name, kind in RECORD_COLUMNS})


def _inputs_table(points: _Points):
    """point_id + ``in_<field>`` columns for the unique points (grid order)."""
    import pyarrow as pa

    cols = {"point_id": pa.array(points.unique_ids, type=pa.string())}
    for k in FIELDS:
        distinct = _column([v.display for v in points.values[k]])
        cols[f"in_{k}"] = distinct.take(pa.array(points.codes[k][points.unique]))
    return pa.table(cols)


def _concat(tables: list):
    import pyarrow as pa

    return pa.concat_tables(tables, promote_options="default")


# ---------------------------------------------------------------------------
# executors
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# the sweep
# ---------------------------------------------------------------------------


def _check_meta(ck: Checkpoint, meta: dict[str, Any], points: _Points, seed_rec: dict[str, Any],
                version: str) -> None:
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
            ``precision``, ``microbatches``, ``slo_tpot``, ``twin_attention``,
            ``break_even``, ``options``. A scalar is a one-value axis.
        executor: None (in-process; the C++ core uses all cores per point),
            ``"processes"`` (a process pool over the cores, one core per
            point), a ``dask.distributed.Client`` or a scheduler address
            (``"tcp://host:8786"``), or any ``concurrent.futures.Executor``.
        checkpoint: a directory; each completed chunk is written there
            atomically as parquet, with ``meta.json``.
        resume: reuse the checkpoint's completed points (refused if it was
            written for another grid, seed or qsengine version); False clears
            the checkpoint's files and starts over.
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

    from qsengine import __version__

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
            "qsengine_version": __version__, "points": len(points.ids), "unique_points": len(points.unique)}
    info["grid_fingerprint"] = hashlib.sha256(canonical_json(info).encode()).hexdigest()[:32]

    inputs = _inputs_table(points)
    unique_ids = points.unique_ids
    tables: list = []
    done: set[str] = set()
    if ck is not None:
        if meta is not None:
            _check_meta(ck, meta, points, seed_rec, __version__)
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
    else:  # fast path: big chunks, but enough of them to keep every worker busy
        # in-process: one chunk per thread (a chunk shares its MoE sides and q* searches);
        # distributed: two per worker, for balance
        per = workers if executor is None else 2 * workers
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


def _assemble(points: _Points, inputs, tables: list):
    """One row per grid position (grid order): inputs from the grid, results
    from the chunk tables (however they were chunked or read back)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    in_cols = set(inputs.column_names)
    full = inputs.take(pa.array(points.unique_of))
    if tables:
        res = _concat([t.drop_columns([c for c in t.column_names if c in in_cols and c != "point_id"])
                       for t in tables])
        at = pc.index_in(inputs.column("point_id"), value_set=res.column("point_id"))
        if at.null_count:  # pragma: no cover - guarded by construction
            raise RuntimeError(f"sweep: {at.null_count} point(s) have no result")
        res = res.drop_columns(["point_id"]).take(at.take(pa.array(points.unique_of)))
        for name in res.column_names:
            full = full.append_column(name, res.column(name))
    return full.to_pandas()


def load_results(path: str | os.PathLike[str]):
    """Results of a sweep directory as a DataFrame: ``results.parquet`` if the
    sweep finished, otherwise the verified chunks of its checkpoint (any
    order; corrupted chunks are reported and skipped)."""
    import pandas as pd

    from qsengine._checkpoint import read_results_table

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
