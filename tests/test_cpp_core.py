"""The C++ core builds and passes its own tests without Python or pybind11.

Configures ``cpp/core`` with ``-DQSENGINE_BUILD_TESTS=ON`` (no SKBUILD, so
the binding layer is not built) and runs its ctest executables
(``cpp/core/*.test.cc``). Skipped only when the source tree is not present
(e.g. testing an installed wheel from elsewhere).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (ROOT / "cpp" / "core").is_dir(), reason="needs the source tree")
@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ctest") is None, reason="needs cmake")
def test_core_builds_alone_and_passes_ctest(tmp_path):
    build = tmp_path / "build"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), "-DQSENGINE_BUILD_TESTS=ON",
                    "-DCMAKE_BUILD_TYPE=Release", *gen], check=True, capture_output=True, text=True)
    subprocess.run(["cmake", "--build", str(build), "--parallel", "2"], check=True, capture_output=True, text=True)
    out = subprocess.run(["ctest", "--test-dir", str(build), "--output-on-failure"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "100% tests passed" in out.stdout
    # The core library never needs pybind11: nothing under cpp/core includes it.
    for src in (ROOT / "cpp" / "core").glob("*"):
        assert "pybind11" not in src.read_text(errors="ignore"), src
