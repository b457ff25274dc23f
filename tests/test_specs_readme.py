"""The README's specs example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_specs_example_runs():
    text = README.read_text()
    section = text[text.index("## Specs"):]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block, "README specs section has a python example"
    ns: dict = {}
    exec(compile(block.group(1), str(README), "exec"), ns)  # noqa: S102 - our own README
    m = ns["m"]
    assert m.id == "deepseek-v3" and ns["twin"].kv_bytes_per_token() == m.kv_bytes_per_token()
    assert ns["cluster"].num_gpus == 8
