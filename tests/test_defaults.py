"""One set of defaults: every entry point runs a model at its deployed
precision when none is given (qsengine.default_precision)."""

from __future__ import annotations

import json
import tomllib

import pytest

import qsengine
from qsengine.cli import main
from qsengine.specs.loaders import spec_dir

SHIPPED = qsengine.models()


@pytest.mark.parametrize("name", SHIPPED)
def test_each_shipped_model_names_its_deployed_precision_and_source(name):
    doc = tomllib.loads((spec_dir() / "models" / f"{name}.toml").read_text())
    assert doc["deployed_precision"] in qsengine.PRECISIONS
    assert doc["deployed_precision_source"].startswith("https://")
    assert qsengine.default_precision(name) == qsengine.PRECISIONS[doc["deployed_precision"]]


def test_known_deployed_precisions():
    got = {m: qsengine.default_precision(m).name for m in ("deepseek-v3", "kimi-k2", "gpt-oss-120b",
                                                           "mixtral-8x7b", "qwen3-235b-a22b")}
    assert got == {"deepseek-v3": "fp8", "kimi-k2": "fp8", "gpt-oss-120b": "mxfp4-experts",
                   "mixtral-8x7b": "bf16", "qwen3-235b-a22b": "bf16"}


def test_fallback_and_hf_quantization_config(tmp_path):
    m = qsengine.load_model("deepseek-v3").replace(deployed_precision=None)
    assert qsengine.default_precision(m).name == "bf16"  # documented fallback
    cfg = json.loads((qsengine.specs.loaders.Path(__file__).parent / "data" / "hf" / "mixtral-8x7b.json").read_text())
    assert qsengine.default_precision(qsengine.specs.loaders.model_from_hf_config(cfg)).name == "bf16"
    cfg["quantization_config"] = {"quant_method": "fp8"}
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    assert qsengine.default_precision(str(p)).name == "fp8"
    cfg["quantization_config"] = {"quant_method": "mxfp4"}
    p.write_text(json.dumps(cfg))
    assert qsengine.default_precision(str(p)).name == "mxfp4-experts"


def test_dense_twin_is_served_like_its_moe():
    m = qsengine.load_model("deepseek-v3")
    assert qsengine.default_precision(m.dense_twin("sqrt")) == qsengine.default_precision(m)


def test_bad_deployed_precision_refused():
    m = qsengine.load_model("deepseek-v3")
    with pytest.raises(ValueError, match="deployed_precision"):
        m.replace(deployed_precision="fp7")


@pytest.mark.parametrize("model, cluster, context", [("deepseek-v3", "8xh200", 32768),
                                                     ("qwen3-30b-a3b", "8xh100", 8192)])
def test_pack_min_gpus_rank_plans_use_it(model, cluster, context):
    d = qsengine.default_precision(model)
    assert qsengine.pack(model, cluster, context).precision == d
    assert qsengine.pack(model, cluster, context).cluster_batch == \
        qsengine.pack(model, cluster, context, precision=d).cluster_batch
    acc = qsengine.load_cluster(cluster).accelerator
    assert qsengine.min_gpus(model, acc, 131072) == qsengine.min_gpus(model, acc, 131072, precision=d)
    a = qsengine.rank_plans(model, cluster, context)
    b = qsengine.rank_plans(model, cluster, context, precision=d)
    assert a.equals(b)


def test_cli_commands_use_it(capsys):
    assert main(["simulate", "--model", "deepseek-v3", "--cluster", "8xH200", "--context", "128K", "--q", "4",
                 "--microbatches", "0", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "settings: precision fp8" in out and "MoE" in out and "infeasible" not in out.split("settings")[0]
    main(["pack", "--model", "deepseek-v3", "--cluster", "8xh200", "--context", "8K"])
    assert "precision fp8" in capsys.readouterr().out
    assert main(["min-gpus", "--model", "deepseek-v3", "--accelerator", "H200", "--context", "128K"]) == 0
    assert "at fp8" in capsys.readouterr().out


def test_study_and_cli_simulate_agree(tmp_path, capsys):
    """The issue's case: simulate said 'MoE infeasible' (bf16) where the study ran fp8."""
    from qsengine.study import StudyConfig, run_study

    df = run_study(StudyConfig(models=("deepseek-v3",), clusters=("8xH200",), contexts=(131072,), q=4.0,
                               microbatches=0, out=tmp_path), figures=False)
    main(["simulate", "--model", "deepseek-v3", "--cluster", "8xH200", "--context", "131072", "--q", "4",
          "--microbatches", "0", "--json"])
    rec = json.loads(capsys.readouterr().out)
    assert rec["moe"]["feasible"] == bool(df["moe_feasible"].iloc[0]) is True
    assert rec["moe"]["cluster_batch"] == int(df["moe_batch"].iloc[0])
    assert rec["inputs"]["precision"]["name"] == df["precision"].iloc[0] == "fp8"


def test_simulate_and_sweep_resolve_none_to_the_deployed_precision():
    res = qsengine.simulate("deepseek-v3", "8xh200", 8192, microbatches=0, break_even=False)
    assert res.inputs["precision"]["name"] == "fp8"
    df = qsengine.sweep({"model": ["deepseek-v3"], "cluster": ["8xh200"], "context": [8192], "microbatches": [0]},
                        progress=False, seed=1)
    assert int(df["moe_batch"].iloc[0]) == qsengine.simulate("deepseek-v3", "8xh200", 8192, precision="fp8",
                                                             microbatches=0).to_record()["moe_batch"]
