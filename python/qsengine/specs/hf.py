"""Hugging Face ``config.json`` -> :class:`~qsengine.specs.model.Model`.

:func:`model_from_hf_config` translates a parsed config of a supported
``model_type`` (DeepSeek-V3/Kimi-K2, Qwen3-MoE, Mixtral, Llama/Mistral/Qwen
dense, gpt-oss) into a validated Model, with its errors in the file's own key
names. Reading the file, its size limit and the model id taken from its path
are the loaders' (:func:`qsengine.specs.loaders.load_model`).
"""

from __future__ import annotations

import re
from typing import Any

from qsengine.errors import SpecError
from qsengine.specs._validate import check_int, did_you_mean, spec_source, type_fail
from qsengine.specs.model import Attention, Model

__all__ = ["model_from_hf_config"]


_HF_TYPES = ("deepseek_v3", "kimi_k2", "qwen3_moe", "mixtral", "llama", "mistral", "qwen2", "qwen3", "gpt_oss")


#: Hugging Face ``quantization_config.quant_method`` -> qsengine precision preset.
_HF_QUANT = {"fp8": "fp8", "mxfp4": "mxfp4-experts"}


def _hf_precision(cfg: dict[str, Any], label: str) -> dict[str, Any]:
    """``deployed_precision`` from a config's ``quantization_config`` (None:
    the bf16 fallback of :func:`default_precision`)."""
    qc = cfg.get("quantization_config")
    if not isinstance(qc, dict):
        return {}
    method = qc.get("quant_method")
    if method in _HF_QUANT:
        return {"deployed_precision": _HF_QUANT[method],
                "deployed_precision_source": f"{label}: quantization_config.quant_method = {method!r}"}
    return {}


def model_from_hf_config(cfg: Any, label: str = "config.json", *, id: str = "hf-model") -> Model:
    """Translate a Hugging Face ``config.json`` (parsed) into a :class:`Model`.

    Supported ``model_type``: ``deepseek_v3`` / ``kimi_k2`` (MLA, shared
    experts, group-limited routing, ``first_k_dense_replace`` dense layers),
    ``qwen3_moe`` (``decoder_sparse_step``, ``mlp_only_layers``), ``mixtral``,
    ``llama`` / ``mistral`` / ``qwen2`` / ``qwen3`` (dense), ``gpt_oss``
    (alternating sliding-window layers, biases). Multi-token-prediction
    modules (``num_nextn_predict_layers``) become ``mtp_layers``; they are not
    part of the parameters counted (``Model.mtp_params``).
    """
    if not isinstance(cfg, dict):
        raise type_fail(label, "<root>", type(cfg).__name__, "a JSON object")
    if cfg.get("model_type") is None:
        raise SpecError(f"{label}: missing required key 'model_type' (supported: {', '.join(_HF_TYPES)})")
    mt = cfg.get("model_type")
    if mt not in _HF_TYPES:
        raise SpecError(f"{label}: field 'model_type' = {mt!r}: unsupported; supported: {list(_HF_TYPES)}"
                        f"{did_you_mean(str(mt), _HF_TYPES)}")
    try:
        return _model_from_hf(cfg, label, mt, id)
    except (SpecError, TypeError) as exc:
        raise type(exc)(_hf_names(str(exc), mt, cfg)) from None


#: Every key the translator reads: a missing key's did-you-mean never points at one of these.
_HF_KEYS = frozenset({
    "model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
    "tie_word_embeddings", "max_position_embeddings", "head_dim", "first_k_dense_replace", "moe_layer_freq",
    "n_routed_experts", "n_shared_experts", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "q_lora_rank",
    "kv_lora_rank", "moe_intermediate_size", "intermediate_size", "num_experts_per_tok", "n_group", "topk_group",
    "sliding_window", "layer_types", "attention_bias", "experts_per_token", "num_local_experts", "num_experts",
    "decoder_sparse_step", "mlp_only_layers", "mlp_bias", "quantization_config", "num_nextn_predict_layers",
})


def _hf_field_names(mt: str) -> dict[str, str]:
    """qsengine Model field -> the config.json key it comes from, for ``mt``."""
    names = {
        "num_layers": "num_hidden_layers", "attention.num_heads": "num_attention_heads",
        "attention.num_kv_heads": "num_key_value_heads", "top_k": "num_experts_per_tok",
        "max_context": "max_position_embeddings", "tie_embeddings": "tie_word_embeddings",
        "attention.local_window": "sliding_window", "attention.qkv_bias": "attention_bias",
        "dense_intermediate": "intermediate_size", "mtp_layers": "num_nextn_predict_layers",
    }
    if mt in ("deepseek_v3", "kimi_k2"):
        names.update({"routed_experts": "n_routed_experts", "moe_intermediate": "moe_intermediate_size",
                      "shared_experts": "n_shared_experts", "shared_intermediate": "moe_intermediate_size",
                      "expert_groups": "n_group", "top_groups": "topk_group",
                      "attention.kv_lora_rank": "kv_lora_rank", "attention.q_lora_rank": "q_lora_rank",
                      "attention.qk_rope_head_dim": "qk_rope_head_dim", "attention.v_head_dim": "v_head_dim",
                      "attention.qk_nope_head_dim": "qk_nope_head_dim"})
    elif mt in ("mixtral", "gpt_oss"):
        names.update({"routed_experts": "num_local_experts", "moe_intermediate": "intermediate_size"})
    elif mt == "qwen3_moe":
        names.update({"routed_experts": "num_experts", "moe_intermediate": "moe_intermediate_size"})
    if mt != "deepseek_v3" and mt != "kimi_k2":
        names["attention.head_dim"] = "head_dim"
    return names


def _hf_names(msg: str, mt: str, cfg: dict[str, Any]) -> str:
    """A validation message about the Model built from a config, in the file's
    own key names (``field 'top_k'`` -> ``field 'num_experts_per_tok'``); a
    field the file does not hold is marked as derived."""
    names = _hf_field_names(mt)
    names.update({k.split(".", 1)[1]: v for k, v in list(names.items()) if k.startswith("attention.")})

    def field(m: re.Match[str]) -> str:
        name = m.group(1)
        if name in names:
            return f"field {names[name]!r}"
        return f"field {name!r}" if name in cfg else f"field {name!r} (derived by qsengine)"

    msg = re.sub(r"field '([\w.]+)'", field, msg, count=1)
    head, sep, rule = msg.partition(": must")
    if sep:
        for internal in sorted(names, key=len, reverse=True):
            rule = re.sub(rf"(?<![\w.]){re.escape(internal)}(?![\w.])", names[internal], rule)
        msg = head + sep + rule
    return msg


def _model_from_hf(cfg: dict[str, Any], label: str, mt: str, id: str) -> Model:
    def g(key: str, default: Any = ..., *, integer: bool = True, minimum: int | None = 0) -> Any:
        if key not in cfg or cfg[key] is None:
            if default is ...:
                near = did_you_mean(key, [k for k in cfg if isinstance(k, str) and k not in _HF_KEYS])
                raise SpecError(f"{label}: missing required key {key!r} (model_type {mt!r}){near}")
            return default
        v = cfg[key]
        if integer:
            check_int(label, key, v, minimum=minimum)
        return v

    L = g("num_hidden_layers", minimum=1)
    d = g("hidden_size", minimum=1)
    heads = g("num_attention_heads", minimum=1)
    kv = g("num_key_value_heads", heads, minimum=1)
    vocab = g("vocab_size", minimum=1)
    tie = g("tie_word_embeddings", False, integer=False)
    max_ctx = g("max_position_embeddings", None)
    common: dict[str, Any] = dict(id=id, name=id, num_layers=L, hidden_size=d, vocab_size=vocab,
                                  tie_embeddings=tie, max_context=max_ctx, source=label,
                                  mtp_layers=g("num_nextn_predict_layers", 0),
                                  **_hf_precision(cfg, label))

    def head_dim() -> int:
        hd = g("head_dim", None, minimum=1)
        if hd is not None:
            return int(hd)
        if d % heads:
            raise SpecError(f"{label}: field 'hidden_size' = {d}: must be divisible by num_attention_heads ({heads}) "
                            f"when head_dim is not given (model_type {mt!r})")
        return d // heads

    with spec_source(label):
        if mt in ("deepseek_v3", "kimi_k2"):
            first_dense = g("first_k_dense_replace", 0)
            freq = g("moe_layer_freq", 1, minimum=1)
            n_routed = g("n_routed_experts", 0)
            moe = sum(1 for i in range(L) if n_routed and i >= first_dense and i % freq == 0)
            n_shared = g("n_shared_experts", 0)
            rope = g("qk_rope_head_dim", minimum=1)
            nope = g("qk_nope_head_dim", minimum=0)
            att = Attention(kind="mla", num_heads=heads, num_kv_heads=kv, head_dim=nope + rope,
                            v_head_dim=g("v_head_dim", minimum=1), q_lora_rank=g("q_lora_rank", None, minimum=1),
                            kv_lora_rank=g("kv_lora_rank", minimum=1), qk_rope_head_dim=rope, qk_nope_head_dim=nope)
            moe_w = g("moe_intermediate_size", 0)
            return Model(**common, attention=att, dense_layers=L - moe, moe_layers=moe,
                         dense_intermediate=g("intermediate_size", 0) if L - moe else 0,
                         routed_experts=n_routed, top_k=g("num_experts_per_tok", 0), moe_intermediate=moe_w,
                         shared_experts=n_shared, shared_intermediate=moe_w if n_shared else 0,
                         expert_groups=g("n_group", 1, minimum=1), top_groups=g("topk_group", 1, minimum=1))
        if mt == "gpt_oss":
            window = g("sliding_window", None, minimum=1)
            types = cfg.get("layer_types")
            if types is None:
                local = L // 2 if window else 0
            elif isinstance(types, list):
                local = sum(1 for t in types if t == "sliding_attention")
            else:
                raise type_fail(label, "layer_types", types, "a list of strings")
            att = Attention(kind="gqa", num_heads=heads, num_kv_heads=kv, head_dim=head_dim(),
                            local_layers=local, local_window=window if local else None, local_kind="sliding",
                            qkv_bias=bool(g("attention_bias", True, integer=False)))
            top_k = g("num_experts_per_tok", None)
            if top_k is None:
                top_k = g("experts_per_token")
            return Model(**common, attention=att, dense_layers=0, moe_layers=L,
                         routed_experts=g("num_local_experts"), top_k=top_k, moe_intermediate=g("intermediate_size"),
                         ffn_bias=True)
        window = g("sliding_window", None, minimum=1) if mt in ("mistral", "mixtral") else None
        att = Attention(kind="gqa" if kv != heads else "mha", num_heads=heads, num_kv_heads=kv, head_dim=head_dim(),
                        local_layers=L if window else 0, local_window=window, local_kind="sliding",
                        qkv_bias=bool(g("attention_bias", mt == "qwen2", integer=False)))
        if mt == "mixtral":
            return Model(**common, attention=att, dense_layers=0, moe_layers=L,
                         routed_experts=g("num_local_experts", minimum=1), top_k=g("num_experts_per_tok", minimum=1),
                         moe_intermediate=g("intermediate_size", minimum=1))
        if mt == "qwen3_moe":
            n_exp = g("num_experts", minimum=1)
            step = g("decoder_sparse_step", 1, minimum=1)
            only = cfg.get("mlp_only_layers") or []
            if not isinstance(only, list):
                raise type_fail(label, "mlp_only_layers", only, "a list of layer indices")
            moe = sum(1 for i in range(L) if i not in only and (i + 1) % step == 0)
            return Model(**common, attention=att, dense_layers=L - moe, moe_layers=moe,
                         dense_intermediate=g("intermediate_size", 0) if L - moe else 0,
                         routed_experts=n_exp, top_k=g("num_experts_per_tok", minimum=1),
                         moe_intermediate=g("moe_intermediate_size", minimum=1))
        # dense llama-style
        return Model(**common, attention=att, dense_layers=L, moe_layers=0,
                     dense_intermediate=g("intermediate_size", minimum=1),
                     ffn_bias=bool(g("mlp_bias", False, integer=False)))
