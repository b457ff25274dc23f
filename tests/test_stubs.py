"""The hand-written stub python/qsengine/_core.pyi matches the built module.

Two checks: mypy.stubtest (names, kinds, properties vs attributes, read-only
fields, enum members, ...; its allowlist tests/stubtest_allowlist.txt holds only
what it cannot judge, with reasons), and, because pybind11 functions carry no
``__text_signature__`` for stubtest to read, the parameter names and which
parameters have defaults against the signatures pybind11 writes into each
docstring.
"""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

import qsengine
from qsengine import _core

HERE = Path(__file__).resolve().parent
STUB = Path(qsengine.__file__).resolve().parent / "_core.pyi"


def test_stubtest_passes(tmp_path):
    pytest.importorskip("mypy", reason="mypy is in the test extra: pip install '.[test]'")
    env = dict(os.environ, MYPY_CACHE_DIR=str(tmp_path / "mypy_cache"))
    p = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "qsengine._core", "--concise",
         "--allowlist", str(HERE / "stubtest_allowlist.txt")],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert p.returncode == 0, f"stubtest found mismatches:\n{p.stdout}\n{p.stderr}"


def _split_top(s: str) -> list[str]:
    """Split at commas outside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def _runtime_params(obj: object, name: str, method: bool) -> list[tuple[str, bool]] | None:
    """(name, has default) of each parameter from pybind11's docstring signature
    (None when the docstring has no single signature, e.g. overloads)."""
    doc = (getattr(obj, "__doc__", None) or "").strip()
    head = doc.split("\n", 1)[0]
    if not head.startswith(name + "(") or "Overloaded function." in doc:
        return None
    depth, end = 0, None
    for i, ch in enumerate(head[len(name):], start=len(name)):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth == 0:
            end = i
            break
    params = []
    for part in _split_top(head[len(name) + 1:end]):
        if part in ("/", "*") or part.startswith("*"):
            continue
        pname = part.split(":", 1)[0].split("=", 1)[0].strip()
        params.append((pname, "=" in part.split(":", 1)[-1] or "=" in part))
    return params[1:] if method else params


def _stub_params(fn: ast.FunctionDef, method: bool) -> list[tuple[str, bool]]:
    a = fn.args
    pos = a.posonlyargs + a.args
    n_def = len(a.defaults)
    out = [(x.arg, i >= len(pos) - n_def) for i, x in enumerate(pos)]
    out += [(x.arg, d is not None) for x, d in zip(a.kwonlyargs, a.kw_defaults)]
    return out[1:] if method else out


def _stub_functions():
    tree = ast.parse(STUB.read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            yield node.name, None, node
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, ast.FunctionDef) and not any(
                        isinstance(d, (ast.Name, ast.Attribute)) and (getattr(d, "id", None) == "property"
                                                                      or getattr(d, "attr", None) == "setter")
                        for d in sub.decorator_list):
                    yield sub.name, node.name, sub


def test_stub_parameters_match_pybind11_signatures():
    checked, mismatches = 0, []
    for name, cls, fn in _stub_functions():
        owner = _core if cls is None else getattr(_core, cls)
        obj = getattr(owner, name)
        if cls is not None and not inspect.isroutine(obj):
            continue
        rt = _runtime_params(obj, name, method=cls is not None)
        if rt is None:
            continue
        st = _stub_params(fn, method=cls is not None)
        checked += 1
        if rt != st:
            mismatches.append(f"{cls + '.' if cls else ''}{name}: runtime {rt}, stub {st}")
    assert not mismatches, "\n".join(mismatches)
    # every module-level function and the bound constructors were compared
    assert checked >= 20, checked
