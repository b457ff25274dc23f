"""Loading specs by name, from TOML files and from Hugging Face ``config.json``.

Shipped specs live in ``qsengine/cluster_specs/{models,accelerators,clusters}/``
(the repository's top-level ``cluster_specs/`` points there) and are installed
with the package. Names are case-insensitive; a few aliases map common short
names to a shipped spec (``"H200"`` -> ``"h200-sxm"``).

Files are parsed with :mod:`tomllib` / :mod:`json` only (never evaluated), and
files larger than :data:`MAX_SPEC_BYTES` are refused. A parsed ``config.json``
is translated by :func:`qsengine.specs.hf.model_from_hf_config` (re-exported
here).

TOML schemas (units in each shipped file's header):

* model: the :class:`~qsengine.specs.model.Model` field names at top level and
  an ``[attention]`` table with the :class:`~qsengine.specs.model.Attention`
  field names. ``head_dim`` may be omitted, then it is ``hidden_size /
  num_heads`` (which must divide). ``name`` defaults to ``id``.
* accelerator: ``hbm_gb``, ``hbm_bandwidth_tbps``, ``scaleup_bandwidth_gb_s``
  (unidirectional, per GPU), ``internode_bandwidth_gbit_s``,
  ``runtime_reserve_gb``, a ``[flops_tflops]`` table, and the remaining
  :class:`~qsengine.specs.hardware.Accelerator` fields by name.
* cluster: ``name``, ``accelerator`` (a shipped name or alias), ``num_gpus``,
  ``source``, ``notes``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from qsengine.errors import SpecError
from qsengine.specs._validate import check_float, check_int, check_keys, did_you_mean, spec_source, type_fail
from qsengine.specs.hardware import Accelerator, Cluster
from qsengine.specs.hf import model_from_hf_config
from qsengine.specs.model import Attention, Model
from qsengine.specs.precision import PRESETS, Precision, as_precision

__all__ = [
    "MAX_SPEC_BYTES",
    "accelerators",
    "as_accelerator",
    "as_cluster",
    "as_model",
    "as_precision",
    "clusters",
    "default_precision",
    "load_accelerator",
    "load_cluster",
    "load_model",
    "model_from_hf_config",
    "models",
    "precisions",
    "spec_dir",
]

#: Largest spec file the loaders read (bytes).
MAX_SPEC_BYTES = 4 * 1024 * 1024

MODEL_ALIASES: dict[str, str] = {
    "switch-c": "switch-c-2048",
    "gpt-oss": "gpt-oss-120b",
    "qwen3-235b": "qwen3-235b-a22b",
    "qwen3-30b": "qwen3-30b-a3b",
    "maverick": "llama-4-maverick",
    "scout": "llama-4-scout",
    "kimi-k2-instruct": "kimi-k2",
}
ACCELERATOR_ALIASES: dict[str, str] = {
    "a100": "a100-80gb-sxm",
    "a100-80gb": "a100-80gb-sxm",
    "a100-sxm": "a100-80gb-sxm",
    "h100": "h100-sxm",
    "h100-sxm5": "h100-sxm",
    "h200": "h200-sxm",
    "v5p": "tpu-v5p",
    "tpuv5p": "tpu-v5p",
    "v6e": "tpu-v6e",
    "tpuv6e": "tpu-v6e",
    "trillium": "tpu-v6e",
}

_MODEL_FIELDS = [f.name for f in dataclasses.fields(Model) if f.name != "attention"]
_ATTENTION_FIELDS = [f.name for f in dataclasses.fields(Attention)]
_MODEL_REQUIRED = ["id", "num_layers", "hidden_size", "vocab_size", "dense_layers", "moe_layers", "attention"]
_ATTENTION_REQUIRED = ["kind", "num_heads", "num_kv_heads"]

# accelerator TOML key -> (Accelerator field, factor to SI)
_ACC_UNITS: dict[str, tuple[str, float]] = {
    "hbm_gb": ("hbm_bytes", 1e9),
    "hbm_bandwidth_tbps": ("hbm_bandwidth", 1e12),
    "scaleup_bandwidth_gb_s": ("scaleup_bandwidth", 1e9),
    "internode_bandwidth_gbit_s": ("internode_bandwidth", 1e9 / 8),
    "runtime_reserve_gb": ("runtime_reserve_bytes", 1e9),
}
_ACC_PLAIN = [
    "id", "name", "vendor", "source", "notes", "gpus_per_node", "scaleup_domain", "bandwidth_efficiency",
    "flops_efficiency", "link_efficiency", "usable_hbm_fraction", "kv_fraction", "flops_efficiency_by_dtype",
    "scaleup_topology", "torus_dims", "torus_wraparound",
]
_ACC_REQUIRED = ["id", "hbm_gb", "hbm_bandwidth_tbps", "scaleup_bandwidth_gb_s", "internode_bandwidth_gbit_s",
                 "gpus_per_node", "scaleup_domain", "flops_tflops"]
_CLUSTER_KEYS = ["name", "accelerator", "num_gpus", "source", "notes"]


# ------------------------------------------------------------------ files
def spec_dir() -> Path:
    """Directory holding the shipped spec files."""
    try:
        p = Path(str(resources.files("qsengine") / "cluster_specs"))
        if p.is_dir():
            return p
    except (ModuleNotFoundError, TypeError):  # pragma: no cover
        pass
    return Path(__file__).resolve().parent.parent / "cluster_specs"


@lru_cache(maxsize=None)
def _shipped(kind: str) -> dict[str, Path]:
    d = spec_dir() / kind
    return {p.stem: p for p in sorted(d.glob("*.toml"))}


def models() -> list[str]:
    """Names of the shipped model specs."""
    return list(_shipped("models"))


def accelerators() -> list[str]:
    """Names of the shipped accelerator specs."""
    return list(_shipped("accelerators"))


def clusters() -> list[str]:
    """Names of the shipped cluster specs."""
    return list(_shipped("clusters"))


def precisions() -> list[str]:
    """Names of the precision presets."""
    return list(PRESETS)


def _read(path: Path, label: str, kind: str = "spec files", limit: int = MAX_SPEC_BYTES) -> str:
    """The UTF-8 text of a regular file of at most ``limit`` bytes (SpecError
    naming ``label`` otherwise; ``kind`` names the files in the size message)."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise SpecError(f"{label}: cannot read: {exc.strerror or exc}") from None
    if not path.is_file():
        raise SpecError(f"{label}: not a regular file")
    if size > limit:
        raise SpecError(f"{label}: file is {size} bytes: {kind} must be <= {limit} bytes")
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise SpecError(f"{label}: cannot read: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise SpecError(f"{label}: {kind} must be <= {limit} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{label}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _parse_toml(text: str, label: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{label}: invalid TOML: {exc}") from None
    except RecursionError:  # arrays/tables nested thousands deep
        raise SpecError(f"{label}: invalid TOML: nested too deeply") from None


def _read_toml(path: Path, label: str) -> dict[str, Any]:
    return _parse_toml(_read(path, label), label)


def _label(path: Path, shipped: bool) -> str:
    return path.name if shipped else str(path)


def _looks_like_path(x: str | os.PathLike[str]) -> bool:
    if isinstance(x, os.PathLike):
        return True
    return x.endswith((".toml", ".json")) or os.sep in x or "/" in x


def _is_file(name: str) -> bool:
    try:
        return Path(name).is_file()
    except (OSError, ValueError):  # name too long, NUL byte, ...: not a file we can read
        return False


def _norm(name: str) -> str:
    return re.sub(r"[\s_]+", "-", name.strip().lower())


def _lookup(kind: str, name: str, aliases: dict[str, str]) -> Path:
    shipped = _shipped(kind)
    key = _norm(name)
    key = aliases.get(key, key)
    if key in shipped:
        return shipped[key]
    hint = did_you_mean(key, list(shipped) + list(aliases))
    raise SpecError(f"field {kind[:-1]!r} = {name!r}: no shipped spec of that name{hint}; known: {', '.join(shipped)}")


# ------------------------------------------------------------------ models
def model_from_dict(d: dict[str, Any], label: str) -> Model:
    """Build a :class:`Model` from the TOML schema (a parsed table)."""
    with spec_source(label):
        check_keys(label, d, _MODEL_FIELDS + ["attention"])
        for key in _MODEL_REQUIRED:
            if key not in d:
                raise SpecError(f"{label}: missing required field {key!r}")
        att = d["attention"]
        if not isinstance(att, dict):
            raise type_fail(label, "attention", att, "a table ([attention])")
        check_keys(label, att, _ATTENTION_FIELDS, where="attention")
        att = dict(att)
        if att.get("kind") == "mha":
            att.setdefault("num_kv_heads", att.get("num_heads"))
        for key in _ATTENTION_REQUIRED:
            if key not in att:
                raise SpecError(f"{label}: missing required field 'attention.{key}'")
        if "head_dim" not in att:
            h = check_int(label, "attention.num_heads", att["num_heads"], minimum=1)
            d_model = check_int(label, "hidden_size", d["hidden_size"], minimum=1)
            if att.get("kind") == "mla":
                raise SpecError(f"{label}: missing required field 'attention.head_dim' (required for kind 'mla')")
            if d_model % h:
                raise SpecError(f"{label}: field 'hidden_size' = {d_model}: must be divisible by attention.num_heads "
                                f"({h}) when attention.head_dim is not given")
            att["head_dim"] = d_model // h
        kw = {k: v for k, v in d.items() if k != "attention"}
        kw.setdefault("name", kw["id"])
        return Model(attention=Attention(**att), **kw)


def model_to_dict(m: Model) -> dict[str, Any]:
    """The TOML-schema form of ``m`` (defaults and ``None`` omitted)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(Model):
        v = getattr(m, f.name)
        if f.name == "attention":
            continue
        if v is None:
            continue
        if f.name in _MODEL_REQUIRED or f.name == "name" or v != f.default:
            out[f.name] = v
    att: dict[str, Any] = {}
    for f in dataclasses.fields(Attention):
        v = getattr(m.attention, f.name)
        if v is None:
            continue
        if f.name in ("kind", "num_heads", "num_kv_heads", "head_dim") or v != f.default:
            att[f.name] = v
    out["attention"] = att
    return out


def model_to_toml(m: Model) -> str:
    import tomli_w

    header = f"# qsengine model spec: {m.name} (written by Model.to_toml)\n"
    return header + tomli_w.dumps(model_to_dict(m))


def model_from_toml_text(text: str, label: str = "<toml>") -> Model:
    if not isinstance(text, str):
        raise TypeError(f"{label}: TOML text must be a str, got {type(text).__name__}")
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError(f"{label}: spec text must be <= {MAX_SPEC_BYTES} bytes")
    return model_from_dict(_parse_toml(text, label), label)


def load_model(spec: str | os.PathLike[str] | Model, *, id: str | None = None) -> Model:
    """A :class:`Model` from a shipped name (``"deepseek-v3"``, case-insensitive),
    a TOML file in the shipped schema, or a Hugging Face ``config.json``
    (DeepSeek-V3/Kimi-K2, Qwen3-MoE, Mixtral, Llama/Mistral/Qwen dense,
    gpt-oss). ``id`` overrides the id of a model read from ``config.json``."""
    if isinstance(spec, Model):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"model: must be a Model, a name or a path, got {type(spec).__name__}")
    if _looks_like_path(spec) or (isinstance(spec, str) and _is_file(spec)):
        path = Path(spec)
        label = os.fspath(spec)  # as the user wrote it (Path() drops a trailing slash)
        text = _read(path, label)
        if path.suffix == ".json":
            try:
                cfg = json.loads(text)
            except json.JSONDecodeError as exc:
                raise SpecError(f"{label}: invalid JSON: {exc}") from None
            except RecursionError:  # arrays/objects nested thousands deep
                raise SpecError(f"{label}: invalid JSON: nested too deeply") from None
            if id is None:
                id = _hf_id(cfg, path)
            return model_from_hf_config(cfg, label, id=id)
        return model_from_dict(_parse_toml(text, label), label)
    path = _lookup("models", spec, MODEL_ALIASES)
    return _load_shipped_model(path)


@lru_cache(maxsize=None)
def _load_shipped_model(path: Path) -> Model:
    label = _label(path, True)
    return model_from_dict(_read_toml(path, label), label)


# ------------------------------------------------------------------ Hugging Face
def _hf_id(cfg: Any, path: Path) -> str:
    if isinstance(cfg, dict) and isinstance(cfg.get("_name_or_path"), str) and cfg["_name_or_path"].strip():
        return _norm(cfg["_name_or_path"].rstrip("/").split("/")[-1])
    if path.name == "config.json" and path.parent.name:
        return _norm(path.parent.name)
    return _norm(path.stem)


# ------------------------------------------------------------------ accelerators
def accelerator_from_dict(d: dict[str, Any], label: str) -> Accelerator:
    """Build an :class:`Accelerator` from the TOML schema (units converted)."""
    with spec_source(label):
        check_keys(label, d, _ACC_PLAIN + list(_ACC_UNITS) + ["flops_tflops"])
        for key in _ACC_REQUIRED:
            if key not in d:
                raise SpecError(f"{label}: missing required field {key!r}")
        kw: dict[str, Any] = {k: d[k] for k in _ACC_PLAIN if k in d}
        kw.setdefault("name", kw["id"])
        for key, (fname, factor) in _ACC_UNITS.items():
            if key in d:
                # validate in the file's units so the message shows what was written
                v = check_float(label, key, d[key], allow_zero=(key == "runtime_reserve_gb"))
                kw[fname] = v * factor
        fl = d["flops_tflops"]
        if not isinstance(fl, dict):
            raise type_fail(label, "flops_tflops", fl, "a table of dtype = TFLOP/s")
        flops: dict[str, float] = {}
        for k, v in fl.items():
            flops[k] = check_float(label, f"flops_tflops.{k}", v) * 1e12
        kw["flops"] = flops
        return Accelerator(**kw)


def load_accelerator(spec: str | os.PathLike[str] | Accelerator) -> Accelerator:
    """An :class:`Accelerator` from a shipped name (``"h200-sxm"``, alias
    ``"H200"``; case-insensitive) or a TOML file."""
    if isinstance(spec, Accelerator):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"accelerator: must be an Accelerator, a name or a path, got {type(spec).__name__}")
    if _looks_like_path(spec):
        path = Path(spec)
        label = os.fspath(spec)  # as the user wrote it (Path() drops a trailing slash)
        return accelerator_from_dict(_read_toml(path, label), label)
    return _load_shipped_accelerator(_lookup("accelerators", spec, ACCELERATOR_ALIASES))


@lru_cache(maxsize=None)
def _load_shipped_accelerator(path: Path) -> Accelerator:
    label = _label(path, True)
    return accelerator_from_dict(_read_toml(path, label), label)


# ------------------------------------------------------------------ clusters
_CLUSTER_RE = re.compile(r"^\s*(\d+)\s*[x×*]\s*(\S.*?)\s*$", re.IGNORECASE)


def cluster_from_dict(d: dict[str, Any], label: str) -> Cluster:
    with spec_source(label):
        check_keys(label, d, _CLUSTER_KEYS)
        for key in ("accelerator", "num_gpus"):
            if key not in d:
                raise SpecError(f"{label}: missing required field {key!r}")
        acc = d["accelerator"]
        if not isinstance(acc, str):
            raise type_fail(label, "accelerator", acc, "an accelerator name")
        try:
            accelerator = load_accelerator(acc)
        except SpecError as exc:
            raise SpecError(f"{label}: field 'accelerator' = {acc!r}: {exc}") from None
        return Cluster(accelerator, d["num_gpus"], name=d.get("name", ""), source=d.get("source", accelerator.source),
                       notes=d.get("notes", ""))


def load_cluster(spec: str | os.PathLike[str] | Cluster) -> Cluster:
    """A :class:`Cluster` from a shipped name (``"8xh200"``), a count and an
    accelerator name (``"8xH200"``, ``"72xGB200"``, ``"8x h200"``), or a TOML
    file."""
    if isinstance(spec, Cluster):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"cluster: must be a Cluster, a name or a path, got {type(spec).__name__}")
    if _looks_like_path(spec):
        path = Path(spec)
        label = os.fspath(spec)  # as the user wrote it (Path() drops a trailing slash)
        return cluster_from_dict(_read_toml(path, label), label)
    shipped = _shipped("clusters")
    key = re.sub(r"\s+", "", spec.strip().lower())
    if key in shipped:
        return _load_shipped_cluster(shipped[key])
    m = _CLUSTER_RE.match(spec)
    if not m:
        raise SpecError(f"field 'cluster' = {spec!r}: expected a shipped name or 'N x ACCELERATOR' such as '8xH200'"
                        f"{did_you_mean(key, shipped)}; known: {', '.join(shipped)}")
    n = int(m.group(1))
    try:
        acc = load_accelerator(m.group(2))
    except SpecError as exc:
        raise SpecError(f"cluster {spec!r}: {exc}") from None
    # the canonical shipped cluster of that shape, if any
    for path in shipped.values():
        c = _load_shipped_cluster(path)
        if c.num_gpus == n and c.accelerator == acc:
            return c
    if n < 1:
        raise SpecError(f"cluster {spec!r}: field 'num_gpus' = {n}: must be positive")
    with spec_source(f"cluster {spec!r}"):
        return Cluster(acc, n)


@lru_cache(maxsize=None)
def _load_shipped_cluster(path: Path) -> Cluster:
    label = _label(path, True)
    return cluster_from_dict(_read_toml(path, label), label)


# ------------------------------------------------------------------ defaults
#: Precision of a model whose spec names none (a hand-built Model, a TOML file
#: without ``deployed_precision``, a Hugging Face config without a
#: ``quantization_config``): bf16, the dtype of most reference checkpoints.
FALLBACK_PRECISION = "bf16"


def default_precision(model: Model | str | os.PathLike[str]) -> Precision:
    """The precision every entry point uses when none is given
    (``simulate``, ``pack``, ``min_gpus``, ``rank_plans``, ``sweep``, the
    study and every CLI command): the model's ``deployed_precision`` (the
    developer's reference checkpoint, with its source in
    ``deployed_precision_source``), else :data:`FALLBACK_PRECISION` (bf16).
    A Hugging Face config's ``quantization_config`` sets it (``fp8`` ->
    ``"fp8"``, ``mxfp4`` -> ``"mxfp4-experts"``)."""
    m = as_model(model)
    return as_precision(m.deployed_precision or FALLBACK_PRECISION)


# ------------------------------------------------------------------ as_*
def as_model(x: Model | str | os.PathLike[str]) -> Model:
    """A :class:`Model` from itself, a shipped name or a path."""
    return load_model(x)


def as_accelerator(x: Accelerator | str | os.PathLike[str]) -> Accelerator:
    """An :class:`Accelerator` from itself, a shipped name/alias or a path."""
    return load_accelerator(x)


def as_cluster(x: Cluster | str | os.PathLike[str]) -> Cluster:
    """A :class:`Cluster` from itself, a shipped name, ``"8xH200"`` or a path."""
    return load_cluster(x)


_: Callable[..., Precision] = as_precision  # re-exported
