"""Known defects the fuzz oracle (tests/_fuzz.py, ``_mentions``) exposes in
modules this suite's owner does not edit, one deterministic case each.

Each is ``xfail(strict=True)`` naming the file to fix: when the message is
fixed the case passes, the strict xfail fails, and the case and its entry in
``_fuzz.KNOWN_DEFECTS`` (which lets the randomized fuzz run count these as
"known defect" instead of failing) are to be removed together.
"""

from __future__ import annotations

import pytest

import qsengine as q
from _fuzz import KNOWN_DEFECTS, _mentions


def _message(call) -> str:
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    return str(info.value)


def _names_input(entry: str, call, names: list[str]) -> None:
    msg = _message(call)
    assert _mentions(msg, names), f"{entry}: {msg!r} does not name {names}"


#: (entry, call, names) of each known defect: none open. A defect the oracle
#: finds in a module whose owner fixes it later goes here as an
#: ``xfail(strict=True)`` param with its entry in ``_fuzz.KNOWN_DEFECTS``.
CASES: list = []


@pytest.mark.parametrize("entry, call, names", CASES)
def test_known_defect(entry, call, names):
    _names_input(entry, call, names)


def test_every_known_defect_has_a_case():
    assert sorted(KNOWN_DEFECTS) == sorted({c.values[0] for c in CASES})
    assert sum(len(v) for v in KNOWN_DEFECTS.values()) == len(CASES)


@pytest.mark.parametrize("call, names", [
    (lambda: q.Placement.explicit(3), ["expert_map", "placement"]),
    (lambda: q.Placement.explicit(["x"]), ["expert_map", "placement"]),
    (lambda: q.Placement.explicit([0, 1.5]), ["expert_map", "placement"]),
], ids=["not-iterable", "not-int", "float"])
def test_placement_explicit_names_its_input(call, names):
    """Fixed (were known defects): Placement.explicit names expert_map and the bad entry."""
    _names_input("routing specs", call, names)


@pytest.mark.parametrize("msg, names, named", [
    ("unsupported operand type(s) for *: 'NoneType' and 'int'", ["q", "tp", "ep"], False),
    ("min() arg is an empty sequence", ["q", "ep", "min"], False),
    ("Plan: field 'tp' = 0: must be positive", ["tp"], True),
    ("plan.tp=3: must divide num_heads (8)", ["tp"], True),
    ("routing.weights[1]=nan: weights must be finite", ["routing"], True),
    ("cost.b: must be 1-D, got shape ()", ["cost"], True),
    ("/tmp/x/model.toml: field 'top_k' = 300: must be <= routed_experts (256)", ["/tmp/x/model.toml"], True),
    ("field 'model' = 'nope': no shipped spec of that name", ["nope"], True),
    ("grid point 0: unknown field ''; known fields: model", [repr("")], True),
    ("stop=3", ["top"], False),
    ("the q value is bad", ["q"], False),
])
def test_oracle_needs_the_package_formats(msg, names, named):
    assert _mentions(msg, names) is named


def test_simulate_names_twin_attention_itself():
    """Fixed (was a known defect): the point validator names simulate's own field."""
    _names_input("simulate", lambda: q.simulate("mixtral-8x7b", "8xh100", 4096, twin_attention=b"bytes",
                                                microbatches=0, break_even=False), ["twin_attention"])
