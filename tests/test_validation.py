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
from qsengine.validation.cli import MEASUREMENTS, METRICS, REQUIRED, load_measurements, validate


def test_shipped_measurements_are_complete():
    rows = load_measurements()
    assert len(rows) >= 30
    kinds = [r["kind"] for r in rows]
    assert kinds.count("dense") >= 10 and kinds.count("moe") >= 10
    vendors = {load_accelerator(r["accelerator"]).vendor for r in rows}
    assert {"NVIDIA", "AMD"} <= vendors
    for r in rows:
        needed = set(REQUIRED) - {"etp", "concurrency", "context", "input_len", "output_len"} | set(METRICS[r["metric"]])
        for c in needed:  # etp empty = the plan's default; the rest per metric
            assert r[c] != "", (r["id"], c)
        assert r["source_url"].startswith("https://") and r["notes"]
        assert load_model(r["model"]).is_moe == (r["kind"] == "moe"), r["id"]
        assert int(r["gpus"]) == int(r["tp"]) * int(r["pp"]) * int(r["dp"])
    assert len({r["id"] for r in rows}) == len(rows)
    # one source with both kinds, so the MoE-vs-dense bias is measured within one engine and method
    both = {r["source_url"] for r in rows if r["kind"] == "moe"} & {r["source_url"] for r in rows if r["kind"] == "dense"}
    assert both


def _subset(tmp_path, ids, name="subset.csv", **fields):
    """The shipped rows ``ids`` written to ``tmp_path/name``, with ``fields`` set in each."""
    with open(MEASUREMENTS, newline="") as fh:
        rows = [{**r, **fields} for r in csv.DictReader(fh) if r["id"] in ids]
    path = tmp_path / name
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


OFFLINE = {"trtllm-qwen3-30b-a3b-b200-tp1-fp4-1000-1000", "trtllm-llama-3.1-70b-h200-tp2-fp8-8192-1024"}


def _side_tps(r, batch=None):
    """The pipeline's end-to-end output tokens/s per GPU of the row's side, computed here directly."""
    import qsengine

    moe = r["kind"] == "moe"
    rec = qsengine.simulate(model=r["model"] if moe else "qwen3-30b-a3b", dense=None if moe else r["model"],
                            cluster=f"{r['gpus']}x{r['accelerator']}", context=int(r["input_len"]),
                            output=int(r["output_len"]), prefill="colocated",
                            plan=Plan(tp=int(r["tp"]), ep=int(r["ep"]), etp=int(r["etp"]) if r["etp"] else None,
                                      attn_dp=bool(int(r["attn_dp"]))),
                            precision=r["precision"], microbatches=0, slo_tpot=None, batch=batch).to_record()
    side = "moe" if moe else "dense"
    return rec[f"{side}_request_tokens_per_s_per_gpu"], rec[f"{side}_batch"]


def test_offline_rows_are_the_pipelines_end_to_end_throughput_over_the_benchmarks_waves(tmp_path):
    path, rows = _subset(tmp_path, OFFLINE)
    steady = {r["id"]: _side_tps(r) for r in rows}
    # without a request count: the steady state at the HBM-maximum batch
    no_n, _ = _subset(tmp_path, OFFLINE, "steady.csv", requests="")
    rep0 = validate(no_n)
    for r, v in zip(rows, rep0.rows, strict=True):
        assert v.metric == "output_tps_per_gpu" and v.measured_tps == float(r["value"])
        assert v.predicted_tps == pytest.approx(steady[r["id"]][0], rel=1e-12)
    # with it: N requests in waves of B, the last one the remainder
    rep = validate(path)
    for r, v in zip(rows, rep.rows, strict=True):
        tps, b = steady[r["id"]]
        n = int(r["requests"])
        waves = [b] * (n // b) + ([n % b] if n % b else [])
        rate = {w: tps if w == b else _side_tps(r, batch=w)[0] for w in set(waves)}
        assert v.predicted_tps == pytest.approx(n / sum(w / rate[w] for w in waves), rel=1e-12)
        assert len(waves) >= 2  # both rows exercise a remainder wave


def test_whole_waves_give_the_steady_state_and_one_short_wave_its_own_batch(tmp_path):
    path, rows = _subset(tmp_path, {"trtllm-llama-3.1-70b-h200-tp2-fp8-8192-1024"})
    tps, b = _side_tps(rows[0])
    for n, expect in ((3 * b, tps), (b // 2, _side_tps(rows[0], batch=b // 2)[0])):
        p, _ = _subset(tmp_path, {rows[0]["id"]}, f"n{n}.csv", requests=str(n))
        assert validate(p).rows[0].predicted_tps == pytest.approx(expect, rel=1e-12)
    assert _side_tps(rows[0], batch=b // 2)[0] < tps  # a smaller batch serves less: the waves matter


def test_summary_per_source_is_the_summary_of_its_rows(tmp_path):
    path, _ = _subset(tmp_path, IDS | OFFLINE)
    rep = validate(path)
    assert set(rep.by_source) == {"dstackai/benchmarks", "LambdaLabsML/vllm-benchmark", "NVIDIA/TensorRT-LLM"}
    for src, sm in rep.by_source.items():
        sub = [x for x in rep.rows if x.source == src]
        assert sm.rows == len(sub)
        assert sm.mape == pytest.approx(np.mean([abs(x.ratio - 1) for x in sub]), rel=1e-12)
    assert sum(sm.rows for sm in rep.by_source.values()) == len(rep.rows)


def test_request_count_only_for_offline_rows(tmp_path):
    bad, _ = _subset(tmp_path, {"dsr1-h200-sglang-c16"}, "bad.csv", requests="100")
    with pytest.raises(ValueError, match=r"field 'requests' = '100': only for metric 'output_tps_per_gpu'"):
        validate(bad)
    off = {"trtllm-llama-3.1-70b-h200-tp2-fp8-8192-1024"}
    bad2, _ = _subset(tmp_path, off, "bad2.csv", requests="15.5")
    with pytest.raises(ValueError, match=r"field 'requests' = '15.5': must be an integer"):
        validate(bad2)
    bad3, _ = _subset(tmp_path, off, "bad3.csv", output_len="")
    with pytest.raises(ValueError, match=r"field 'output_len' = '': must be a finite number > 0"):
        validate(bad3)
