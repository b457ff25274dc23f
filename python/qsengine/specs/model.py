"""Model architecture specs and the parameter / KV arithmetic derived from them.

Everything here is *computed* from the architecture; published totals are
only used by the tests to check the arithmetic.

Conventions (see ``docs/model.md``):

* A layer is an attention block followed by an FFN block; the FFN is either a
  dense FFN (``dense_layers`` of them) or an MoE block (``moe_layers``).
  Layers in ``encoder_layers`` (encoder-decoder models such as Switch-C) hold
  resident weights but take no part in a decode step and cache no KV.
* Gated FFNs (SwiGLU, GeGLU) have three matrices (3·d·f), non-gated two (2·d·f).
* ``active_params`` are the weights read to decode one token with one sequence:
  every non-expert weight except the input embedding table (one row is read),
  plus ``top_k`` routed experts and all shared experts in each MoE layer.
  With tied embeddings the table is also the LM head and counts as active.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from qsengine.specs._validate import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_opt_int,
    check_str,
    current_source,
    fail,
    type_fail,
)
from qsengine.specs.precision import KV_LAYOUTS, mla_kv_bytes

if TYPE_CHECKING:
    from qsengine.specs.precision import Precision
    from qsengine.specs.twin import TwinSpec

AttentionKind = Literal["mha", "gqa", "mla"]
LocalKind = Literal["sliding", "chunked"]


@dataclass(frozen=True)
class Attention:
    """Self-attention block of one layer.

    MHA/GQA: ``num_heads`` query heads, ``num_kv_heads`` key/value heads of
    width ``head_dim`` (``v_head_dim`` defaults to ``head_dim``).

    MLA (DeepSeek-V2/V3, Kimi-K2): queries through an optional low-rank
    ``q_lora_rank``; keys/values through a ``kv_lora_rank`` latent plus a
    decoupled RoPE key of width ``qk_rope_head_dim``; only the latent and the
    RoPE key are cached. ``head_dim`` = ``qk_nope_head_dim + qk_rope_head_dim``.

    ``local_layers`` of the model's decode layers attend only to a local window
    of ``local_window`` tokens (``local_kind`` "sliding" or "chunked"); their KV
    cache holds at most ``local_window`` tokens per sequence.
    """

    kind: AttentionKind
    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int | None = None
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    qk_nope_head_dim: int | None = None
    local_layers: int = 0
    local_window: int | None = None
    local_kind: LocalKind = "sliding"
    qkv_bias: bool = False

    def __post_init__(self) -> None:
        _validate_attention(self)

    @property
    def value_dim(self) -> int:
        return self.v_head_dim if self.v_head_dim is not None else self.head_dim

    def params(self, hidden: int) -> int:
        """Weights of one attention block (projections; norms excluded)."""
        d, h = hidden, self.num_heads
        if self.kind == "mla":
            assert self.kv_lora_rank is not None and self.qk_rope_head_dim is not None
            nope = self.head_dim - self.qk_rope_head_dim if self.qk_nope_head_dim is None else self.qk_nope_head_dim
            qk = nope + self.qk_rope_head_dim
            if self.q_lora_rank:
                q = d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * h * qk  # incl. q_a norm
            else:
                q = d * h * qk
            kv_a = d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank  # incl. kv_a norm
            kv_b = self.kv_lora_rank * h * (nope + self.value_dim)
            o = h * self.value_dim * d
            return q + kv_a + kv_b + o
        q = d * h * self.head_dim
        kv = d * self.num_kv_heads * (self.head_dim + self.value_dim)
        o = h * self.value_dim * d
        bias = (h * self.head_dim + self.num_kv_heads * (self.head_dim + self.value_dim)) if self.qkv_bias else 0
        return q + kv + o + bias

    def kv_elements_per_token(self) -> int:
        """Cached elements per token per layer (K and V, or MLA latent + RoPE key)."""
        if self.kind == "mla":
            assert self.kv_lora_rank is not None and self.qk_rope_head_dim is not None
            return self.kv_lora_rank + self.qk_rope_head_dim
        return self.num_kv_heads * (self.head_dim + self.value_dim)

    def flops_per_token(self, hidden: int, context: int) -> float:
        """FLOPs of one decode token in one layer at ``context`` cached tokens.

        Projections: 2 per weight. Scores and weighted values: MHA/GQA
        2·h·(head_dim + v_dim)·T; MLA in its absorbed decode form attends in
        the latent space: 2·h·(2·kv_lora_rank + rope)·T.
        """
        proj = 2.0 * self.params(hidden)
        h = self.num_heads
        if self.kind == "mla":
            assert self.kv_lora_rank is not None and self.qk_rope_head_dim is not None
            per_ctx = 2.0 * h * (2 * self.kv_lora_rank + self.qk_rope_head_dim)
        else:
            per_ctx = 2.0 * h * (self.head_dim + self.value_dim)
        return proj + per_ctx * context


@dataclass(frozen=True)
class Model:
    """A decoder (or encoder-decoder) transformer, dense or Mixture-of-Experts.

    Build from a shipped preset (:func:`qsengine.load_model`), a TOML file or a
    Hugging Face ``config.json``; construct directly for a hypothetical model.
    """

    id: str
    name: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    attention: Attention
    dense_layers: int
    moe_layers: int
    dense_intermediate: int = 0
    routed_experts: int = 0
    top_k: int = 0
    moe_intermediate: int = 0
    shared_experts: int = 0
    shared_intermediate: int = 0
    expert_groups: int = 1
    top_groups: int = 1
    gated_ffn: bool = True
    ffn_bias: bool = False
    tie_embeddings: bool = False
    encoder_layers: int = 0
    source: str = ""
    published_total_params: float | None = None
    published_active_params: float | None = None
    notes: str = field(default="", compare=False)
    cross_attention: bool = False
    max_context: int | None = None
    published_active_includes_embedding: bool = field(default=False, compare=False)
    #: Precision preset the model is served at by default (its developer's
    #: reference checkpoint); None: bf16. See :func:`qsengine.specs.default_precision`.
    deployed_precision: str | None = None
    #: Where ``deployed_precision`` comes from (URL or note).
    deployed_precision_source: str = field(default="", compare=False)
    #: Multi-token-prediction (MTP) modules shipped with the checkpoint (Hugging Face
    #: ``num_nextn_predict_layers``; DeepSeek-V3 report arXiv:2412.19437 §2.2). Not counted in
    #: :attr:`total_params` / :attr:`active_params` (nor in q, s): see :attr:`mtp_module_params`.
    mtp_layers: int = 0

    def __post_init__(self) -> None:
        _validate_model(self)

    # ----------------------------------------------------------- structure
    @property
    def is_moe(self) -> bool:
        return self.moe_layers > 0 and self.routed_experts > 0

    @property
    def decode_layers(self) -> int:
        """Layers that run in a decode step (all but encoder layers)."""
        return self.num_layers - self.encoder_layers

    @property
    def decode_moe_layers(self) -> int:
        """MoE layers that run in a decode step (encoder layers are spread
        proportionally over dense and MoE layers)."""
        if self.encoder_layers == 0:
            return self.moe_layers
        return round(self.moe_layers * self.decode_layers / self.num_layers)

    @property
    def decode_dense_layers(self) -> int:
        return self.decode_layers - self.decode_moe_layers

    # ----------------------------------------------------------- parameters
    def _ffn_params(self, width: int) -> int:
        mats = 3 if self.gated_ffn else 2
        bias = (2 * width + self.hidden_size) if (self.ffn_bias and self.gated_ffn) else (
            (width + self.hidden_size) if self.ffn_bias else 0)
        return mats * self.hidden_size * width + bias

    @property
    def expert_params(self) -> int:
        """Weights of one routed expert."""
        return self._ffn_params(self.moe_intermediate) if self.is_moe else 0

    @property
    def shared_expert_params(self) -> int:
        """Weights of one shared (always-on) expert."""
        return self._ffn_params(self.shared_intermediate) if self.shared_experts else 0

    @property
    def dense_ffn_params(self) -> int:
        """Weights of one dense FFN block."""
        return self._ffn_params(self.dense_intermediate) if self.dense_layers else 0

    @property
    def attention_params(self) -> int:
        """Weights of one attention block."""
        return self.attention.params(self.hidden_size)

    @property
    def attention_blocks(self) -> int:
        """Attention blocks in the model: one self-attention per layer, plus one
        cross-attention per decoder layer when ``cross_attention`` (T5-style
        encoder-decoder; same projection shapes as self-attention)."""
        return self.num_layers + (self.decode_layers if self.cross_attention else 0)

    @property
    def router_params(self) -> int:
        """Weights of one MoE layer's router (d·E)."""
        return self.hidden_size * self.routed_experts if self.is_moe else 0

    @property
    def norm_params(self) -> int:
        """RMS/LayerNorm gains: two per layer (three in decoder layers with
        cross-attention) plus the final norm."""
        return (2 * self.num_layers + 1 + (self.decode_layers if self.cross_attention else 0)) * self.hidden_size

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tie_embeddings else self.vocab_size * self.hidden_size

    @property
    def mtp_module_params(self) -> int:
        """Weights of one multi-token-prediction / draft module (docs/model.md,
        "Speculative decoding"): one decoder block of the model's kind
        (attention + 2 norms + the FFN of its last layer: an MoE layer with
        router, routed and shared experts for an MoE model, else a dense FFN),
        the 2d×d projection of [norm(h); norm(emb)] and 3 norms (hnorm, enorm,
        the head's norm). The embedding and LM head are shared with the main
        model (DeepSeek-V3 report arXiv:2412.19437 §2.2), so not counted."""
        d = self.hidden_size
        if self.is_moe:
            ffn = (self.routed_experts * self.expert_params + self.shared_experts * self.shared_expert_params
                   + self.router_params)
        else:
            ffn = self.dense_ffn_params
        return self.attention_params + 2 * d + ffn + 2 * d * d + 3 * d

    @property
    def mtp_params(self) -> int:
        """Weights of the shipped MTP modules (``mtp_layers`` × :attr:`mtp_module_params`);
        not part of :attr:`total_params`."""
        return self.mtp_layers * self.mtp_module_params

    def params_by_component(self) -> dict[str, int]:
        """Total parameters per component; the values sum to :attr:`total_params`.

        Keys: attention, dense_ffn, routed_experts, shared_experts, router,
        norms, embedding, lm_head.
        """
        return {
            "attention": self.attention_blocks * self.attention_params,
            "dense_ffn": self.dense_layers * self.dense_ffn_params,
            "routed_experts": self.moe_layers * self.routed_experts * self.expert_params,
            "shared_experts": self.moe_layers * self.shared_experts * self.shared_expert_params,
            "router": self.moe_layers * self.router_params,
            "norms": self.norm_params,
            "embedding": self.embedding_params,
            "lm_head": self.lm_head_params,
        }

    def active_params_by_component(self) -> dict[str, int]:
        """Parameters read to decode one token of one sequence, per component."""
        p = self.params_by_component()
        p["routed_experts"] = self.moe_layers * self.top_k * self.expert_params
        p["embedding"] = self.embedding_params if self.tie_embeddings else 0
        return p

    @property
    def total_params(self) -> int:
        return sum(self.params_by_component().values())

    @property
    def active_params(self) -> int:
        return sum(self.active_params_by_component().values())

    @property
    def sparsity(self) -> float:
        """s = active / total parameters (1.0 for a dense model)."""
        return self.active_params / self.total_params

    # ----------------------------------------------------------- KV cache
    def kv_bytes_per_token_per_layer(self, kv_bytes: float = 2.0, kv_layout: str = "plain") -> float:
        """KV-cache bytes one token adds to one full-attention layer: its cached
        elements at ``kv_bytes``, or for MLA as ``kv_layout`` stores them
        (:func:`qsengine.specs.precision.mla_kv_bytes`; "flashmla-fp8": DeepSeek-V3
        656 B instead of 576). MHA/GQA caches are plain whatever ``kv_layout``."""
        a = self.attention
        if kv_layout != "plain":
            check_choice(f"Model {self.id!r}", "kv_layout", kv_layout, KV_LAYOUTS)
            if a.kind == "mla":
                assert a.kv_lora_rank is not None and a.qk_rope_head_dim is not None
                return mla_kv_bytes(a.kv_lora_rank, a.qk_rope_head_dim, kv_bytes, kv_layout)
        return self.attention.kv_elements_per_token() * kv_bytes

    def kv_bytes_per_token(self, kv_bytes: float = 2.0, kv_layout: str = "plain") -> float:
        """KV bytes per token summed over decode layers, ignoring window caps
        (the per-token growth while context < every window)."""
        return self.decode_layers * self.kv_bytes_per_token_per_layer(kv_bytes, kv_layout)

    def kv_bytes_per_token_long(self, kv_bytes: float = 2.0, kv_layout: str = "plain") -> float:
        """KV bytes per token once the context exceeds every local window: only
        the full-attention decode layers still grow."""
        return (self.decode_layers - self.attention.local_layers) * self.kv_bytes_per_token_per_layer(kv_bytes,
                                                                                                      kv_layout)

    def kv_bytes_per_sequence(self, context: int, kv_bytes: float = 2.0, kv_layout: str = "plain") -> float:
        """KV bytes of one sequence at ``context`` tokens, honouring local
        (sliding / chunked) layers, which hold at most ``local_window`` tokens."""
        per = self.kv_bytes_per_token_per_layer(kv_bytes, kv_layout)
        local = self.attention.local_layers
        window = self.attention.local_window or context
        full = self.decode_layers - local
        return per * (full * context + local * min(context, window))

    # ----------------------------------------------------------- bytes
    def weight_bytes_by_component(self, precision: "Precision | str" = "bf16") -> dict[str, float]:
        """Resident weight bytes per component at ``precision`` (routed and
        shared experts at ``expert_bytes``, everything else at ``weight_bytes``)."""
        from qsengine.specs.precision import as_precision

        p = as_precision(precision)
        return {
            k: v * (p.expert_bytes if k in ("routed_experts", "shared_experts") else p.weight_bytes)
            for k, v in self.params_by_component().items()
        }

    def weight_bytes(self, precision: "Precision | str" = "bf16") -> float:
        """Bytes of all resident weights at ``precision``."""
        return sum(self.weight_bytes_by_component(precision).values())

    # ----------------------------------------------------------- variants
    def replace(self, **changes: object) -> "Model":
        """A copy with some fields changed (validated like any new Model)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def dense_twin(self, q: "float | str", attention: "str | TwinSpec" = "same") -> "Model":
        """The quality-matched dense twin with ``q`` x :attr:`active_params`
        weights (see :func:`qsengine.specs.twin.dense_twin`)."""
        from qsengine.specs.twin import dense_twin

        return dense_twin(self, q, attention=attention)

    # ----------------------------------------------------------- TOML
    def to_dict(self) -> dict[str, object]:
        """Plain-data form in the shipped TOML schema (``[attention]`` table;
        fields at their default and ``None`` values omitted)."""
        from qsengine.specs.loaders import model_to_dict

        return model_to_dict(self)

    def to_toml(self) -> str:
        """TOML text that :meth:`from_toml` / :func:`qsengine.load_model` read
        back to an equal :class:`Model`."""
        from qsengine.specs.loaders import model_to_toml

        return model_to_toml(self)

    @classmethod
    def from_toml(cls, text: str, source: str = "<toml>") -> "Model":
        """Parse TOML text in the shipped schema (see ``cluster_specs/models``)."""
        from qsengine.specs.loaders import model_from_toml_text

        return model_from_toml_text(text, source)


# --------------------------------------------------------------- validation
def _validate_attention(a: Attention) -> None:
    src = current_source("Attention")
    f = "attention."
    check_choice(src, f + "kind", a.kind, ("mha", "gqa", "mla"))
    check_int(src, f + "num_heads", a.num_heads, minimum=1)
    check_int(src, f + "num_kv_heads", a.num_kv_heads, minimum=1)
    check_int(src, f + "head_dim", a.head_dim, minimum=1)
    check_opt_int(src, f + "v_head_dim", a.v_head_dim, minimum=1)
    check_opt_int(src, f + "q_lora_rank", a.q_lora_rank, minimum=1)
    check_opt_int(src, f + "kv_lora_rank", a.kv_lora_rank, minimum=1)
    check_opt_int(src, f + "qk_rope_head_dim", a.qk_rope_head_dim, minimum=1)
    check_opt_int(src, f + "qk_nope_head_dim", a.qk_nope_head_dim, minimum=0)
    check_int(src, f + "local_layers", a.local_layers, minimum=0)
    check_opt_int(src, f + "local_window", a.local_window, minimum=1)
    check_choice(src, f + "local_kind", a.local_kind, ("sliding", "chunked"))
    check_bool(src, f + "qkv_bias", a.qkv_bias)
    if a.num_heads % a.num_kv_heads:
        raise fail(src, f + "num_heads", a.num_heads, f"must be divisible by num_kv_heads ({a.num_kv_heads})")
    if a.kind == "mha" and a.num_kv_heads != a.num_heads:
        raise fail(src, f + "num_kv_heads", a.num_kv_heads,
                   f"must equal num_heads ({a.num_heads}) for kind 'mha' (use kind 'gqa')")
    mla_fields = ("q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim")
    if a.kind == "mla":
        for name in ("kv_lora_rank", "qk_rope_head_dim"):
            if getattr(a, name) is None:
                raise fail(src, f + name, None, "is required when kind is 'mla'")
        assert a.qk_rope_head_dim is not None
        if a.qk_rope_head_dim >= a.head_dim:
            raise fail(src, f + "qk_rope_head_dim", a.qk_rope_head_dim, f"must be < head_dim ({a.head_dim})")
        if a.qk_nope_head_dim is not None and a.qk_nope_head_dim + a.qk_rope_head_dim != a.head_dim:
            raise fail(src, f + "head_dim", a.head_dim,
                       f"must equal qk_nope_head_dim + qk_rope_head_dim ({a.qk_nope_head_dim} + {a.qk_rope_head_dim})")
    else:
        for name in mla_fields:
            if getattr(a, name) is not None:
                raise fail(src, f + name, getattr(a, name), f"is an MLA field; set only when kind is 'mla' (kind is {a.kind!r})")
    if a.local_layers > 0 and a.local_window is None:
        raise fail(src, f + "local_window", None, f"is required when local_layers ({a.local_layers}) > 0")
    if a.local_layers == 0 and a.local_window is not None:
        raise fail(src, f + "local_window", a.local_window, "must be unset when local_layers is 0")


def _validate_model(m: Model) -> None:
    src = current_source(f"Model {m.id!r}" if isinstance(m.id, str) else "Model")
    check_str(src, "id", m.id, nonempty=True)
    check_str(src, "name", m.name)
    check_int(src, "num_layers", m.num_layers, minimum=1)
    check_int(src, "hidden_size", m.hidden_size, minimum=1)
    check_int(src, "vocab_size", m.vocab_size, minimum=1)
    if not isinstance(m.attention, Attention):
        raise type_fail(src, "attention", m.attention, "an Attention")
    for name in ("dense_layers", "moe_layers", "dense_intermediate", "routed_experts", "top_k",
                 "moe_intermediate", "shared_experts", "shared_intermediate", "encoder_layers", "mtp_layers"):
        check_int(src, name, getattr(m, name), minimum=0)
    check_int(src, "expert_groups", m.expert_groups, minimum=1)
    check_int(src, "top_groups", m.top_groups, minimum=1)
    for name in ("gated_ffn", "ffn_bias", "tie_embeddings", "cross_attention", "published_active_includes_embedding"):
        check_bool(src, name, getattr(m, name))
    check_str(src, "source", m.source)
    check_str(src, "notes", m.notes)
    for name in ("published_total_params", "published_active_params"):
        if getattr(m, name) is not None:
            check_float(src, name, getattr(m, name))
    check_opt_int(src, "max_context", m.max_context, minimum=1)
    if m.deployed_precision is not None:
        from qsengine.specs.precision import PRESETS

        check_choice(src, "deployed_precision", m.deployed_precision, PRESETS)
    check_str(src, "deployed_precision_source", m.deployed_precision_source)

    if m.dense_layers + m.moe_layers != m.num_layers:
        raise fail(src, "num_layers", m.num_layers,
                   f"must equal dense_layers + moe_layers ({m.dense_layers} + {m.moe_layers})")
    if m.dense_layers > 0 and m.dense_intermediate < 1:
        raise fail(src, "dense_intermediate", m.dense_intermediate, f"must be positive when dense_layers ({m.dense_layers}) > 0")
    if m.moe_layers > 0:
        for name in ("routed_experts", "top_k", "moe_intermediate"):
            if getattr(m, name) < 1:
                raise fail(src, name, getattr(m, name), f"must be positive when moe_layers ({m.moe_layers}) > 0")
    if m.top_k > m.routed_experts:
        raise fail(src, "top_k", m.top_k, f"must be <= routed_experts ({m.routed_experts})")
    if m.shared_experts > 0 and m.shared_intermediate < 1:
        raise fail(src, "shared_intermediate", m.shared_intermediate, f"must be positive when shared_experts ({m.shared_experts}) > 0")
    if m.top_groups > m.expert_groups:
        raise fail(src, "top_groups", m.top_groups, f"must be <= expert_groups ({m.expert_groups})")
    if m.routed_experts and m.routed_experts % m.expert_groups:
        raise fail(src, "expert_groups", m.expert_groups, f"must divide routed_experts ({m.routed_experts})")
    if m.routed_experts and m.top_k > m.top_groups * (m.routed_experts // m.expert_groups):
        raise fail(src, "top_k", m.top_k,
                   f"must be <= top_groups x experts per group ({m.top_groups} x {m.routed_experts // m.expert_groups})")
    if m.encoder_layers >= m.num_layers:
        raise fail(src, "encoder_layers", m.encoder_layers, f"must be < num_layers ({m.num_layers})")
    if m.cross_attention and m.encoder_layers == 0:
        raise fail(src, "cross_attention", m.cross_attention, "needs encoder_layers > 0 (encoder-decoder models only)")
    if m.attention.local_layers > m.decode_layers:
        raise fail(src, "attention.local_layers", m.attention.local_layers,
                   f"must be <= decode layers ({m.decode_layers})")
