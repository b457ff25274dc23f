"""``qsengine list models|accelerators|clusters`` and ``qsengine show NAME``."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

from qsengine.errors import SpecError
from qsengine.specs._validate import did_you_mean
from qsengine.specs.hardware import Accelerator, Cluster
from qsengine.specs.loaders import (
    accelerators,
    clusters,
    load_accelerator,
    load_cluster,
    load_model,
    models,
)
from qsengine.specs.model import Model
from qsengine.specs.precision import PRESETS

#: Precisions shown by ``qsengine show MODEL``.
SHOW_PRECISIONS = ("bf16", "fp8", "fp4")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """Plain-text table; ``align`` is one 'l'/'r' per column (default: first
    column left, the rest right)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or ("l" + "r" * (len(headers) - 1))
    out = []
    for n, r in enumerate(cells):
        out.append("  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _b(n: float) -> str:
    return f"{n / 1e9:,.2f}B"


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB"


# ------------------------------------------------------------------ list
def _list_models() -> str:
    rows = []
    for name in models():
        m = load_model(name)
        experts = f"{m.routed_experts}/{m.top_k}" + (f"+{m.shared_experts}" if m.shared_experts else "") if m.is_moe else "-"
        rows.append([name, m.num_layers, m.hidden_size, m.attention.kind, experts, _b(m.total_params),
                     _b(m.active_params), f"{m.sparsity:.4f}", f"{m.kv_bytes_per_token():,.0f}",
                     _gb(m.weight_bytes("bf16"))])
    return table(["model", "layers", "hidden", "attn", "experts/k", "total", "active", "s", "KV B/token",
                  "bf16 weights"], rows)


def _list_accelerators() -> str:
    rows = []
    for name in accelerators():
        a = load_accelerator(name)
        rows.append([name, f"{a.hbm_bytes / 1e9:g}", f"{a.hbm_bandwidth / 1e12:g}", f"{a.flops['bf16'] / 1e12:g}",
                     f"{a.flops['fp8'] / 1e12:g}" if "fp8" in a.flops else "-", f"{a.scaleup_bandwidth / 1e9:g}",
                     a.scaleup_domain, a.gpus_per_node, a.name])
    return table(["accelerator", "HBM GB", "HBM TB/s", "bf16 TFLOP/s", "fp8 TFLOP/s", "scale-up GB/s", "domain",
                  "per node", "name"], rows, align="lrrrrrrrl")


def _list_clusters() -> str:
    rows = []
    for name in clusters():
        c = load_cluster(name)
        rows.append([name, c.accelerator.id, c.num_gpus, c.num_nodes, f"{c.total_hbm_bytes / 1e9:,.0f}",
                     f"{c.total_usable_bytes / 1e9:,.0f}", c.notes])
    return table(["cluster", "accelerator", "GPUs", "nodes", "HBM GB", "usable GB", "notes"], rows,
                 align="llrrrrl")


# ------------------------------------------------------------------ show
def show_model(m: Model) -> str:
    total = m.params_by_component()
    active = m.active_params_by_component()
    lines = [f"{m.name} ({m.id})", f"source: {m.source}" if m.source else "", ""]
    arch = f"{m.num_layers} layers ({m.dense_layers} dense FFN, {m.moe_layers} MoE"
    arch += f", {m.encoder_layers} encoder" if m.encoder_layers else ""
    arch += f"), hidden {m.hidden_size}, vocab {m.vocab_size}"
    lines.append(arch)
    a = m.attention
    att = f"attention {a.kind}: {a.num_heads} heads, {a.num_kv_heads} KV heads, head_dim {a.head_dim}"
    if a.kind == "mla":
        att += f", kv_lora_rank {a.kv_lora_rank}, rope {a.qk_rope_head_dim}, q_lora_rank {a.q_lora_rank}"
    if a.local_layers:
        att += f"; {a.local_layers} {a.local_kind} layers of {a.local_window} tokens"
    lines.append(att)
    if m.is_moe:
        lines.append(f"experts: {m.routed_experts} routed, top-{m.top_k}, {m.shared_experts} shared, width "
                     f"{m.moe_intermediate}" + (f", {m.expert_groups} groups / top {m.top_groups}" if m.expert_groups > 1 else ""))
    lines.append("")
    rows = [[k, _b(v), f"{100 * v / m.total_params:.2f}%", _b(active[k])] for k, v in total.items()]
    rows.append(["total", _b(m.total_params), "100.00%", _b(m.active_params)])
    lines.append(table(["component", "parameters", "share", "active"], rows))
    lines.append("")
    pub_t = f" (published {_b(m.published_total_params)})" if m.published_total_params else ""
    pub_a = f" (published {_b(m.published_active_params)})" if m.published_active_params else ""
    lines.append(f"total params   {m.total_params:,}{pub_t}")
    lines.append(f"active params  {m.active_params:,}{pub_a}")
    lines.append(f"s (active/total) {m.sparsity:.4f}")
    lines.append(f"max context    {m.max_context:,} tokens" if m.max_context else "max context    not given")
    src = f" ({m.deployed_precision_source})" if m.deployed_precision_source else ""
    lines.append(f"deployed precision {m.deployed_precision or 'bf16 (fallback: none given)'}{src}: "
                 "the default of every command")
    lines.append("")
    # columns: (header, kv_bytes, kv_layout); an MLA cache also as FlashMLA's fp8 layout stores it
    kv_cols = [("bf16 bytes", 2.0, "plain"), ("fp8 bytes", 1.0, "plain")]
    if a.kind == "mla":
        kv_cols.append(("fp8 FlashMLA bytes", 1.0, "flashmla-fp8"))
    kv_rows = [["per token per layer"] + [f"{m.kv_bytes_per_token_per_layer(b, k):,.0f}" for _, b, k in kv_cols],
               ["per token (all decode layers)"] + [f"{m.kv_bytes_per_token(b, k):,.0f}" for _, b, k in kv_cols]]
    if a.local_layers:
        kv_rows.append(["per token beyond windows"] + [f"{m.kv_bytes_per_token_long(b, k):,.0f}"
                                                       for _, b, k in kv_cols])
    for ctx in (4096, 131072):
        kv_rows.append([f"per sequence at {ctx:,} tokens"] + [_gb(m.kv_bytes_per_sequence(ctx, b, k))
                                                               for _, b, k in kv_cols])
    lines.append(table(["KV cache"] + [h for h, _, _ in kv_cols], kv_rows))
    lines.append("")
    mem_rows = []
    for p in SHOW_PRECISIONS:
        by = m.weight_bytes_by_component(p)
        experts = by["routed_experts"] + by["shared_experts"]
        mem_rows.append([p, _gb(experts), _gb(sum(by.values()) - experts), _gb(sum(by.values()))])
    lines.append(table(["weights at", "experts", "other", "total"], mem_rows))
    return "\n".join(x for x in lines if x is not None)


def _topology(a: Accelerator) -> str:
    """``switch``, or ``torus, 3D (wraparound from 64 chips)``."""
    if a.scaleup_topology != "torus":
        return a.scaleup_topology
    wrap = "every slice wraps around" if a.torus_wraparound is None else f"wraparound from {a.torus_wraparound} chips"
    return f"torus, {a.torus_dims}D ({wrap})"


def show_accelerator(a: Accelerator) -> str:
    rows = [
        ["HBM", f"{a.hbm_bytes / 1e9:g} GB"],
        ["HBM bandwidth", f"{a.hbm_bandwidth / 1e12:g} TB/s (efficiency {a.bandwidth_efficiency:g})"],
    ]
    for k, v in a.flops.items():
        rows.append([f"peak {k}", f"{v / 1e12:g} TFLOP/s"])
    rows += [
        ["FLOP/s efficiency", f"{a.flops_efficiency:g}"],
        ["scale-up bandwidth", f"{a.scaleup_bandwidth / 1e9:g} GB/s per GPU, one direction"],
        ["inter-node bandwidth", f"{a.internode_bandwidth * 8 / 1e9:g} Gbit/s per GPU"],
        ["link efficiency", f"{a.link_efficiency:g}"],
        ["GPUs per node", a.gpus_per_node],
        ["scale-up domain", f"{a.scaleup_domain} GPUs"],
        ["scale-up topology", _topology(a)],
        ["usable HBM", f"{a.usable_bytes / 1e9:,.1f} GB ({a.usable_hbm_fraction:g} x HBM - {a.runtime_reserve_bytes / 1e9:g} GB reserve)"],
    ]
    head = [f"{a.name} ({a.id})", f"source: {a.source}", ""]
    tail = ["", f"notes: {a.notes}"] if a.notes else []
    return "\n".join(head + [table(["property", "value"], rows, align="ll")] + tail)


def show_cluster(c: Cluster) -> str:
    rows = [
        ["accelerator", c.accelerator.id],
        ["GPUs", c.num_gpus],
        ["nodes", c.num_nodes],
        ["HBM total", f"{c.total_hbm_bytes / 1e9:,.0f} GB"],
        ["usable HBM total", f"{c.total_usable_bytes / 1e9:,.0f} GB"],
        ["HBM bandwidth total", f"{c.num_gpus * c.accelerator.hbm_bandwidth / 1e12:,.1f} TB/s"],
    ]
    head = [f"cluster {c.label}" + (f": {c.notes}" if c.notes else ""), ""]
    return "\n".join(head + [table(["property", "value"], rows, align="ll"), "", show_accelerator(c.accelerator)])


def resolve(name: str) -> Model | Accelerator | Cluster:
    """Find ``name`` among models, accelerators and clusters (in that order),
    or load it from a file."""
    errors = []
    for loader in (load_model, load_accelerator, load_cluster):
        try:
            return loader(name)  # type: ignore[operator]
        except SpecError as exc:
            errors.append(str(exc))
    if os.path.exists(name):
        raise SpecError(f"{name}: not a model, accelerator or cluster spec: " + "; ".join(errors))
    known = models() + accelerators() + clusters()
    raise SpecError(f"{name!r}: not a shipped model, accelerator or cluster{did_you_mean(name.lower(), known)}; "
                    "see 'qsengine list models|accelerators|clusters'")


def _cmd_list(args: argparse.Namespace) -> int:
    print({"models": _list_models, "accelerators": _list_accelerators, "clusters": _list_clusters,
           "precisions": _list_precisions}[args.what]())
    return 0


def _list_precisions() -> str:
    rows = [[k, f"{p.weight_bytes:.4g}", f"{p.expert_bytes:.4g}", f"{p.kv_bytes:g}", f"{p.activation_bytes:g}",
             f"{p.dispatch_bytes:.4g}", f"{p.combine_bytes:.4g}", p.compute, p.expert_compute, p.kv_layout]
            for k, p in PRESETS.items()]
    return table(["precision", "weight B", "expert B", "KV B", "activation B", "dispatch B", "combine B", "compute",
                  "expert compute", "KV layout"], rows)


def _cmd_show(args: argparse.Namespace) -> int:
    spec = resolve(args.name)
    if isinstance(spec, Model):
        print(show_model(spec))
    elif isinstance(spec, Accelerator):
        print(show_accelerator(spec))
    else:
        print(show_cluster(spec))
    return 0


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register ``list`` and ``show``."""
    p = sub.add_parser("list", help="list shipped models, accelerators, clusters or precisions")
    p.add_argument("what", choices=["models", "accelerators", "clusters", "precisions"],
                   help="which shipped specs to list")
    p.set_defaults(handler=_cmd_list)
    p = sub.add_parser("show", help="show a model, accelerator or cluster (name or file)")
    p.add_argument("name", help="shipped name (e.g. deepseek-v3, h200, 8xh200) or a .toml / config.json path")
    p.set_defaults(handler=_cmd_show)
