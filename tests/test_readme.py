"""Every ```python block of README.md runs as written (in a temporary
directory, so anything a snippet writes lands there), and the numbers the
README states in its comments are the ones the code gives."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks() -> list[tuple[str, str]]:
    """(section heading, code) of every ```python block, in order."""
    text = README.read_text()
    out, section = [], "top"
    for m in re.finditer(r"^## ([^\n]+)$|^```python\n(.*?)^```", text, re.S | re.M):
        if m.group(1) is not None:
            section = m.group(1).strip()
        else:
            out.append((section, m.group(2)))
    return out


BLOCKS = _blocks()


def test_readme_has_python_blocks():
    sections = [s for s, _ in BLOCKS]
    assert len(BLOCKS) >= 5, sections
    assert any(s.startswith("Packing") for s in sections) and any(s.startswith("Specs") for s in sections)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("section, code", BLOCKS, ids=[f"{i}-{s.split(':')[0]}" for i, (s, _) in enumerate(BLOCKS)])
def test_readme_block_runs(section, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(code, f"{README} ({section})", "exec"), ns)  # noqa: S102 - our own README
    if section.startswith("Specs"):
        # the values the README states in its comments
        m = ns["m"]
        assert m.id == "deepseek-v3"
        assert (round(m.total_params / 1e9, 1), round(m.active_params / 1e9, 1), round(m.sparsity, 4)) == (
            671.0, 36.6, 0.0546)
        assert m.kv_bytes_per_token() == 70272
        assert ns["twin"].kv_bytes_per_token() == m.kv_bytes_per_token()
        r = ns["qsengine"].qs(m, "sqrt")
        assert (round(r.q, 2), round(r.qs, 3), str(r.verdict)) == (4.28, 0.234, "moe-disadvantaged")
        assert ns["cluster"].num_gpus == 8
    if section.startswith("Packing"):
        assert ns["p"].feasible and ns["model"].id == "deepseek-v3"
