"""The on-disk checkpoint of a sweep: a directory that is also a parquet dataset.

Layout of ``DIR``::

    meta.json                  format version, grid fingerprint, sweep seed,
                               qsengine version and code fingerprint (``code``)
    chunk-<sha>.parquet        one completed chunk of points; <sha> is the first
                               32 hex digits of the SHA-256 of the file's bytes
    chunk-<sha>.parquet.corrupt  a chunk that failed verification (kept aside)

Guarantees (see ``docs`` / ARCHITECTURE "Sweeps"):

* every file is written atomically: bytes go to a temporary file in the same
  directory, which is flushed and ``fsync``-ed, then ``os.replace``-d onto its
  final name and the directory is ``fsync``-ed; a reader never sees half a file;
* a chunk's name is the hash of its bytes, so a truncated or bit-flipped chunk
  is detected on resume (the hash no longer matches), reported with a
  :class:`qsengine.QsengineWarning`, moved aside and its points recomputed;
  it is never read silently;
* ``meta.json`` carries :data:`FORMAT_VERSION`; a checkpoint of another
  version is refused with a clear message rather than misread;
* ``meta.json`` carries the code fingerprint (``code``,
  :func:`qsengine.code_fingerprint`): :func:`qsengine.sweep` refuses to resume
  a checkpoint written by other code, or one without the key (written before it
  was recorded), naming both fingerprints; ``resume=False`` (``--no-resume``)
  starts over. ``qsengine_version`` alone is the same at every commit, so
  without this an upgraded qsengine would silently resume older code's results.
  (A new key, not a new layout: :data:`FORMAT_VERSION` is unchanged, and an
  older checkpoint is refused by the code check rather than misread.)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from qsengine.errors import QsengineWarning

__all__ = ["FORMAT", "FORMAT_VERSION", "RESULTS_FORMAT", "RESULTS_FORMAT_VERSION", "Checkpoint", "ChunkScan",
           "read_results_table", "results_metadata"]

FORMAT = "qsengine.sweep"
#: Version of the checkpoint layout and of the chunk columns' meaning.
FORMAT_VERSION = 1

_CHUNK_RE = re.compile(r"^chunk-([0-9a-f]{32})\.parquet$")
_TMP_PREFIX = ".tmp-"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same dir, fsync, rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def table_to_parquet_bytes(table) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()  # Arrow-owned, like every stream handed to Arrow here (see ChunkStore.scan)
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


#: A finished sweep's ``results.parquet`` (written by ``qsengine sweep``) names
#: its format in the parquet schema metadata. Files written before the format
#: was recorded (no key) have the same columns as version 1 and are read as it.
RESULTS_FORMAT = "qsengine.sweep.results"
RESULTS_FORMAT_VERSION = 1


def results_metadata(version: str, code: str) -> dict[bytes, bytes]:
    """Schema metadata that marks a results table (merge into the table's own):
    its format, and the qsengine version and code fingerprint that wrote it."""
    return {b"qsengine.format": RESULTS_FORMAT.encode(),
            b"qsengine.format_version": str(RESULTS_FORMAT_VERSION).encode(),
            b"qsengine.version": version.encode(),
            b"qsengine.code": code.encode()}


def read_results_table(path: str | os.PathLike[str]):
    """A results parquet file as a pyarrow Table: a file of another format or
    of a newer format version is refused with a clear message, never misread;
    an unversioned (older) file is read as version 1."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = Path(path)
    try:
        table = pq.read_table(p)
    except (OSError, pa.ArrowException) as exc:
        raise ValueError(f"{p}: not a readable parquet results file ({exc})") from None
    meta = table.schema.metadata or {}
    fmt = meta.get(b"qsengine.format")
    if fmt is None:
        return table  # written before versions were recorded: version-1 columns
    if fmt.decode(errors="replace") != RESULTS_FORMAT:
        raise ValueError(f"{p}: a {fmt.decode(errors='replace')!r} file, not {RESULTS_FORMAT!r} sweep results")
    raw = meta.get(b"qsengine.format_version", b"?").decode(errors="replace")
    try:
        version = int(raw)
    except ValueError:
        version = None
    if version != RESULTS_FORMAT_VERSION:
        writer = meta.get(b"qsengine.version", b"?").decode(errors="replace")
        raise ValueError(f"{p}: results format version {raw} (written by qsengine {writer}), but this qsengine "
                         f"reads version {RESULTS_FORMAT_VERSION}; use a matching qsengine or re-run the sweep")
    return table


@dataclass
class ChunkScan:
    """What a resume found in the checkpoint directory."""

    tables: list  # pyarrow.Table per valid chunk
    done: set[str]  # point ids present in valid chunks
    bad: list[str]  # chunk files rejected (moved aside)


class Checkpoint:
    """A sweep's checkpoint directory."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    # ----------------------------------------------------------------- meta
    @property
    def meta_path(self) -> Path:
        return self.path / "meta.json"

    def read_meta(self) -> dict[str, Any] | None:
        """The stored metadata, None if there is none; ValueError if unreadable
        or of another format version."""
        p = self.meta_path
        if not p.exists():
            return None
        try:
            meta = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"checkpoint {self.path}: meta.json is unreadable ({exc}); "
                             "use a new directory or resume=False to overwrite") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"checkpoint {self.path}: meta.json is not a qsengine sweep checkpoint "
                             f"(format={meta.get('format') if isinstance(meta, dict) else None!r}); "
                             "use a new directory or resume=False to overwrite")
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"checkpoint {self.path}: format version {version!r}, but this qsengine reads "
                             f"version {FORMAT_VERSION}; re-run the sweep into a new directory "
                             "(or resume=False to overwrite)")
        return meta

    def write_meta(self, meta: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        data = json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **meta}, indent=2, sort_keys=True)
        atomic_write_bytes(self.meta_path, data.encode("utf-8"))

    # --------------------------------------------------------------- chunks
    def chunk_files(self) -> list[Path]:
        if not self.path.is_dir():
            return []
        return sorted(p for p in self.path.iterdir() if _CHUNK_RE.match(p.name))

    def clear(self) -> None:
        """Remove this sweep's files (chunks, meta, temporaries); nothing else."""
        if not self.path.is_dir():
            return
        for p in self.path.iterdir():
            if (_CHUNK_RE.match(p.name) or p.name.startswith(_TMP_PREFIX) or p.name == "meta.json"
                    or (p.name.startswith("chunk-") and p.name.endswith(".corrupt"))):
                p.unlink()
        _fsync_dir(self.path)

    def write_chunk(self, table) -> Path:
        """Write one completed chunk atomically; returns its path."""
        data = table_to_parquet_bytes(table)
        digest = hashlib.sha256(data).hexdigest()[:32]
        path = self.path / f"chunk-{digest}.parquet"
        atomic_write_bytes(path, data)
        return path

    def scan(self, valid_ids: set[str] | None, required: Iterable[str]) -> ChunkScan:
        """Read and verify every chunk; reject (warn, move aside) bad ones.

        A chunk is valid when its bytes hash to its name, it parses as
        parquet, it has the ``required`` columns, and all its point ids belong
        to the grid. Rows of points already seen in another chunk are dropped
        (so the result never has duplicates).
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        required = list(required)
        tables: list = []
        done: set[str] = set()
        bad: list[str] = []
        if self.path.is_dir():
            for p in self.path.iterdir():  # leftovers of writes cut short: never complete files
                if p.name.startswith(_TMP_PREFIX):
                    p.unlink()
        for path in self.chunk_files():
            problem = None
            table = None
            try:
                # Read into an Arrow-owned buffer, never a Python file object: Arrow's
                # reader threads drop their last reference to the source later,
                # and releasing a Python object there asks for the GIL inside a
                # C++ destructor; at interpreter exit (Ctrl-C) that aborts the
                # process ("terminate called without an active exception").
                with pa.OSFile(str(path)) as f:
                    data = f.read_buffer()
                if hashlib.sha256(data).hexdigest()[:32] != _CHUNK_RE.match(path.name).group(1):
                    problem = "its contents do not match its checksum (truncated or corrupted)"
                else:
                    table = pq.read_table(pa.BufferReader(data))
            except Exception as exc:  # noqa: BLE001 - any parse failure means a bad chunk
                problem = f"it is not readable parquet ({type(exc).__name__}: {exc})"
            if problem is None:
                missing = [c for c in required if c not in table.column_names]
                if missing:
                    problem = f"it lacks the columns {missing}"
                else:
                    ids = table.column("point_id").to_pylist()
                    foreign = [] if valid_ids is None else [i for i in ids if i not in valid_ids]
                    if foreign:
                        problem = f"it holds {len(foreign)} point(s) not in this grid (e.g. {foreign[0]!r})"
            if problem is not None:
                warnings.warn(f"checkpoint {self.path}: chunk {path.name} rejected: {problem}; "
                              "its points will be recomputed (file kept as *.corrupt)", QsengineWarning,
                              stacklevel=3)
                os.replace(path, path.with_name(path.name + ".corrupt"))
                bad.append(path.name)
                continue
            keep = [i not in done for i in ids]
            if not all(keep):
                table = table.filter(pa.array(keep))
            done.update(ids)
            if table.num_rows:
                tables.append(table)
        return ChunkScan(tables=tables, done=done, bad=bad)
