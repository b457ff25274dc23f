"""A slow, obvious pure-Python packer, written from the specs and docs/packing.md
independently of the C++ core (it never touches MemoryDesc). The tests check
that the core agrees with it on small cases.

Everything is a plain loop over GPUs and layers; nothing is clever.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

from qsengine.specs import Accelerator, Model, Plan, Precision

COMPONENTS = ("attention", "dense_ffn", "routed_experts", "shared_experts", "router", "norms", "embedding", "lm_head")


def expert_tp(plan: Plan) -> int:
    return plan.expert_tp


def is_moe(model: Model) -> bool:
    return model.moe_layers > 0 and model.routed_experts > 0


def plan_is_valid(model: Model, plan: Plan, num_gpus: int) -> bool:
    """The plan rules of docs/packing.md, spelt out."""
    tp, pp, dp, ep = plan.tp, plan.pp, plan.dp, plan.ep
    if min(tp, pp, dp, ep) < 1 or tp * pp * dp != num_gpus or pp > model.num_layers:
        return False
    a = model.attention
    if (not plan.attn_dp or not is_moe(model)) and a.num_heads % tp:
        return False  # TP attention, or a dense model's TP FFN under attn_dp
    if not plan.attn_dp:
        if a.kind != "mla" and a.num_kv_heads % tp and tp % a.num_kv_heads:
            return False
    R = plan.redundant  # redundant expert slots: E + R per EP group, each expert's copies on distinct ranks
    if not is_moe(model):
        return ep == 1 and R == 0
    etp = expert_tp(plan)
    if R < 0 or (R > 0 and (ep == 1 or R > model.routed_experts * (ep - 1))):
        return False
    return (model.routed_experts + R) % ep == 0 and (dp * tp) % (ep * etp) == 0 and model.moe_intermediate % etp == 0


def all_plans(model: Model, num_gpus: int) -> list[Plan]:
    """Brute force over every tuple; the canonical set: explicit etp for MoE,
    attn_dp only with tp > 1 (otherwise it duplicates a plain plan)."""
    out = []
    G = num_gpus
    for tp in range(1, G + 1):
        for pp in range(1, G + 1):
            for dp in range(1, G + 1):
                if tp * pp * dp != G:
                    continue
                if not is_moe(model):
                    for adp in (False, True):
                        if adp and tp == 1:
                            continue
                        p = Plan(tp=tp, pp=pp, dp=dp, attn_dp=adp)
                        if plan_is_valid(model, p, G):
                            out.append(p)
                    continue
                for ep in range(1, G + 1):
                    for etp in range(1, G + 1):
                        for adp in (False, True):
                            if (adp and tp == 1) or (dp * tp) % (ep * etp):
                                continue  # the second: Plan itself refuses it
                            # the searched slots: only where EP spans the stage, filling E up to a multiple of ep
                            red = -model.routed_experts % ep if ep == dp * tp else 0
                            p = Plan(tp=tp, pp=pp, dp=dp, ep=ep, etp=etp, attn_dp=adp, redundant=red)
                            if plan_is_valid(model, p, G):
                                out.append(p)
    return out


def _local_decode_layers(model: Model) -> set[int]:
    nd, nl = model.decode_layers, model.attention.local_layers
    return {j for j in range(nd) if (j + 1) * nl // nd > j * nl // nd}


@dataclass
class RefGpu:
    gpu: int
    replica: int
    stage: int
    ep_rank: int
    weights: dict[str, float]
    kv_per_sequence: float
    kv_per_token_layer: float = 0.0
    a2a_per_sequence: float = 0.0  # EP all-to-all buffer bytes per admitted sequence
    replicas: float = 0.0
    kv: float = 0.0

    @property
    def weight_total(self) -> float:
        return sum(self.weights[c] for c in COMPONENTS)


@dataclass
class RefPacking:
    gpus: list[RefGpu]
    replica_batches: list[int]
    feasible: bool
    weights_fit: bool
    usable: float
    extra: dict = field(default_factory=dict)

    @property
    def cluster_batch(self) -> int:
        return sum(self.replica_batches)


def floor_fit(free: float, per: float) -> int:
    if not free >= 0 or not per > 0:
        return 0
    b = int(math.floor(free / per))
    while b > 0 and b * per > free:
        b -= 1
    while (b + 1) * per <= free:
        b += 1
    return b


def deepep_low_latency_bytes(hidden: int, experts: int, tokens: float) -> float:
    """DeepEP's low-latency buffer bytes for ``tokens`` dispatched tokens per rank, read off
    csrc/legacy/config.hpp ``LowLatencyLayout`` (two copies of: send, receive, signals;
    signals left out as the engine does, < 4 KB)."""
    groups = hidden // 128
    dispatch_msg = 16 + max(hidden * 2, hidden + groups * 4)
    combine_msg = groups * 4 + hidden * 2
    send = max(tokens * dispatch_msg, experts * tokens * combine_msg)
    recv = max(experts * tokens * dispatch_msg, experts * tokens * combine_msg)
    return 2 * send + 2 * recv


def reference_map(model: Model, prec: Precision, acc: Accelerator, plan: Plan, num_gpus: int,
                  context: int, draft_tokens: int = 0) -> list[RefGpu]:
    assert plan_is_valid(model, plan, num_gpus)
    L, tp, pp = model.num_layers, plan.tp, plan.pp
    shard = 1 if plan.attn_dp else tp
    # a dense model under attn_dp: attention and norms replicated, FFN, embedding and LM head split tp ways
    fshard = tp if (plan.attn_dp and not is_moe(model)) else shard
    moe = is_moe(model)
    etp = expert_tp(plan) if moe else 1
    wb, eb = prec.weight_bytes, prec.expert_bytes
    local_decode = _local_decode_layers(model)
    a = model.attention
    if a.kind == "mla" or plan.attn_dp:
        kv_frac = 1.0
    else:
        heads_here = a.num_kv_heads // tp if tp <= a.num_kv_heads else 1
        kv_frac = heads_here / a.num_kv_heads
    window = a.local_window or context
    gpus = []
    for g in range(num_gpus):
        d, s, t = g // (pp * tp), (g // tp) % pp, g % tp
        local_index = d * tp + t
        w = dict.fromkeys(COMPONENTS, 0.0)
        kv_tokens = 0
        decode_moe = 0
        for layer in range(s * L // pp, (s + 1) * L // pp):
            w["attention"] += model.attention_params * wb / shard
            w["norms"] += 2 * model.hidden_size * wb / shard
            if layer < model.dense_layers:
                w["dense_ffn"] += model.dense_ffn_params * wb / fshard
            else:
                if moe:
                    slots = (model.routed_experts + plan.redundant) // plan.ep  # (E + R)/ep slots per GPU
                    w["routed_experts"] += slots * model.expert_params * eb / etp
                w["shared_experts"] += model.shared_experts * model.shared_expert_params * eb / shard
                w["router"] += model.router_params * wb / shard
            if layer >= model.encoder_layers:
                decode_moe += int(moe and layer >= model.dense_layers)
                j = layer - model.encoder_layers
                kv_tokens += min(context, window) if j in local_decode else context
        if s == 0:
            w["embedding"] += model.embedding_params * wb / fshard
        if s == pp - 1:
            w["norms"] += model.hidden_size * wb / shard
            w["lm_head"] += model.lm_head_params * wb / fshard
            if model.tie_embeddings and pp > 1:
                w["lm_head"] += model.embedding_params * wb / fshard
        # FlashMLA's fp8 MLA cache (README "FP8 KV Cache"): r fp8 latent bytes, an fp32 scale per 128 of them,
        # the e RoPE values in bf16; any other cache: the model's elements at kv_bytes
        att = model.attention
        per_tok = (att.kv_lora_rank + math.ceil(att.kv_lora_rank / 128) * 4.0 + 2.0 * att.qk_rope_head_dim
                   if att.kind == "mla" and prec.kv_layout == "flashmla-fp8"
                   else model.kv_bytes_per_token_per_layer(prec.kv_bytes))
        per_seq = per_tok * kv_frac * kv_tokens
        # a GPU that dispatches to other EP ranks in decode holds DeepEP's buffers for its tokens per step:
        # (1 + drafts) rows per sequence per microbatch (pp of them), a 1/tp share of a replica's tokens
        a2a = 0.0
        if moe and plan.ep > 1 and decode_moe:
            a2a = deepep_low_latency_bytes(model.hidden_size, model.routed_experts,
                                           (1 + draft_tokens) / (pp * shard))
        gpus.append(RefGpu(
            gpu=g, replica=local_index if plan.attn_dp else d, stage=s,
            ep_rank=(local_index % (plan.ep * etp)) // etp if moe else 0, weights=w, kv_per_sequence=per_seq,
            kv_per_token_layer=per_tok * kv_frac, a2a_per_sequence=a2a,
        ))
    return gpus


def _admit(gpus: list[RefGpu], usable: float, n_units: int) -> tuple[list[int], bool]:
    weights_fit = all(g.weight_total + g.replicas <= usable for g in gpus)
    batches = [None] * n_units
    for g in gpus:
        if g.kv_per_sequence + g.a2a_per_sequence > 0:
            b = floor_fit(usable - g.weight_total - g.replicas, g.kv_per_sequence + g.a2a_per_sequence)
            batches[g.replica] = b if batches[g.replica] is None else min(batches[g.replica], b)
    out = [0 if (b is None or not weights_fit) else b for b in batches]
    return out, weights_fit


def reference_replicas(popularity: list[float], replicas: int, ep: int, capacity: list[int]) -> dict:
    """EPLB-style greedy: replicas to the expert with the largest per-copy load,
    copies heaviest first onto the least-loaded EP rank with room."""
    E = len(popularity)
    copies = [1] * E
    for _ in range(replicas):
        best = max(range(E), key=lambda e: (popularity[e] / copies[e], -e))
        copies[best] += 1
    per_rank = E // ep
    before = [0.0] * ep
    after = [0.0] * ep
    for e in range(E):
        before[e // per_rank] += popularity[e]
        after[e // per_rank] += popularity[e] / copies[e]
    items = sorted(((popularity[e] / copies[e], e) for e in range(E) for _ in range(copies[e] - 1)),
                   key=lambda x: -x[0])
    count = [0] * ep
    placement = []
    for load, e in items:
        candidates = [r for r in range(ep) if count[r] < capacity[r]]
        if not candidates:
            raise ValueError("replicas do not fit")
        r = min(candidates, key=lambda r: (after[r], r))
        count[r] += 1
        after[r] += load
        placement.append((e, r))
    mean = sum(popularity) / ep
    return {"copies": copies, "count": count, "placement": placement, "before": before, "after": after,
            "imbalance_before": max(before) / mean, "imbalance_after": max(after) / mean}


def reference_pack(model: Model, prec: Precision, acc: Accelerator, plan: Plan, num_gpus: int, context: int,
                   popularity: list[float] | None = None, replicas: int = 0) -> RefPacking:
    gpus = reference_map(model, prec, acc, plan, num_gpus, context)
    usable = acc.hbm_bytes * acc.usable_hbm_fraction - acc.runtime_reserve_bytes
    n_units = plan.dp * plan.tp if plan.attn_dp else plan.dp
    extra = {}
    base, _ = _admit(gpus, usable, n_units)
    extra["cluster_batch_without_replicas"] = sum(base)
    if popularity is not None:
        etp = expert_tp(plan)
        cap = [None] * plan.ep
        for g in gpus:
            moe_layers_here = sum(
                1 for layer in range(g.stage * model.num_layers // plan.pp, (g.stage + 1) * model.num_layers // plan.pp)
                if layer >= model.dense_layers)
            rb = moe_layers_here * model.expert_params * prec.expert_bytes / etp
            g.extra_rb = rb
            if rb > 0:
                c = floor_fit(usable - g.weight_total, rb)
                cap[g.ep_rank] = c if cap[g.ep_rank] is None else min(cap[g.ep_rank], c)
        cap = [2**62 if c is None else c for c in cap]
        rep = reference_replicas(list(popularity), replicas, plan.ep, cap)
        for g in gpus:
            g.replicas = rep["count"][g.ep_rank] * g.extra_rb
        extra["replication"] = rep
    batches, fit = _admit(gpus, usable, n_units)
    if fit:
        for g in gpus:
            g.kv = batches[g.replica] * g.kv_per_sequence
    return RefPacking(gpus=gpus, replica_batches=batches, feasible=fit and min(batches) >= 1, weights_fit=fit,
                      usable=usable, extra=extra)


def reference_paged(model: Model, prec: Precision, acc: Accelerator, plan: Plan, num_gpus: int,
                    lengths: list[int], block_size: int) -> dict:
    """Arrival-order admission with paged blocks onto the least-full replica."""
    gpus = reference_map(model, prec, acc, plan, num_gpus, 1)
    usable = acc.hbm_bytes * acc.usable_hbm_fraction - acc.runtime_reserve_bytes
    n_units = plan.dp * plan.tp if plan.attn_dp else plan.dp
    a = model.attention
    window = a.local_window if a.local_layers else None
    local_decode = _local_decode_layers(model)
    # per GPU: KV bytes per token for full and local layers
    per_tok_full, per_tok_local = {}, {}
    for g in gpus:
        full = local = 0
        L = model.num_layers
        for layer in range(g.stage * L // plan.pp, (g.stage + 1) * L // plan.pp):
            if layer >= model.encoder_layers:
                if layer - model.encoder_layers in local_decode:
                    local += 1
                else:
                    full += 1
        per_tok_full[g.gpu] = g.kv_per_token_layer * full
        per_tok_local[g.gpu] = g.kv_per_token_layer * local
    used = {g.gpu: 0.0 for g in gpus}
    members = {u: [g for g in gpus if g.replica == u] for u in range(n_units)}
    free = {g.gpu: usable - g.weight_total for g in gpus}
    weights_fit = all(v >= 0 for v in free.values())

    def fill(u: int) -> float:
        f = 0.0
        for g in members[u]:
            if per_tok_full[g.gpu] == 0 and per_tok_local[g.gpu] == 0:
                continue
            f = max(f, used[g.gpu] / free[g.gpu] if free[g.gpu] > 0 else math.inf)
        return f

    heap = [(fill(u), u) for u in range(n_units)]
    heapq.heapify(heap)
    placed = rejected = 0
    frag = 0.0
    per_unit = [0] * n_units
    for length in lengths:
        if not weights_fit:
            rejected += 1
            continue
        loc = min(length, window) if window else length
        pf = -(-length // block_size) * block_size
        pl = -(-loc // block_size) * block_size
        tried = []
        chosen = None
        while heap:
            f, u = heapq.heappop(heap)
            need = {g.gpu: per_tok_full[g.gpu] * pf + per_tok_local[g.gpu] * pl for g in members[u]}
            if all(used[k] + need[k] <= free[k] for k in need):
                for k in need:
                    used[k] += need[k]
                chosen = u
                tried.append((fill(u), u))
                break
            tried.append((f, u))
        for item in tried:
            heapq.heappush(heap, item)
        if chosen is None:
            rejected += 1
            continue
        placed += 1
        per_unit[chosen] += 1
        for g in members[chosen]:
            frag += per_tok_full[g.gpu] * (pf - length) + per_tok_local[g.gpu] * (pl - loc)
    return {"placed": placed, "rejected": rejected, "fragmentation_bytes": frag, "per_unit": per_unit,
            "kv": [used[g.gpu] for g in gpus]}


def brute_force_min_gpus(model: Model, prec: Precision, acc: Accelerator, context: int, max_gpus: int) -> int | None:
    for G in range(1, max_gpus + 1):
        for plan in all_plans(model, G):
            if reference_pack(model, prec, acc, plan, G, context).feasible:
                return G
    return None
