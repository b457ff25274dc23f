"""Specs flattened into the core's numeric memory description, plan conversions, and the
batched admission (every plan's per-stage constants, any (plan, context) lane in one core call)."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from qsengine import _core
from qsengine.specs import Accelerator, Cluster, Model, Plan, Precision, Workload
from qsengine.specs.loaders import as_accelerator, as_model, as_precision

if TYPE_CHECKING:  # pragma: no cover
    pass

#: Weight components of the per-GPU map, in order (as in ``Model.params_by_component``).
COMPONENTS: tuple[str, ...] = tuple(_core.COMPONENTS)

#: Per-GPU map columns that stack to the GPU's HBM capacity (in this order).
#: "a2a": the EP all-to-all buffers (:func:`a2a_buffer_bytes_per_token`) of the admitted sequences.
STACK_COLUMNS: tuple[str, ...] = COMPONENTS + ("replicas", "kv", "a2a", "reserve", "unusable", "free")

BindingConstraint = Literal["weights", "kv", ""]


# --------------------------------------------------------------------- inputs
def _as_accelerator(accelerator: Accelerator | Cluster | str) -> Accelerator:
    if isinstance(accelerator, Cluster):
        return accelerator.accelerator
    return as_accelerator(accelerator)


def _as_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r} (type {type(value).__name__}): must be an integer")
    v = int(value)
    if v < minimum:
        raise ValueError(f"{name}={v}: must be >= {minimum}")
    if v > _MAX_INT:
        raise ValueError(f"{name}={v}: must be <= 2^53")
    return v


_MAX_INT = 2**53  # as the spec fields (specs._validate.MAX_SPEC_INT): exact in float64, no int64 overflow


def _as_context(context: int | Workload) -> int:
    if isinstance(context, Workload):
        context = context.context
    if isinstance(context, (bool, np.bool_)) or not isinstance(context, numbers.Integral):
        raise TypeError(f"context={context!r} (type {type(context).__name__}): must be an integer number of tokens")
    if int(context) <= 0:
        raise ValueError(f"context={int(context)}: must be a positive number of tokens")
    if int(context) > _MAX_INT:
        raise ValueError(f"context={int(context)}: must be <= 2^53 tokens")
    return int(context)


def _decode_local_mask(decode_layers: int, local_layers: int) -> list[int]:
    """Which decode layers are local: spread evenly (layer j is local when
    floor((j+1)·n_local/n_decode) > floor(j·n_local/n_decode))."""
    return [int((j + 1) * local_layers // decode_layers - j * local_layers // decode_layers) for j in range(decode_layers)]


#: DeepEP's low-latency messages are laid out per 128 hidden channels (one fp32 scale or one bf16x2
#: min/max pair per group), csrc/legacy/config.hpp ``LowLatencyLayout``.
_DEEPEP_GROUP = 128


def a2a_buffer_bytes_per_token(hidden: int, experts: int) -> float:
    """Bytes of DeepEP's low-latency all-to-all buffers one GPU allocates per token it
    may dispatch in one step (``num_max_dispatch_tokens_per_rank`` = T), for a model of
    ``hidden`` channels and ``experts`` routed experts (docs/packing.md "All-to-all buffers").

    DeepEP (github.com/deepseek-ai/DeepEP at dd758ca, csrc/legacy/config.hpp
    ``LowLatencyLayout``; ``Buffer.get_low_latency_rdma_size_hint``) double-buffers a send,
    a receive and a signalling buffer. With s = H/128 scale groups, a dispatch message is
    16 + max(2H, H + 4s) bytes (bf16, or fp8 with fp32 scales), a combine message 4s + 2H;
    send = max(T·dispatch, E·T·combine), receive = E·T·max(dispatch, combine). For E >= 2
    the send buffer is E·T·combine, so the buffers take

        2·E·(combine + max(dispatch, combine))  bytes per token of T

    (14.9 MB for DeepSeek-V3: H = 7168, E = 256) plus 2·⌈4E/128⌉·128 bytes of signals and
    an alignment round-up, both under 4 KB and left out. SGLang and vLLM serve expert
    parallelism through DeepEP and size T to the decode batch per rank (DeepEP's README:
    "the actual batch size in the decoding engine"; SGLang's
    ``SGLANG_DEEPEP_NUM_MAX_DISPATCH_TOKENS_PER_RANK``, which it asserts the batch stays
    under); TensorRT-LLM's own all-to-all workspace is taken at DeepEP's size (a transfer)."""
    h = int(hidden)
    e = int(experts)
    scales = h // _DEEPEP_GROUP
    dispatch = 16 + max(2 * h, h + 4 * scales)
    combine = 4 * scales + 2 * h
    send = max(dispatch, e * combine)  # per token of T
    recv = e * max(dispatch, combine)
    return float(2 * (send + recv))


def memory_description(
    model: Model, precision: Precision | str | None = None, accelerator: Accelerator | None = None,
    draft_module: bool = False, draft_tokens: int = 0,
) -> _core.MemoryDesc:
    """Flatten model x precision x accelerator into the core's numeric description.

    Layer order conventions (docs/packing.md): encoder layers first, dense-FFN
    layers before MoE layers (DeepSeek's ``first_k_dense_replace``), local
    (sliding/chunked) layers spread evenly over the decode layers.

    ``draft_module``: the speculative-decoding draft (MTP) module is resident
    (docs/model.md, "Speculative decoding"): one more decoder layer after the
    last, of the model's kind (MoE for an MoE model, else dense FFN), with
    full attention and its own KV cache, sharded like the other layers (so
    on the last pipeline stage); its 2d×d projection and 3 norms are charged
    with the final norm (non-expert weights of the last stage).

    The EP all-to-all buffers (:func:`a2a_buffer_bytes_per_token`) of a MoE are
    sized for ``1 + draft_tokens`` token rows per sequence and step (a speculative
    verify pass dispatches every draft token).
    """
    model = as_model(model)
    prec = as_precision(precision)
    L = model.num_layers
    if model.dense_layers + model.moe_layers != L:
        raise ValueError(
            f"model {model.id!r}: dense_layers={model.dense_layers} + moe_layers={model.moe_layers} must equal "
            f"num_layers={L} (the packer places every layer's FFN)"
        )
    if not 0 <= model.encoder_layers < L:
        raise ValueError(f"model {model.id!r}: encoder_layers={model.encoder_layers} must be in [0, num_layers={L})")
    att = model.attention
    wb, eb = prec.weight_bytes, prec.expert_bytes
    d = _core.MemoryDesc()
    d.attention_bytes = model.attention_params * wb
    d.dense_ffn_bytes = model.dense_ffn_params * wb
    d.expert_bytes = model.expert_params * eb
    d.shared_expert_bytes = model.shared_experts * model.shared_expert_params * eb
    d.router_bytes = model.router_params * wb
    d.norm_bytes_per_layer = 2 * model.hidden_size * wb
    d.final_norm_bytes = model.hidden_size * wb
    d.embedding_bytes = model.embedding_params * wb
    d.lm_head_bytes = model.lm_head_params * wb
    d.tie_embeddings = bool(model.tie_embeddings)
    extra = [int(model.is_moe)] if draft_module else []  # the draft module's block: one layer of the model's kind
    d.layer_is_moe = [int(i >= model.dense_layers) for i in range(L)] + extra
    d.layer_has_kv = [int(i >= model.encoder_layers) for i in range(L)] + [1] * len(extra)
    if draft_module:
        h = model.hidden_size
        d.final_norm_bytes += (2 * h * h + 3 * h) * wb  # the MTP projection [norm(h); norm(emb)] -> d, 3 norms
    local = att.local_layers
    if local < 0 or local > model.decode_layers:
        raise ValueError(
            f"attention.local_layers={local}: must be in [0, decode_layers={model.decode_layers}]"
        )
    d.layer_is_local = [0] * model.encoder_layers + _decode_local_mask(model.decode_layers, local) + [0] * len(extra)
    d.routed_experts = model.routed_experts if model.is_moe else 0
    d.moe_intermediate = model.moe_intermediate
    d.num_heads = att.num_heads
    d.num_kv_heads = att.num_kv_heads
    d.mla = att.kind == "mla"
    d.kv_bytes_per_token_per_layer = model.kv_bytes_per_token_per_layer(prec.kv_bytes, prec.kv_layout)
    d.local_window = int(att.local_window or 0) if local else 0
    if model.is_moe:
        d.a2a_bytes_per_token = a2a_buffer_bytes_per_token(model.hidden_size, model.routed_experts)
        d.a2a_rows_per_sequence = 1.0 + int(draft_tokens)
    if accelerator is not None:
        d.hbm_bytes = float(accelerator.hbm_bytes)
        d.usable_fraction = float(accelerator.usable_hbm_fraction)
        d.reserve_bytes = float(accelerator.runtime_reserve_bytes)
        d.kv_fraction = float(accelerator.kv_fraction)
        d.validate()
    return d


def _plan_desc(plan: Plan) -> _core.PlanDesc:
    if not isinstance(plan, Plan):
        raise TypeError(f"plan={plan!r} (type {type(plan).__name__}): must be 'auto' or a qsengine.Plan")
    return plan.core_desc()  # the Plan validated its fields on construction


def _plan_from(tp: int, pp: int, dp: int, ep: int, etp: int, attn_dp: bool, redundant: int = 0) -> Plan:
    default_etp = tp if ep == 1 else 1
    return Plan(
        tp=int(tp), pp=int(pp), dp=int(dp), ep=int(ep),
        etp=None if int(etp) in (0, default_etp) else int(etp), attn_dp=bool(attn_dp), redundant=int(redundant),
    )


def _plan_from_desc(p: _core.PlanDesc) -> Plan:
    return _plan_from(p.tp, p.pp, p.dp, p.ep, p.etp, p.attn_dp, p.redundant)


def _threads(threads: int | None) -> int:
    return 0 if threads is None else _as_int(threads, "threads", 1)


# ------------------------------------------------------------- batched admission
@dataclass(frozen=True)
class PlanMemory:
    """Per-plan constants of one model × precision × cluster from which
    :func:`admissible_batches` derives the admissible batch of any (plan,
    context) exactly as :func:`pack` does: per pipeline stage (rows padded to
    ``max_pp``), the weight bytes on one GPU by component and in total, the KV
    bytes per token per layer, and the full/local KV layers.

    Arrays have shape (plans, max_pp); padding stages carry no KV and no weights
    (``weight_total`` = -inf). ``table`` is the core's ``AdmissionTable`` of the
    same plans (the same stages), on which :func:`admissible_batches` runs."""

    plans: tuple[Plan, ...]
    usable: float
    local_window: int
    shard: np.ndarray  # (plans,) 1 with attn_dp else tp
    weights: np.ndarray  # (plans, max_pp, components)
    weight_total: np.ndarray
    kv_per_token_layer: np.ndarray
    kv_full_layers: np.ndarray
    kv_local_layers: np.ndarray
    dense_layers: np.ndarray
    table: _core.AdmissionTable = field(repr=False, compare=False)


def plan_memory(model: Model, cluster: Cluster, precision: Precision, plan_list: Sequence[Plan] | None = None,
                draft_module: bool = False, draft_tokens: int = 0) -> PlanMemory:
    """The :class:`PlanMemory` of ``plan_list`` (default: every valid plan, in
    :func:`plans` order), with the speculative draft module resident if
    ``draft_module`` (see :func:`memory_description`, also for ``draft_tokens``;
    the plans are the model's own either way)."""
    desc = memory_description(model, precision, cluster.accelerator, draft_module, draft_tokens)
    g = int(cluster.num_gpus)
    if plan_list is None:
        pdescs = list(_core.enumerate_plans(memory_description(model, precision, cluster.accelerator) if draft_module
                                            else desc, g))
        plan_list = [_plan_from_desc(p) for p in pdescs]
    else:
        pdescs = [_plan_desc(p) for p in plan_list]
    table = _core.AdmissionTable(desc, pdescs, g)
    t = table.stage_table()
    n = len(plan_list)
    max_pp = max([p.pp for p in plan_list], default=1)
    shape = (n, max_pp)
    idx = (t["plan"], t["stage"])
    weights = np.zeros(shape + (len(COMPONENTS),))
    weights[idx] = t["weights"]
    total = np.full(shape, -np.inf)
    total[idx] = t["weight_total"]
    kv = np.zeros(shape)
    kv[idx] = t["kv_per_token_layer"]
    full = np.zeros(shape, dtype=np.int64)
    full[idx] = t["kv_full_layers"]
    local = np.zeros(shape, dtype=np.int64)
    local[idx] = t["kv_local_layers"]
    dense = np.zeros(shape, dtype=np.int64)
    dense[idx] = t["dense_layers"]
    shard = np.array([1.0 if p.attn_dp else float(p.tp) for p in plan_list])
    return PlanMemory(plans=tuple(plan_list), usable=float(desc.usable_bytes), local_window=int(desc.local_window),
                      shard=shard, weights=weights, weight_total=total, kv_per_token_layer=kv, kv_full_layers=full,
                      kv_local_layers=local, dense_layers=dense, table=table)


def admissible_batches(pm: PlanMemory, plan_index: np.ndarray, context: np.ndarray,
                       dense_ffn_bytes: np.ndarray | None = None, *, fullest: bool = False
                       ) -> tuple[np.ndarray, ...]:
    """Admissible batch per replica (and whether the weights fit) for many
    (plan, context) lanes: ``pack(model, cluster, context, plan,
    precision).admissible_batch`` exactly, from the per-plan constants.

    ``dense_ffn_bytes`` (per lane) replaces the model's dense FFN block bytes:
    the dense twins of one MoE differ only there, so one :class:`PlanMemory`
    of any of them serves all.

    Runs in the C++ core (``_core.admissible_batches`` on ``pm.table``): the
    same per-stage code as the core's plan evaluation, over lanes in parallel
    with the GIL released (the result does not depend on the thread count).
    Returns (batch int64, fit bool), one entry per lane; with ``fullest``
    also the weight bytes on each lane's fullest GPU (``max(pack(...).weight_bytes)``).
    Raises ValueError
    naming the first bad lane (plan index out of range, context outside
    [1, 2^53], dense FFN bytes negative or not finite) or the argument whose
    length differs from ``plan_index``'s.
    """
    batch, fit, weight_max = _core.admissible_batches(pm.table, plan_index, context, dense_ffn_bytes)
    return (batch, fit, weight_max) if fullest else (batch, fit)
