"""Fuzz the spec loaders: load_model / load_accelerator / load_cluster on
generated TOML text and Hugging Face config.json (valid, mutated, truncated,
garbage). Rules in tests/_fuzz.py: a validated spec or a ValueError/TypeError
(SpecError) naming the file."""

from __future__ import annotations

import copy
import json
import math
import tomllib
from pathlib import Path

import tomli_w
from hypothesis import given
from hypothesis import strategies as st

import qsengine as q
from _fuzz import fuzz_settings, outcome
from qsengine.specs.loaders import spec_dir

SPECS = spec_dir()
HF = Path(__file__).parent / "data" / "hf"
MODEL_DOCS = {p.stem: tomllib.loads(p.read_text()) for p in sorted((SPECS / "models").glob("*.toml"))}
ACC_DOCS = {p.stem: tomllib.loads(p.read_text()) for p in sorted((SPECS / "accelerators").glob("*.toml"))}
CLUSTER_DOCS = {p.stem: tomllib.loads(p.read_text()) for p in sorted((SPECS / "clusters").glob("*.toml"))}
HF_DOCS = {p.stem: json.loads(p.read_text()) for p in sorted(HF.glob("*.json"))}

# Values a hand-written file might hold by mistake (all TOML/JSON-representable).
BAD_VALUES = st.one_of(
    st.sampled_from([0, -1, 1, 2, 3, 7, 2**31, 2**53 + 1, 2**63 - 1, -(2**63), 0.0, -0.5, 0.5, 1.5, 1e-300, 1e300,
                     math.nan, math.inf, -math.inf, True, False, "", "1", "nan", "é", "🙂" * 3, "a" * 500,
                     [], [1, 2], ["x"], {}, {"k": 1}, {"nested": {"deep": [1, {"x": math.nan}]}}]),
    st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=True), st.text(max_size=12),
)


def _paths(doc, prefix=()):
    for k, v in doc.items():
        yield prefix + (k,)
        if isinstance(v, dict):
            yield from _paths(v, prefix + (k,))


@st.composite
def mutated(draw, docs: dict):
    """A shipped document with 0-3 mutations: change a value, delete a key,
    add an unknown key (sometimes a near-miss of a real one)."""
    name = draw(st.sampled_from(sorted(docs)))
    doc = copy.deepcopy(docs[name])
    for _ in range(draw(st.integers(0, 3))):
        paths = list(_paths(doc))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        op = draw(st.sampled_from(["set", "set", "delete", "add"]))
        if op == "set":  # deepcopy: sampled values are shared between test cases
            parent[path[-1]] = copy.deepcopy(draw(BAD_VALUES))
        elif op == "delete":
            del parent[path[-1]]
        else:
            key = draw(st.one_of(st.text(min_size=1, max_size=10), st.just(path[-1] + "s"),
                                 st.just(path[-1].upper())))
            parent[key] = copy.deepcopy(draw(BAD_VALUES))
    return doc


def _toml_text(doc) -> str | None:
    try:
        return tomli_w.dumps(doc)
    except (TypeError, ValueError):  # e.g. a None or a non-str key: not TOML-representable
        return None


@st.composite
def file_bytes(draw, docs, kind: str) -> bytes:
    """Bytes of a spec file: a mutated document, maybe truncated or with junk."""
    doc = draw(mutated(docs))
    if kind == "json":
        text = json.dumps(doc, allow_nan=True)
    else:
        text = _toml_text(doc)
        if text is None:
            text = _toml_text(docs[sorted(docs)[0]])
    data = text.encode()
    how = draw(st.sampled_from(["whole"] * 5 + ["truncate", "garbage", "prefix", "empty", "binary", "deep"]))
    if how == "truncate":
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    elif how == "garbage":
        data = draw(st.binary(max_size=200))
    elif how == "prefix":
        data = draw(st.text(max_size=30)).encode() + data
    elif how == "empty":
        data = b""
    elif how == "binary":
        data = data[:40] + b"\xff\xfe\x00\x80" + data[40:]
    elif how == "deep":  # nesting bombs
        data = (b"[" * 5000 + b"]" * 5000) if kind == "json" else b"a = " + b"[" * 5000 + b"]" * 5000
    return data


def _check_model(m: q.Model) -> None:
    assert m.total_params > 0 and math.isfinite(m.total_params)
    assert 0 < m.active_params <= m.total_params
    assert math.isfinite(m.kv_bytes_per_token()) and m.kv_bytes_per_token() >= 0
    if m.is_moe:
        assert 0 < m.sparsity <= 1


@fuzz_settings(200)
@given(data=file_bytes(MODEL_DOCS, "toml"))
def test_fuzz_load_model_toml(tmp_path_factory, data):
    p = tmp_path_factory.mktemp("m") / "model.toml"
    p.write_bytes(data)
    m = outcome("load_model (TOML)", lambda: q.load_model(p), [str(p)])
    if m is not None:
        _check_model(m)


@fuzz_settings(150)
@given(data=file_bytes(HF_DOCS, "json"))
def test_fuzz_load_model_hf_config(tmp_path_factory, data):
    p = tmp_path_factory.mktemp("hf") / "config.json"
    p.write_bytes(data)
    m = outcome("load_model (config.json)", lambda: q.load_model(p), [str(p)])
    if m is not None:
        _check_model(m)


@fuzz_settings(100)
@given(cfg=mutated(HF_DOCS))
def test_fuzz_model_from_hf_config_object(cfg):
    """The parsed-JSON entry point (no file): NaN/inf reach it as floats."""
    m = outcome("model_from_hf_config", lambda: q.specs.loaders.model_from_hf_config(cfg, "cfg.json"), ["cfg.json"])
    if m is not None:
        _check_model(m)


@fuzz_settings(120)
@given(data=file_bytes(ACC_DOCS, "toml"))
def test_fuzz_load_accelerator_toml(tmp_path_factory, data):
    p = tmp_path_factory.mktemp("a") / "gpu.toml"
    p.write_bytes(data)
    a = outcome("load_accelerator", lambda: q.load_accelerator(p), [str(p)])
    if a is not None:
        assert a.hbm_bytes > 0 and math.isfinite(a.hbm_bytes)
        assert 0 < a.usable_bytes <= a.hbm_bytes
        assert all(v > 0 and math.isfinite(v) for v in a.flops.values())


@fuzz_settings(120)
@given(data=file_bytes(CLUSTER_DOCS, "toml"))
def test_fuzz_load_cluster_toml(tmp_path_factory, data):
    p = tmp_path_factory.mktemp("c") / "cluster.toml"
    p.write_bytes(data)
    c = outcome("load_cluster", lambda: q.load_cluster(p), [str(p)])
    if c is not None:
        assert c.num_gpus >= 1 and c.accelerator.hbm_bytes > 0


NAMES = st.one_of(st.sampled_from(["8xh100", "8xH200", "72xGB200", "8x h200", "0xh100", "-8xh100", "1e3xh100",
                                   "99999999999999999999999xh100", "8xnope", "x", "", " ", "8x", "h100",
                                   "deepseek-v3", "DeepSeek_V3", "deepsek-v3", "../../etc/passwd", "a.toml",
                                   "/nonexistent/config.json", "🙂", "\x00"]),
                  st.text(max_size=16))


@fuzz_settings(150)
@given(name=NAMES, which=st.sampled_from(["model", "accelerator", "cluster"]))
def test_fuzz_load_by_name(name, which):
    load = {"model": q.load_model, "accelerator": q.load_accelerator, "cluster": q.load_cluster}[which]
    spec = outcome(f"load_{which} (name)", lambda: load(name), [repr(name), name.strip() or repr(name), which])
    if spec is not None and which == "cluster":
        assert spec.num_gpus >= 1


def test_oversized_and_non_utf8_spec_files_refused(tmp_path):
    from qsengine.specs.loaders import MAX_SPEC_BYTES

    big = tmp_path / "big.toml"
    big.write_bytes(b"# " + b"x" * (MAX_SPEC_BYTES + 1))
    for load in (q.load_model, q.load_accelerator, q.load_cluster):
        try:
            load(big)
        except q.SpecError as exc:
            assert str(big) in str(exc) and "bytes" in str(exc)
        else:
            raise AssertionError("oversized file accepted")
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\xff\xfe{}")
    try:
        q.load_model(bad)
    except q.SpecError as exc:
        assert "UTF-8" in str(exc) and str(bad) in str(exc)
    else:
        raise AssertionError("non-UTF-8 file accepted")
