"""Loading Hugging Face config.json files (hand-written samples in tests/data/hf
with the published configs' fields)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qsengine import SpecError, load_model

DATA = Path(__file__).parent / "data" / "hf"


@pytest.mark.parametrize(
    "file,preset",
    [
        ("deepseek-v3.json", "deepseek-v3"),
        ("qwen3-235b-a22b.json", "qwen3-235b-a22b"),
        ("mixtral-8x7b.json", "mixtral-8x7b"),
        ("llama-3.1-8b.json", "llama-3.1-8b"),
        ("gpt-oss-120b.json", "gpt-oss-120b"),
    ],
)
def test_hf_config_reproduces_shipped_preset(file, preset):
    hf = load_model(DATA / file)
    ref = load_model(preset)
    assert hf.id.startswith(preset)  # from _name_or_path, e.g. "mixtral-8x7b-v0.1"
    assert hf.params_by_component() == ref.params_by_component()
    assert hf.total_params == ref.total_params
    assert hf.active_params == ref.active_params
    assert hf.kv_bytes_per_token() == ref.kv_bytes_per_token()
    assert hf.kv_bytes_per_token_long() == ref.kv_bytes_per_token_long()
    assert hf.attention == ref.attention


def test_deepseek_v3_structure_equals_preset():
    hf = load_model(DATA / "deepseek-v3.json")
    ref = load_model("deepseek-v3")
    keep = dict(id=ref.id, name=ref.name, source=ref.source, published_total_params=ref.published_total_params,
                published_active_params=ref.published_active_params)
    assert hf.replace(**keep) == ref


def _write(tmp_path, cfg, name="config.json"):
    p = tmp_path / name
    p.write_text(json.dumps(cfg))
    return p


def test_hf_id_override_and_dir_name(tmp_path):
    cfg = json.loads((DATA / "llama-3.1-8b.json").read_text())
    del cfg["_name_or_path"]
    d = tmp_path / "My-Llama"
    d.mkdir()
    assert load_model(_write(d, cfg)).id == "my-llama"
    assert load_model(_write(d, cfg), id="x").id == "x"


def test_hf_heads_must_divide_hidden_without_head_dim(tmp_path):
    cfg = json.loads((DATA / "llama-3.1-8b.json").read_text())
    cfg["hidden_size"] = 4100
    with pytest.raises(SpecError, match=r"config.json: field 'hidden_size' = 4100: must be divisible by num_attention_heads \(32\)"):
        load_model(_write(tmp_path, cfg))
    cfg["head_dim"] = 128  # explicit head_dim: no such rule
    assert load_model(_write(tmp_path, cfg)).hidden_size == 4100


def test_hf_bad_inputs(tmp_path):
    cfg = json.loads((DATA / "mixtral-8x7b.json").read_text())
    bad = dict(cfg, num_experts_per_tok=9)
    with pytest.raises(SpecError, match=r"field 'num_experts_per_tok' = 9: must be <= num_local_experts \(8\)"):
        load_model(_write(tmp_path, bad))
    bad = dict(cfg, hidden_size="4096")
    with pytest.raises(TypeError, match=r"field 'hidden_size' = '4096': must be an integer"):
        load_model(_write(tmp_path, bad))
    bad = dict(cfg)
    del bad["num_local_experts"]
    bad["num_local_expert"] = 8
    with pytest.raises(SpecError, match=r"missing required key 'num_local_experts'.*did you mean 'num_local_expert'"):
        load_model(_write(tmp_path, bad))
    with pytest.raises(SpecError, match=r"field 'model_type' = 'mixtrall': unsupported.*did you mean 'mixtral'"):
        load_model(_write(tmp_path, dict(cfg, model_type="mixtrall")))
    p = tmp_path / "broken.json"
    p.write_text("{not json")
    with pytest.raises(SpecError, match="invalid JSON"):
        load_model(p)


def _err(tmp_path, cfg) -> str:
    with pytest.raises((SpecError, TypeError)) as e:
        load_model(_write(tmp_path, cfg))
    return str(e.value)


def test_hf_errors_use_the_files_own_keys(tmp_path):
    """Messages name config.json keys, never qsengine's internal field names."""
    mix = json.loads((DATA / "mixtral-8x7b.json").read_text())
    assert "field 'num_experts_per_tok' = 16: must be <= num_local_experts (8)" in _err(
        tmp_path, dict(mix, num_experts_per_tok=16))
    assert "field 'num_attention_heads' = 32: must be divisible by num_key_value_heads (5)" in _err(
        tmp_path, dict(mix, num_key_value_heads=5))
    assert "field 'hidden_size' = '4096'" in _err(tmp_path, dict(mix, hidden_size="4096"))
    ds = json.loads((DATA / "deepseek-v3.json").read_text())
    assert "field 'topk_group' = 9: must be <= n_group (8)" in _err(tmp_path, dict(ds, topk_group=9))
    assert "field 'num_experts_per_tok' = 300: must be <= n_routed_experts (256)" in _err(
        tmp_path, dict(ds, num_experts_per_tok=300))


def test_hf_missing_keys_say_missing(tmp_path):
    assert "missing required key 'model_type'" in _err(tmp_path, {})
    llama = json.loads((DATA / "llama-3.1-8b.json").read_text())
    del llama["num_attention_heads"]
    msg = _err(tmp_path, llama)
    assert "missing required key 'num_attention_heads'" in msg
    assert "did you mean" not in msg  # attention_dropout is a real key, not a typo of this one
