"""``qsengine validate``: the shipped measurement file's completeness, and the
command's arithmetic on a small subset checked against decode_step directly."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from qsengine import cli
from qsengine.specs import Plan, as_precision, load_accelerator, load_model
from qsengine.decode.step import decode_step
from qsengine.validation.cli import MEASUREMENTS, REQUIRED, load_measurements, validate


def test_shipped_measurements_are_complete():
    rows = load_measurements()
    assert len(rows) >= 30
    kinds = [r["kind"] for r in rows]
    assert kinds.count("dense") >= 10 and kinds.count("moe") >= 10
    vendors = {load_accelerator(r["accelerator"]).vendor for r in rows}
    assert {"NVIDIA", "AMD"} <= vendors
    for r in rows:
        for c in REQUIRED:
            if c != "etp":  # etp empty = the plan's default
                assert r[c] != "", (r["id"], c)
        assert r["source_url"].startswith("https://") and r["notes"]
        assert load_model(r["model"]).is_moe == (r["kind"] == "moe"), r["id"]
        assert int(r["gpus"]) == int(r["tp"]) * int(r["pp"]) * int(r["dp"])
    assert len({r["id"] for r in rows}) == len(rows)


def _subset(tmp_path, ids):
    with open(MEASUREMENTS, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["id"] in ids]
    path = tmp_path / "subset.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path, rows


IDS = {"dsr1-h200-sglang-c16", "dsr1-mi300x-vllm-c32", "llama405b-mi300x-vllm-b8", "llama-3.1-8b-h100-sxm-tp1-vllm-c10"}


def test_validate_matches_decode_step_and_the_summary_formulas(tmp_path):
    path, rows = _subset(tmp_path, IDS)
    rep = validate(path)
    assert len(rep.rows) == 4
    ratios = {}
    for r, v in zip(rows, rep.rows, strict=True):
        plan = Plan(tp=int(r["tp"]), ep=int(r["ep"]), etp=int(r["etp"]) if r["etp"] else None)
        st = decode_step(load_model(r["model"]), as_precision(r["precision"]), load_accelerator(r["accelerator"]),
                         plan, int(r["concurrency"]), float(r["context"]))
        assert v.predicted_tps == pytest.approx(int(r["concurrency"]) / st.time, rel=1e-12)
        assert v.measured_tps == pytest.approx(int(r["concurrency"]) / (float(r["value"]) / 1000), rel=1e-12)
        ratios[r["id"]] = (r["kind"], v.predicted_tps / v.measured_tps)
    allr = np.array([x for _, x in ratios.values()])
    assert rep.mape == pytest.approx(np.mean(np.abs(allr - 1)), rel=1e-12)
    moe = np.median([x for k, x in ratios.values() if k == "moe"])
    dense = np.median([x for k, x in ratios.values() if k == "dense"])
    assert rep.moe_dense_bias == pytest.approx(moe / dense, rel=1e-12)


def test_cli_prints_rows_summary_and_writes_the_figure(tmp_path, capsys):
    path, _ = _subset(tmp_path, IDS)
    fig = tmp_path / "v.png"
    assert cli.main(["validate", "--measurements", str(path), "--figure", str(fig)]) == 0
    out = capsys.readouterr().out
    for i in IDS:
        assert i in out
    assert "MAPE" in out and "MoE-vs-dense bias" in out
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_rows_are_rejected_naming_the_field(tmp_path):
    path, rows = _subset(tmp_path, {"dsr1-h200-sglang-c16"})
    text = path.read_text().replace("mean_tpot_ms", "p99_tpot_ms")
    bad = tmp_path / "bad.csv"
    bad.write_text(text)
    with pytest.raises(ValueError, match=r"field 'metric' = 'p99_tpot_ms'"):
        validate(bad)
    assert math.isfinite(validate(path).mape)


@pytest.mark.parametrize("content", [None, "", "a,b\n1,2\n", "\xff\xfe", "dir"])
def test_unreadable_or_malformed_files_are_value_errors(tmp_path, content):
    path = tmp_path / "m.csv"
    if content == "dir":
        path.mkdir()
    elif content == "\xff\xfe":
        path.write_bytes(b"\xff\xfe\x00bad")
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=r"measurements=|missing columns|no rows"):
        validate(path)


def test_truncated_row_names_the_missing_field(tmp_path):
    path, rows = _subset(tmp_path, {"dsr1-h200-sglang-c16"})
    lines = path.read_text().splitlines()
    (tmp_path / "t.csv").write_text(lines[0] + "\n" + ",".join(lines[1].split(",")[:5]) + "\n")
    with pytest.raises(ValueError, match=r"field .* is missing"):
        validate(tmp_path / "t.csv")


def test_unwritable_figure_is_a_value_error(tmp_path):
    path, _ = _subset(tmp_path, {"dsr1-h200-sglang-c16"})
    assert cli.main(["validate", "--measurements", str(path), "--figure", str(tmp_path / "no" / "x.png")]) == 2
