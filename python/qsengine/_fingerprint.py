"""The code fingerprint: which qsengine code computed a result.

``qsengine.__version__`` is the same at every commit, so it cannot tell a
checkpoint written by older code from one written by this code. The
fingerprint hashes everything that determines a point's result:

* every file of the installed ``qsengine`` package directory (the Python
  sources, and the shipped specs and calibration data under
  ``cluster_specs/``, whatever their format), except byte-code caches
  (``__pycache__``, ``*.pyc``), hidden files (editor and OS leftovers) and
  compiled extension modules;
* the compiled core, ``qsengine._core``, by the bytes of its extension file
  (``qsengine._core.__file__``): the core exposes only ``__version__`` and
  ``FORMAT_VERSION``, which do not change with its code, and in an editable
  install it lives in the build directory, outside the package directory.

Each file enters the hash as its path relative to the package directory (POSIX
separators, sorted), its length and its bytes, so the fingerprint is
independent of file modification times and of where the package is installed.
It is computed once per process (the files do not change under a running
process in any way that the loaded code would follow).

Used by :mod:`qsengine.sweeps` (``meta.json`` key ``code``; a checkpoint of
other code is refused) and recorded in every results file and study report.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["code_fingerprint"]

#: Hex digits kept of the SHA-256 (64 bits: two codes collide with
#: probability ~2^-64, far below any other risk to a result).
FINGERPRINT_HEX = 16

#: Suffixes of files that are never part of the code: byte-code, which is
#: derived from the ``.py`` files hashed anyway (and depends on the interpreter),
#: and compiled extensions (the one that matters, ``_core``, is hashed on its own).
_SKIP_SUFFIXES = (".pyc", ".pyo", ".so", ".pyd", ".dylib")


def package_files(root: Path) -> list[tuple[str, Path]]:
    """``(relative POSIX path, path)`` of every file under ``root`` that the
    fingerprint covers, sorted by relative path."""
    found = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x != "__pycache__" and not x.startswith(".")]
        for name in files:
            if name.startswith(".") or name.endswith(_SKIP_SUFFIXES):
                continue
            p = Path(d) / name
            found.append((p.relative_to(root).as_posix(), p))
    return sorted(found)


def hash_files(files: Iterable[tuple[str, Path]]) -> str:
    """The fingerprint of ``(label, path)`` pairs, in the order given: SHA-256
    over each label, the file's length and its bytes (length-prefixed, so no
    two different file sets give the same byte stream), first
    :data:`FINGERPRINT_HEX` hex digits."""
    h = hashlib.sha256()
    for label, path in files:
        data = Path(path).read_bytes()
        h.update(f"{label}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:FINGERPRINT_HEX]


@functools.cache
def code_fingerprint() -> str:
    """A short hash (16 hex digits) of the code that computes results here.

    It covers the ``qsengine`` package's Python sources and shipped data and the
    compiled core's bytes; it changes whenever any of them does and not
    otherwise (not with modification times or the install location). Sweep
    checkpoints, results files and the study's report record it, so a result
    says which code made it. Computed once per process.
    """
    import qsengine
    from qsengine import _core

    root = Path(qsengine.__file__).resolve().parent
    return hash_files([*package_files(root), ("<_core extension>", Path(_core.__file__))])
