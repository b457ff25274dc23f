"""Fuzz the command line: ``qsengine.cli.main(argv)`` with random argv built
from the real sub-commands and options and garbage values.

Allowed: a return code (0 ok, 1 infeasible, 2 bad input with a message on
stderr) or argparse's SystemExit (usage error 2, --help/--version 0). Any
other exception is a bug. ``study`` and ``routing-study`` run full studies
(minutes) even with valid arguments, so they are fuzzed with --help only;
counts are kept small so a valid command finishes quickly.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from _fuzz import COUNTS, fuzz_settings
from qsengine.cli import build_parser, main

_PARSER = build_parser()
_SUB = _PARSER._subparsers._group_actions[0].choices  # name -> ArgumentParser
SLOW = {"study", "routing-study"}
OPTIONS = {name: [s for a in p._actions for s in a.option_strings if s not in ("-h", "--help")]
           for name, p in _SUB.items()}
TAKES_VALUE = {s for p in _SUB.values() for a in p._actions for s in a.option_strings if a.nargs != 0}

VALUES = st.one_of(
    st.sampled_from(["0", "1", "2", "3", "4", "8", "16", "64", "-1", "1.5", "nan", "inf", "-inf", "1e400",
                     "99999999999999999999999", "", " ", "é", "🙂", "--", "-", "auto", "uniform", "powerlaw:1.0",
                     "powerlaw:nan", "zipf", "8xh100", "8xH200", "0xh100", "h100", "qwen3-30b-a3b", "mixtral-8x7b",
                     "deepseek-v3", "llama-3.1-8b", "nope", "fp8", "bf16", "fp7", "tp8-pp1-dp1-ep8", "tp3",
                     "models", "clusters", "accelerators", "precisions", "/nonexistent", "../../etc/passwd",
                     "grid.toml", "results", "tcp://127.0.0.1:1", "a" * 300]),
    st.text(max_size=8),
)
SMALL = {"--microbatches": ["0", "1", "5", "-1", "x"], "--experts": ["1", "8", "16", "0"], "--top-k": ["1", "2", "9"],
         "--model": ["qwen3-30b-a3b", "mixtral-8x7b", "llama-3.1-8b", "nope"], "--cluster": ["8xh100", "1xh100", "0xh1"],
         "--precision": ["fp8", "bf16", "fp7"], "--plan": ["auto", "tp8-pp1-dp1-ep8", "tp3", "x"],
         "--gpus": ["1", "4", "0"], "--seed": ["1", "-1", "x"], "--threads": ["1", "0"], "--replicas": ["0", "4", "-1"],
         "--routing": ["uniform", "powerlaw:1.0", "zipf", "powerlaw:nan"], "--q": ["2", "0", "nan", "sqrt"],
         "--slo-tpot-ms": ["50", "0", "nan"], "--chunk-size": ["1", "0"], "--out": ["{dir}/o"],
         "--dense": ["llama-3.1-8b", "deepseek-v3"],
         "--batch": ["1", "4", "16", "0"], "--layers": ["1", "2", "0"], "--context": ["1", "4096", "32768", "0",
                                                                                       "-5", "1e9"]}


@st.composite
def argvs(draw):
    if draw(st.integers(0, 9)) == 0:  # pure garbage
        return draw(st.lists(st.one_of(VALUES, st.sampled_from(sorted(_SUB)), st.just("--help")), max_size=6))
    name = draw(st.sampled_from(sorted(_SUB)))
    if name in SLOW:
        return [name, "--help"]
    argv = [name]
    if name == "list":
        argv.append(draw(st.one_of(st.sampled_from(["models", "accelerators", "clusters", "precisions"]), VALUES)))
    elif name == "show":
        argv.append(draw(VALUES))
    elif name in ("sweep", "report"):
        argv.append(draw(st.sampled_from(["{grid}", "{bad}", "/nonexistent", "", "{dir}"])))
    opts = OPTIONS[name]
    for _ in range(draw(st.integers(0, 6))):
        o = draw(st.sampled_from(opts)) if opts else "--x"
        if o in ("--workers", "--scheduler"):  # no clusters started or dialled from the fuzzer
            continue
        argv.append(o)
        if o not in TAKES_VALUE:
            continue
        if o in SMALL and draw(st.integers(0, 5)):
            argv.append(draw(st.sampled_from(SMALL[o])))
        elif draw(st.integers(0, 9)):
            argv.append(draw(VALUES))
    if name in ("simulate", "pack"):  # required options, mostly valid
        for o, v in (("--model", "qwen3-30b-a3b"), ("--cluster", "8xh100"), ("--context", "4096")):
            if o not in argv and draw(st.integers(0, 5)):
                argv += [o, v]
    if name in ("route",) and "--microbatches" not in argv:
        argv += ["--microbatches", "5"]
    if name == "simulate" and "--microbatches" not in argv:
        argv += ["--microbatches", "0"]
    return argv


@fuzz_settings(250)
@given(argv=argvs())
def test_fuzz_cli(tmp_path_factory, argv, capsys):
    d = tmp_path_factory.mktemp("cli")
    grid = d / "grid.toml"
    grid.write_text('[grid]\nmodel = ["qwen3-30b-a3b"]\ncluster = ["8xh100"]\ncontext = [4096]\n'
                    'microbatches = [0]\nbreak_even = [false]\n')
    bad = d / "bad.toml"
    bad.write_text("[grid\nmodel = ")
    argv = [a.format(grid=grid, bad=bad, dir=d) if "{" in a and "}" in a else a for a in argv]
    if argv and argv[0] == "sweep" and "--out" not in argv:
        argv += ["--out", str(d / "out")]
    cwd = os.getcwd()
    os.chdir(d)  # anything written lands in the temporary directory
    try:
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse: usage error or --help/--version
            COUNTS["cli"][f"SystemExit({exc.code})"] += 1
            assert exc.code in (0, 2), exc.code
            return
        except BaseException as exc:
            COUNTS["cli"][f"BUG:{type(exc).__name__}"] += 1
            raise
    finally:
        os.chdir(cwd)
    COUNTS["cli"][f"rc={rc}"] += 1
    out, err = capsys.readouterr()
    assert rc in (0, 1, 2), rc
    if rc == 2 and argv and argv[0] in _SUB:
        assert err.strip(), "exit code 2 without a message"
    if rc == 2 and err.startswith("qsengine: error:"):
        assert len(err) > len("qsengine: error: ") + 3
