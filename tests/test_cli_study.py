"""The command line: every flag described, bad input refused with a clear
message (0 is never 'unset'), progress only on a terminal, Ctrl-C on Dask
says what was kept and how to resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qsengine.cli import build_parser, main


def _subparsers(parser):
    import argparse

    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return a.choices
    raise AssertionError("no sub-commands")


def test_every_flag_of_every_command_is_described():
    missing = []
    for name, sub in _subparsers(build_parser()).items():
        for a in sub._actions:
            if a.option_strings and a.dest != "help" and not (a.help or "").strip():
                missing.append(f"{name} {a.option_strings[0]}")
            if not a.option_strings and a.dest != "help" and not (a.help or "").strip():
                missing.append(f"{name} {a.dest}")
    assert not missing, missing


def test_min_gpus_is_a_command(capsys):
    assert "min-gpus" in _subparsers(build_parser())
    assert main(["min-gpus", "--model", "qwen3-30b-a3b", "--accelerator", "h100", "--context", "32K"]) == 0
    assert "GPUs (plan" in capsys.readouterr().out


@pytest.mark.parametrize("argv, msg", [
    (["study", "--q", "0"], "0 is not 'unset'"),
    (["study", "--slo-tpot-ms", "0"], "0 is not 'unset'"),
    (["simulate", "--model", "deepseek-v3", "--cluster", "8xh200", "--context", "8K", "--slo-tpot-ms", "0"],
     "0 is not 'unset'"),
    (["simulate", "--model", "deepseek-v3", "--cluster", "8xh200", "--context", "8K", "--q", "0"],
     "0 is not 'unset'"),
    (["study", "--microbatches", "-1"], "'auto'"),
    (["study", "--precision", "fp7"], "invalid choice"),
])
def test_bad_flags_refused_by_the_parser(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


@pytest.mark.parametrize("argv, msg", [
    (["study", "--clusters", "8xh100", "8xH2000", "--contexts", "4K"], "8xH2000"),
    (["study", "--models", "llama-3.1-70b", "--contexts", "4K"], "is dense"),
    (["study", "--models", "deepseek-v4", "--contexts", "4K"], "did you mean"),
    (["simulate", "--model", "deepseek-v3", "--dense", "mixtral-8x7b", "--cluster", "8xh200", "--context", "8K"],
     "is an MoE model"),
    (["study", "--contexts", "4K", "12Q"], "context=12Q: must be a number of tokens like 32768, 32K or 1M"),
    (["study", "--contexts", "0"], "context=0: must be >= 1 token"),
    (["simulate", "--model", "deepseek-v3", "--cluster", "8xh200", "--context", "0"], "context=0"),
    (["pack", "--model", "deepseek-v3", "--cluster", "8xh200", "--context", "12Q"], "context=12Q"),
    (["min-gpus", "--model", "deepseek-v3", "--accelerator", "h200", "--context", "1.1K"], "whole number"),
])
def test_bad_values_refused_before_any_work(argv, msg, capsys, tmp_path):
    assert main([*argv, *(["--out", str(tmp_path / "o")] if argv[0] == "study" else [])]) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_study_accepts_128k_and_prints_the_answer_first(tmp_path, capsys):
    assert main(["study", "--models", "qwen3-30b-a3b", "--clusters", "8xh100", "--contexts", "4K", "128K",
                 "--microbatches", "0", "--out", str(tmp_path), "--no-figures"]) == 0
    cap = capsys.readouterr()
    lines = cap.out.splitlines()
    assert lines[0].startswith("qsengine study")
    assert any(ln.strip().startswith("8×H100") and "4K–128K" in ln or "4K:" in ln for ln in lines)
    assert "\r" not in cap.err  # no progress bar off a terminal
    assert (tmp_path / "summary.md").is_file()


def test_sweep_without_microbatches_is_closed_form(tmp_path, capsys):
    f = tmp_path / "s.toml"
    f.write_text('[grid]\nmodel = ["qwen3-30b-a3b"]\ncluster = ["8xh100"]\ncontext = [4096, 8192]\n')
    assert main(["sweep", str(f), "--out", str(tmp_path / "o"), "--seed", "1"]) == 0
    cap = capsys.readouterr()
    assert "closed form (microbatches = 0)" in cap.err and "\r" not in cap.err
    import pandas as pd

    assert set(pd.read_csv(tmp_path / "o" / "results.csv")["in_microbatches"]) == {0}


def test_sweep_with_monte_carlo_prints_its_estimate_first(tmp_path, capsys):
    f = tmp_path / "s.toml"
    f.write_text('[grid]\nmodel = ["qwen3-30b-a3b"]\ncluster = ["8xh100"]\ncontext = [4096, 8192]\n'
                 'microbatches = [10]\n')
    assert main(["sweep", str(f), "--out", str(tmp_path / "o"), "--seed", "1"]) == 0
    err = capsys.readouterr().err
    assert "2 Monte Carlo points; one took" in err and "so about" in err


def test_simulate_prints_its_settings(capsys):
    assert main(["simulate", "--model", "qwen3-30b-a3b", "--cluster", "8xh100", "--context", "32K",
                 "--microbatches", "0", "--seed", "3", "--slo-tpot-ms", "50"]) == 0
    out = capsys.readouterr().out
    for text in ("precision bf16", "routing", "twin", "p99 TPOT <= 50 ms", "seed 3", "qsengine",
                 "objective: highest throughput"):
        assert text in out, text


def test_pack_auto_names_its_objective(capsys):
    main(["pack", "--model", "qwen3-30b-a3b", "--cluster", "8xh100", "--context", "8K"])
    assert "largest admissible cluster batch" in capsys.readouterr().out


def test_ctrl_c_on_dask_prints_no_tracebacks_and_how_to_resume(tmp_path):
    pytest.importorskip("distributed")
    out = tmp_path / "o"
    argv = ["study", "--models", "qwen3-30b-a3b", "--clusters", "8xh100", "8xh200", "--contexts", "4K", "8K",
            "16K", "32K", "64K", "128K", "--microbatches", "400", "--out", str(out), "--no-figures",
            "--workers", "1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "qsengine", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if list(Path(out).glob("checkpoint/*/chunk-*.parquet")):
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        os.killpg(proc.pid, signal.SIGINT)  # like Ctrl-C: the whole foreground process group
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    assert "points are kept in" in stderr and "resume with: qsengine study --models qwen3-30b-a3b" in stderr
    assert "WARNING" not in stderr and "CancelledError" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 2, stderr  # what was kept, and the command that resumes


def test_report_states_its_aggregation_and_renders_many_contexts(tmp_path, capsys):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qsengine.sweep_cli import _aggregated, report

    ctx = ", ".join(str(4096 * (i + 1)) for i in range(20))
    f = tmp_path / "s.toml"
    f.write_text(f'[grid]\nmodel = ["qwen3-30b-a3b"]\ncluster = ["8xh100", "32xh100"]\ncontext = [{ctx}]\n'
                 'q = [2.0, 3.0]\nmicrobatches = [0]\n')
    assert main(["sweep", str(f), "--out", str(tmp_path / "o"), "--seed", "1"]) == 0
    import pandas as pd

    df = pd.read_parquet(tmp_path / "o" / "results.parquet")
    assert _aggregated(df, ("in_model", "in_cluster", "in_context")) == "q (2 values)"
    titles = []
    orig = plt.Figure.savefig

    def keep(fig, *a, **k):
        titles.append(fig._suptitle.get_text() if fig._suptitle else "")
        ticks = [t.get_text() for ax in fig.axes for t in ax.get_xticklabels()]
        assert "32×H100" in [t.get_text() for ax in fig.axes for t in ax.get_yticklabels()] or "32×H100" in str(
            [h.get_label() for leg in fig.legends for h in leg.legend_handles])
        assert not any("2^" in t or "$" in t for t in ticks), ticks
        return orig(fig, *a, **k)

    plt.Figure.savefig = keep
    try:
        paths = report(tmp_path / "o")
    finally:
        plt.Figure.savefig = orig
    assert [p.name for p in paths] == ["ratio_heatmap.png", "break_even_q.png", "throughput.png"]
    assert all("median over q (2 values)" in t for t in titles), titles


def test_ctrl_c_in_process_says_what_was_kept_and_resumes(tmp_path, capsys, monkeypatch):
    import qsengine.sweeps.run as sw

    real = sw.simulate_point
    calls = {"n": 0}

    def stop_after_8(kwargs, seed, threads):
        if calls["n"] >= 8:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(kwargs, seed, threads)

    argv = ["study", "--models", "qwen3-30b-a3b", "--clusters", "8xh100", "8xh200", "--contexts", "4K", "8K", "16K",
            "32K", "64K", "128K", "--microbatches", "10", "--twins", "same", "--out", str(tmp_path), "--no-figures"]
    monkeypatch.setattr(sw, "simulate_point", stop_after_8)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted; 8 of 12 points are kept in" in err
    resume = err.split("resume with: ")[1].strip()
    assert resume == "qsengine " + " ".join(argv)
    monkeypatch.setattr(sw, "simulate_point", real)
    assert main(resume.split()[1:]) == 0
    assert "12 points (4 computed, 8 resumed)" in capsys.readouterr().out
