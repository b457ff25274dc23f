"""qsengine.code_fingerprint: which code computed a result.

The fingerprint must change with any byte of the package's sources, data or
compiled core, and with nothing else (modification times, install location,
byte-code caches). The installed package is never modified: the properties are
checked on a copy of it, hashed by the same functions.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

import qsengine
from qsengine import _core
from qsengine._fingerprint import FINGERPRINT_HEX, hash_files, package_files

ROOT = Path(qsengine.__file__).resolve().parent
CORE = ("<_core extension>", Path(_core.__file__))


def _fingerprint(root: Path, core: Path = CORE[1]) -> str:
    return hash_files([*package_files(root), (CORE[0], core)])


@pytest.fixture
def copy(tmp_path) -> Path:
    """A copy of the installed package directory, somewhere else."""
    dst = tmp_path / "site" / "qsengine"
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def test_stable_and_computed_from_the_package():
    fp = qsengine.code_fingerprint()
    assert re.fullmatch(f"[0-9a-f]{{{FINGERPRINT_HEX}}}", fp)
    assert qsengine.code_fingerprint() is fp  # cached: once per process
    assert qsengine.code_fingerprint.__wrapped__() == fp == _fingerprint(ROOT)  # a second computation agrees


def test_covers_sources_specs_and_calibration_data_only():
    rel = [r for r, _ in package_files(ROOT)]
    assert rel == sorted(rel) and len(rel) == len(set(rel))
    assert {"__init__.py", "_fingerprint.py", "sweeps/checkpoint.py", "decode/pipeline.py"} <= set(rel)
    assert any(r.startswith("cluster_specs/") and r.endswith(".toml") for r in rel)
    assert any(r.startswith("cluster_specs/") and r.endswith(".csv") for r in rel)
    assert not [r for r in rel if "__pycache__" in r or r.endswith((".pyc", ".so"))]


def test_independent_of_location_mtimes_and_caches(copy):
    assert _fingerprint(copy) == qsengine.code_fingerprint()
    for p in list(copy.rglob("*"))[:20]:
        os.utime(p, (1, 1))
    (copy / "__pycache__").mkdir(exist_ok=True)
    (copy / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"bytecode")
    (copy / ".init.py.swp").write_bytes(b"editor")
    assert _fingerprint(copy) == qsengine.code_fingerprint()


@pytest.mark.parametrize("change", ["source byte", "spec data", "new module", "renamed file", "core byte"])
def test_changes_with_any_byte_of_the_code(copy, tmp_path, change):
    core = CORE[1]
    if change == "source byte":
        p = copy / "decode" / "step.py"
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 1
        p.write_bytes(bytes(data))
    elif change == "spec data":
        p = next(iter(sorted((copy / "cluster_specs").rglob("*.toml"))))
        p.write_text(p.read_text() + "\n")
    elif change == "new module":
        (copy / "decode" / "extra.py").write_text("")
    elif change == "renamed file":  # same bytes under another path
        (copy / "sweeps" / "run.py").rename(copy / "sweeps" / "run2.py")
    else:
        core = tmp_path / "core.so"
        core.write_bytes(CORE[1].read_bytes() + b"\0")
    assert _fingerprint(copy, core) != qsengine.code_fingerprint()


def test_results_files_and_the_study_record_it(tmp_path, capsys):
    """`qsengine sweep`'s results.parquet and `qsengine study`'s outputs name the code, and the
    study's checkpoint written by other code is refused from the command line with the way out."""
    import pyarrow.parquet as pq

    from qsengine.cli import main
    from qsengine.study import StudyConfig, checkpoint_dir

    here = qsengine.code_fingerprint()
    grid = tmp_path / "g.toml"
    grid.write_text('[grid]\nmodel = ["qwen3-30b-a3b"]\ncluster = ["8xh100"]\ncontext = [4096]\n')
    assert main(["sweep", str(grid), "--out", str(tmp_path / "sw"), "--no-progress", "--seed", "1"]) == 0
    assert pq.read_schema(tmp_path / "sw" / "results.parquet").metadata[b"qsengine.code"] == here.encode()

    out = tmp_path / "study"
    argv = ["study", "--models", "qwen3-30b-a3b", "--clusters", "8xh100", "--contexts", "4K", "--microbatches", "0",
            "--twins", "same", "--out", str(out), "--no-figures", "--no-progress"]
    assert main(argv) == 0
    capsys.readouterr()
    table = pq.read_table(out / "results.parquet")
    assert table.schema.metadata[b"qsengine.code"] == here.encode()
    assert json.loads(table.schema.metadata[b"qsengine.study"])["qsengine_code"] == here
    assert set(table.column("qsengine_code").to_pylist()) == {here}
    assert f"(code {here})" in (out / "summary.md").read_text()

    ck = checkpoint_dir(StudyConfig(models=("qwen3-30b-a3b",), clusters=("8xh100",), contexts=("4K",),
                                    microbatches=0, twins=("same",), out=out))
    meta = json.loads((ck / "meta.json").read_text())
    (ck / "meta.json").write_text(json.dumps({**meta, "code": "0" * FINGERPRINT_HEX}))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"qsengine: error: checkpoint {ck} was written by other code" in err
    assert "0" * FINGERPRINT_HEX in err and here in err and "--no-resume" in err
    assert main([*argv, "--no-resume"]) == 0
    assert "(1 computed, 0 resumed)" in capsys.readouterr().out
    assert json.loads((ck / "meta.json").read_text())["code"] == here
