"""Session hooks shared by the whole suite.

Hypothesis examples are fixed (derandomized) unless QSENGINE_FUZZ_RANDOM=1.

The fuzz suite (tests/test_fuzz_*.py, machinery in tests/_fuzz.py) counts the
cases it ran per entry point; the counts are printed at the end of the session
and, if ``QSENGINE_FUZZ_COUNTS`` names a file, written there as JSON.
"""

from __future__ import annotations

import json
import os
import sys

from hypothesis import settings

# Property tests draw a fixed, reproducible set of examples (a red CI replays
# exactly); QSENGINE_FUZZ_RANDOM=1 draws fresh ones (nightly / exploration),
# like the fuzz suite.
settings.register_profile("fixed", derandomize=True)
settings.register_profile("random", derandomize=False)
settings.load_profile("random" if os.environ.get("QSENGINE_FUZZ_RANDOM", "0") == "1" else "fixed")


#: Under the sanitizer build (ci/sanitize.sh) property tests draw at most this many
#: examples (their explicit @example cases always run): that run hunts memory
#: errors in the C++ core, which a few draws reach as well as many, and the
#: normal run has already drawn every example. Keeps the sanitized suite's time
#: in proportion as oracle-checked physics grows.
SANITIZED_MAX_EXAMPLES = 4


def pytest_collection_modifyitems(config, items):
    if os.environ.get("QSENGINE_SANITIZED") != "1":
        return
    for item in items:
        fn = getattr(item, "obj", None)
        current = getattr(fn, "_hypothesis_internal_use_settings", None)
        if current is not None and current.max_examples > SANITIZED_MAX_EXAMPLES:
            fn._hypothesis_internal_use_settings = settings(current, max_examples=SANITIZED_MAX_EXAMPLES)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    fuzz = sys.modules.get("_fuzz")
    if fuzz is None or not fuzz.COUNTS:
        return
    counts = {entry: dict(c) for entry, c in sorted(fuzz.COUNTS.items())}
    total = sum(sum(c.values()) for c in counts.values())
    tr = terminalreporter
    tr.write_sep("-", f"fuzz cases: {total} (scale {fuzz.SCALE:g})")
    for entry, c in counts.items():
        detail = ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
        tr.write_line(f"  {entry:<22} {sum(c.values()):>6}   {detail}")
    path = os.environ.get("QSENGINE_FUZZ_COUNTS")
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump({"total": total, "scale": fuzz.SCALE, "entry_points": counts}, fh, indent=2, sort_keys=True)
