"""Peer comparison: qsengine's decode step beside NVIDIA AIConfigurator's (issue #14, item 7).

For a documented set of configurations (model, GPU, parallel plan, precision),
batches and contexts, one decode step is estimated by both tools at the same
batch, plan, precision and routing assumption, and the script reports the
end-to-end step-time ratio qsengine / AIConfigurator and per-piece ratios
where the pieces can be matched (attention, dense FFN, routed experts, router +
shared experts, communication, LM head, other).

This is a **peer comparison, not ground truth**: AIConfigurator is itself a
model (interpolated kernel measurements of TensorRT-LLM, summed per op, with
its own fusion and overlap rules). Agreement says two models agree; the
ground-truth check is ``qsengine validate`` against published serving
measurements (docs/calibration.md).

* qsengine: :func:`qsengine.decode.step.decode_step` (the step model the
  whole pipeline runs; closed-form straggler, uniform independent routing).
* AIConfigurator (``aiconfigurator-core``, Apache-2.0,
  https://github.com/ai-dynamo/aiconfigurator): the compiled engine's
  decode-only step, ``EngineHandle.decode_step_per_op(gen_tokens, isl, osl)``,
  which evaluates the model's generation op list once at sequence length
  ``s = isl + osl//2 + 1`` (``sdk/rust_engine_step.py``); pieces come from
  ``EngineHandle.evaluate_ops_json`` on every leaf op of that list (composite
  ops opened: ``FallbackOp`` -> its granular ops, ``OverlapOp`` -> both groups).
  MoE routing is the ``balanced`` table (qsengine's uniform routing); the
  SDK's default ``power_law`` routing is reported beside it, end to end.

The optional dependency is ``qsengine[calibrate]``; without it the script says
so and exits 0 without touching the stored results.

    python benchmarks/bench_peer.py [--out benchmarks/results/bench_peer.txt]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

#: Matched pieces, in report order. "other" holds what qsengine does not model
#: (norms and activations as element-wise kernels, the embedding lookup).
CATEGORIES = ("attention", "dense ffn", "routed experts", "router + shared", "communication", "lm head", "other")

#: qsengine step pieces (names of :class:`qsengine.decode.step.Piece`) -> category.
QS_PIECES: dict[str, str] = {
    "attention": "attention",
    "attention (local)": "attention",
    "dense ffn": "dense ffn",
    "routed experts (straggler)": "routed experts",
    "router + shared experts": "router + shared",
    "tp all-reduce": "communication",
    "ep all-to-all": "communication",
    "expert-tp all-reduce": "communication",
    "pp send": "communication",
    "lm head": "lm head",
}

#: AIConfigurator generation op names (the ``generation_`` prefix removed) ->
#: category, first match wins. From the op lists of ``sdk/models/llama.py``,
#: ``deepseek.py`` and ``moe.py`` (aiconfigurator-core 0.12).
PEER_RULES: tuple[tuple[str, str], ...] = (
    (r"(allreduce|all_reduce|^ar_\d|_ar$|dispatch|alltoall|all_to_all|a2a|p2p|allgather|reduce_scatter)",
     "communication"),
    (r"(add_norm|norm|act_gate|activation|embedding|elementwise)", "other"),
    (r"^logits", "lm head"),
    (r"^router", "router + shared"),
    (r"^shared", "router + shared"),
    (r"^moe", "routed experts"),
    (r"(qkv|attention|attn|mla|bmm|q_b_proj|downscale|proj_gemm|kv_b|q_a|o_proj)", "attention"),
    (r"(ffn|gate_up|up_gemm|down_gemm|mlp)", "dense ffn"),
)


def qs_category(piece: str) -> str:
    """Category of a qsengine step piece; unknown pieces go to ``other``."""
    return QS_PIECES.get(piece, "other")


def peer_category(op_name: str) -> str:
    """Category of an AIConfigurator generation op (by name, see :data:`PEER_RULES`)."""
    name = op_name.removeprefix("generation_")
    for pattern, cat in PEER_RULES:
        if re.search(pattern, name):
            return cat
    return "other"


def by_category(times: Iterable[tuple[str, float]], categorize: Any) -> dict[str, float]:
    """Sum ``(name, seconds)`` pairs into :data:`CATEGORIES` with ``categorize(name)``."""
    out = dict.fromkeys(CATEGORIES, 0.0)
    for name, t in times:
        out[categorize(name)] += float(t)
    return out


def ratio(a: float, b: float) -> float:
    """a / b, NaN when either side is zero (a piece one tool does not have)."""
    return a / b if (a > 0 and b > 0) else math.nan


def piece_ratios(qs: Mapping[str, float], peer: Mapping[str, float]) -> dict[str, float]:
    """Per-category ratio qsengine / peer (NaN where either is 0)."""
    return {c: ratio(qs.get(c, 0.0), peer.get(c, 0.0)) for c in CATEGORIES}


def nanmedian(xs: Iterable[float]) -> float:
    """Median of the finite values (NaN if none)."""
    v = [x for x in xs if math.isfinite(x)]
    return statistics.median(v) if v else math.nan


@dataclass(frozen=True)
class Config:
    """One configuration evaluated in both tools.

    ``batches`` are concurrent sequences of one replica (qsengine's ``batch``);
    under attention data-parallelism AIConfigurator's ``gen_tokens`` is per
    attention-DP rank, ``batch / attention_dp_size``.
    """

    label: str
    qs_model: str
    qs_accelerator: str
    qs_precision: str
    qs_plan: dict[str, Any]
    peer_model: str
    peer_system: str
    peer_kwargs: dict[str, Any]
    batches: tuple[int, ...] = (1, 8, 32, 128)
    note: str = ""

    @property
    def adp(self) -> int:
        return int(self.peer_kwargs.get("attention_dp_size", 1))


FP8_MOE = dict(gemm_quant_mode="fp8_block", moe_quant_mode="fp8_block", kvcache_quant_mode="fp8", fmha_quant_mode="fp8")
FP8 = dict(gemm_quant_mode="fp8", kvcache_quant_mode="fp8", fmha_quant_mode="fp8")
BF16 = dict(gemm_quant_mode="bfloat16", kvcache_quant_mode="bfloat16", fmha_quant_mode="bfloat16")

#: The configurations (TensorRT-LLM tables; qsengine "fp8" = block-scaled fp8
#: weights and fp8 KV, bf16 activations; AIConfigurator per-tensor "fp8" GEMMs
#: for the dense fp8 checkpoints, "fp8_block" for DeepSeek/Qwen3 MoE).
CONFIGS: tuple[Config, ...] = (
    Config("DeepSeek-V3 fp8 8xH200 TP8", "deepseek-v3", "h200-sxm", "fp8", dict(tp=8),
           "deepseek-ai/DeepSeek-V3", "h200_sxm", dict(tp_size=8, moe_tp_size=8, moe_ep_size=1, **FP8_MOE)),
    Config("DeepSeek-V3 fp8 8xH200 TP8+EP8", "deepseek-v3", "h200-sxm", "fp8", dict(tp=8, ep=8),
           "deepseek-ai/DeepSeek-V3", "h200_sxm", dict(tp_size=8, moe_tp_size=1, moe_ep_size=8, **FP8_MOE)),
    Config("DeepSeek-V3 fp8 8xH200 DP8-attn+EP8", "deepseek-v3", "h200-sxm", "fp8", dict(tp=8, ep=8, attn_dp=True),
           "deepseek-ai/DeepSeek-V3", "h200_sxm",
           dict(tp_size=1, attention_dp_size=8, moe_tp_size=1, moe_ep_size=8, **FP8_MOE),
           batches=(8, 32, 128, 512)),
    Config("Qwen3-235B-A22B fp8 8xH200 TP8+EP8", "qwen3-235b-a22b", "h200-sxm", "fp8", dict(tp=8, ep=8),
           "Qwen/Qwen3-235B-A22B-FP8", "h200_sxm", dict(tp_size=8, moe_tp_size=1, moe_ep_size=8, **FP8_MOE),
           note="expert TP8 is refused by AIConfigurator for fp8_block (1536/8 not a multiple of 128): EP8"),
    Config("Llama-3.1-70B fp8 4xH100 TP4", "llama-3.1-70b", "h100-sxm", "fp8", dict(tp=4),
           "meta-llama/Meta-Llama-3.1-70B", "h100_sxm", dict(tp_size=4, **FP8)),
    Config("Llama-3.1-70B bf16 8xH100 TP8", "llama-3.1-70b", "h100-sxm", "bf16", dict(tp=8),
           "meta-llama/Meta-Llama-3.1-70B", "h100_sxm", dict(tp_size=8, **BF16)),
    Config("Qwen3-32B bf16 1xH200", "qwen3-32b", "h200-sxm", "bf16", dict(tp=1),
           "Qwen/Qwen3-32B", "h200_sxm", dict(tp_size=1, **BF16)),
    Config("Qwen3-32B fp8 2xH100 TP2", "qwen3-32b", "h100-sxm", "fp8", dict(tp=2),
           "Qwen/Qwen3-32B", "h100_sxm", dict(tp_size=2, **FP8)),
)

#: Input lengths (the decode step runs at s = isl + osl//2 + 1 cached tokens).
ISLS = (1024, 8192)
OSL = 2
BACKEND = "trtllm"


@dataclass
class Row:
    """One (configuration, batch, isl) comparison; times in seconds."""

    config: str
    batch: int
    isl: int
    qs_time: float
    peer_time: float
    peer_time_power_law: float
    qs_pieces: dict[str, float]
    peer_pieces: dict[str, float]
    peer_leaves_sum: float
    peer_ops: dict[str, float] = field(default_factory=dict)
    qs_time_roofline: float = math.nan  # the same step with kernels="roofline" (the obvious model)

    @property
    def ratio(self) -> float:
        return ratio(self.qs_time, self.peer_time)

    @property
    def ratio_roofline(self) -> float:
        return ratio(self.qs_time_roofline, self.peer_time)

    @property
    def ratios(self) -> dict[str, float]:
        return piece_ratios(self.qs_pieces, self.peer_pieces)


def summarize(rows: Sequence[Row]) -> dict[str, float]:
    """Median over rows of the end-to-end ratio and of each piece's ratio."""
    out = {"end-to-end": nanmedian(r.ratio for r in rows)}
    for c in CATEGORIES:
        out[c] = nanmedian(r.ratios[c] for r in rows)
    return out


def share(rows: Sequence[Row], side: str) -> dict[str, float]:
    """Median share of each category in one tool's step (``side`` 'qs' or 'peer'),
    over the rows where that tool has the piece (NaN if it never has it)."""
    out = {}
    for c in CATEGORIES:
        vals = []
        for r in rows:
            pieces, total = (r.qs_pieces, r.qs_time) if side == "qs" else (r.peer_pieces, r.peer_leaves_sum)
            if pieces[c] > 0 and total > 0:
                vals.append(pieces[c] / total)
        out[c] = nanmedian(vals)
    return out


def fmt(x: float, width: int = 7, digits: int = 2) -> str:
    return f"{'-':>{width}s}" if not math.isfinite(x) else f"{x:{width}.{digits}f}"


# ------------------------------------------------------------------ the peer
class Peer:
    """AIConfigurator's compiled engine for one configuration and routing table."""

    def __init__(self, cfg: Config, distribution: str) -> None:
        from aiconfigurator_core.sdk.config_builders import apply_nextn, build_model_config
        from aiconfigurator_core.sdk.engine import (EngineHandle, _literal_backend_version,
                                                    _maybe_load_database, build_engine_spec_json)
        from aiconfigurator_core.sdk.models import get_model
        import aiconfigurator_core

        kw = dict(tp_size=1, pp_size=1, attention_dp_size=1, moe_tp_size=1, moe_ep_size=1)
        kw.update(cfg.peer_kwargs)
        mc = build_model_config(**kw)
        mc.workload_distribution = distribution  # compile_engine has no argument for it: its steps, spelled out
        apply_nextn(mc, 0)
        self.model = get_model(cfg.peer_model, mc, BACKEND)
        self.version = _literal_backend_version(cfg.peer_system, BACKEND, None, None, None)
        db = _maybe_load_database(cfg.peer_system, BACKEND, self.version, None)
        spec = build_engine_spec_json(self.model, model_path=cfg.peer_model, system=cfg.peer_system, backend=BACKEND,
                                      backend_version=self.version, kv_block_size=None, systems_path=None, nextn=0,
                                      database=db)
        self.handle = EngineHandle(bytes(aiconfigurator_core.engine_spec_bincode_from_json(spec)))
        self._ops_json = [(op, self._leaf_json(op)) for op in self.model.generation_ops]

    @staticmethod
    def leaves(op: Any) -> list[Any]:
        """The leaf ops of a generation op (OverlapOp: both groups; FallbackOp: its granular ops)."""
        a = getattr(op, "_group_a", None)
        if a is not None:
            return [x for c in (*a, *op._group_b) for x in Peer.leaves(c)]
        fb = getattr(op, "_fallback", None)
        if fb is not None:
            return [x for c in fb for x in Peer.leaves(c)]
        return [op]

    def _leaf_json(self, op: Any) -> list[str]:
        from aiconfigurator_core.sdk.engine import build_ops_json
        return [build_ops_json([leaf]) for leaf in self.leaves(op)]

    def step(self, gen_tokens: int, isl: int) -> tuple[float, dict[str, float]]:
        """Engine decode step (ms -> s) and its per-op values (s)."""
        ops = self.handle.decode_step_per_op(gen_tokens, isl, OSL)
        return sum(o[1] for o in ops) / 1e3, {o[0]: o[1] / 1e3 for o in ops}

    def leaf_times(self, gen_tokens: int, isl: int) -> list[tuple[str, float]]:
        """(name, seconds) of every leaf op at the decode-step shape."""
        s = isl + OSL // 2 + 1
        out = []
        for _, leaf_json in self._ops_json:
            for js in leaf_json:
                for name, ms, _e, _src in self.handle.evaluate_ops_json(js, is_context=False, batch_size=gen_tokens,
                                                                         s=s):
                    out.append((name, ms / 1e3))
        return out


def qs_step(cfg: Config, batch: int, isl: int, kernels: str = "calibrated"
            ) -> tuple[float, dict[str, float], list[tuple[str, float]]]:
    """qsengine's decode step at the same point: time (s), categories, raw pieces.
    ``kernels`` is :class:`~qsengine.decode.step.StepOptions`' kernel model
    (the default, ``"calibrated"``, is what the pipeline runs)."""
    from qsengine import Plan, as_accelerator, as_cluster, as_model, as_precision
    from qsengine.decode.step import StepOptions, decode_step

    model = as_model(cfg.qs_model)
    plan = Plan(**cfg.qs_plan)
    plan.validate_for(model, as_cluster(f"{plan.tp * plan.pp * plan.dp}x{cfg.qs_accelerator}"))  # the plan's rules
    br = decode_step(model, as_precision(cfg.qs_precision), as_accelerator(cfg.qs_accelerator), plan, batch,
                     isl + OSL // 2 + 1, options=StepOptions(kernels=kernels))
    raw = [(p.name, p.time) for p in br.pieces]
    return br.time, by_category(raw, qs_category), raw


def run(configs: Sequence[Config], isls: Sequence[int]) -> tuple[list[Row], list[str], list[str]]:
    """Every (configuration, isl, batch) in both tools: rows, notes, AIC tables used."""
    rows: list[Row] = []
    tables: set[str] = set()
    notes: list[str] = []
    unknown: set[str] = set()
    for cfg in configs:
        try:
            peer = Peer(cfg, "balanced")
            peer_pl = Peer(cfg, "power_law")
            tables.add(f"{cfg.peer_system}/{BACKEND}/{peer.version}")
        except Exception as exc:  # a configuration the installed SDK refuses is reported, not fatal
            notes.append(f"{cfg.label}: AIConfigurator refused it: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        for isl in isls:
            for b in cfg.batches:
                g = b // cfg.adp
                t_peer, ops = peer.step(g, isl)
                t_pl, _ = peer_pl.step(g, isl)
                leaves = peer.leaf_times(g, isl)
                for name, _ in leaves:
                    if peer_category(name) == "other" and not re.search(r"(norm|act|embedding)", name):
                        unknown.add(name)
                t_qs, qs_cat, raw = qs_step(cfg, b, isl)
                for name, _ in raw:
                    if name not in QS_PIECES:
                        unknown.add(f"qsengine:{name}")
                t_roof, _, _ = qs_step(cfg, b, isl, kernels="roofline")
                rows.append(Row(cfg.label, b, isl, t_qs, t_peer, t_pl, qs_cat, by_category(leaves, peer_category),
                                sum(t for _, t in leaves), ops, t_roof))
    if unknown:
        notes.append("unmatched names counted as 'other': " + ", ".join(sorted(unknown)))
    return rows, notes, sorted(tables)


def report(rows: Sequence[Row], notes: Sequence[str], header: Sequence[str]) -> list[str]:
    short = {"attention": "attn", "dense ffn": "ffn", "routed experts": "experts", "router + shared": "rtr+sh",
             "communication": "comm", "lm head": "lmhead", "other": "other"}
    out = list(header)
    out.append("")
    out.append("Per point: step time (ms) of each tool, ratio qsengine/AIConfigurator end to end and per piece")
    out.append("('-': the piece is absent or zero in one tool). AIC = balanced routing; AIC-pl = its default power law.")
    out.append(f"{'configuration':38s} {'B':>4s} {'ISL':>5s} {'qs ms':>7s} {'AIC ms':>7s} {'AIC-pl':>7s} "
               f"{'e2e':>6s} " + " ".join(f"{short[c]:>7s}" for c in CATEGORIES))
    for r in rows:
        out.append(f"{r.config:38s} {r.batch:4d} {r.isl:5d} {r.qs_time * 1e3:7.2f} {r.peer_time * 1e3:7.2f} "
                   f"{r.peer_time_power_law * 1e3:7.2f} {fmt(r.ratio, 6)} "
                   + " ".join(fmt(r.ratios[c]) for c in CATEGORIES))
    out.append("")
    out.append("Median ratio qsengine/AIConfigurator per configuration (over batches and ISLs):")
    out.append(f"{'configuration':38s} {'e2e':>6s} " + " ".join(f"{short[c]:>7s}" for c in CATEGORIES))
    for label in dict.fromkeys(r.config for r in rows):
        s = summarize([r for r in rows if r.config == label])
        out.append(f"{label:38s} {fmt(s['end-to-end'], 6)} " + " ".join(fmt(s[c]) for c in CATEGORIES))
    s = summarize(rows)
    out.append(f"{'ALL (median over every point)':38s} {fmt(s['end-to-end'], 6)} "
               + " ".join(fmt(s[c]) for c in CATEGORIES))
    roof = [r.ratio_roofline for r in rows if math.isfinite(r.ratio_roofline)]
    if roof:
        by_cfg = {label: nanmedian(r.ratio_roofline for r in rows if r.config == label)
                  for label in dict.fromkeys(r.config for r in rows)}
        out.append(f"Same points with kernels='roofline' (one bandwidth and one FLOP efficiency, the obvious model): "
                   f"e2e median {statistics.median(roof):.2f}, per configuration "
                   f"{min(by_cfg.values()):.2f}-{max(by_cfg.values()):.2f}")
    by_b = {b: nanmedian(r.ratio for r in rows if r.batch == b) for b in sorted({r.batch for r in rows})}
    out.append("Median end-to-end ratio by batch: " + ", ".join(f"B={b}: {v:.2f}" for b, v in by_b.items()))
    by_isl = {i: nanmedian(r.ratio for r in rows if r.isl == i) for i in sorted({r.isl for r in rows})}
    out.append("Median end-to-end ratio by ISL: " + ", ".join(f"{i}: {v:.2f}" for i, v in by_isl.items()))
    qsh, psh = share(rows, "qs"), share(rows, "peer")
    out.append("Median share of each piece in each tool's step (rows where the tool has the piece):")
    out.append(f"{'median share of the step, qsengine':38s} {'':6s} " + " ".join(fmt(qsh[c]) for c in CATEGORIES))
    out.append(f"{'median share of the step, AIC leaves':38s} {'':6s} " + " ".join(fmt(psh[c]) for c in CATEGORIES))
    cons = [r.peer_leaves_sum / r.peer_time for r in rows if r.peer_time > 0]
    out.append("")
    out.append(f"AIC pieces (leaf ops) sum to {min(cons):.2f}-{max(cons):.2f}x its engine step (median "
               f"{statistics.median(cons):.2f}): the engine prices fused modules where it has them (MLA module for "
               "the granular MLA ops) and overlaps shared with routed experts (max, not sum).")
    pl = [r.peer_time_power_law / r.peer_time for r in rows]
    out.append(f"AIC power-law / balanced routing, end to end: median {statistics.median(pl):.3f} "
               f"(range {min(pl):.3f}-{max(pl):.3f}).")
    out.extend(notes)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="write the report here too")
    ap.add_argument("--json", default=None, help="write every row as JSON here")
    args = ap.parse_args(argv)
    try:
        aic_version = importlib.metadata.version("aiconfigurator-core")
        import aiconfigurator_core  # noqa: F401
    except (importlib.metadata.PackageNotFoundError, ImportError):
        print("bench_peer: skipped: aiconfigurator-core is not installed (optional: pip install 'qsengine[calibrate]' "
              "or 'aiconfigurator-core>=0.12'); stored results left as they are.")
        return 0
    import logging

    import qsengine

    logging.getLogger("aiconfigurator_core").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    rows, notes, tables = run(CONFIGS, ISLS)
    elapsed = time.perf_counter() - t0
    header = [
        "bench_peer: qsengine decode step vs NVIDIA AIConfigurator decode step (PEER COMPARISON, NOT GROUND TRUTH)",
        f"qsengine {qsengine.__version__}, aiconfigurator-core {aic_version} (tables {', '.join(tables)}), "
        f"python {platform.python_version()}",
        f"{len(rows)} points in {elapsed:.1f} s",
        "qsengine call:  qsengine.decode.step.decode_step(model, precision, accelerator, Plan(...), batch, "
        f"context=isl + {OSL // 2 + 1}, options=StepOptions(kernels='calibrated'))   (closed form, uniform routing; "
        "the calibrated kernels are fitted to aiconfigurator-core's tables, so agreement here is partly by "
        "construction: the fit's held-out error is in bench_calibration.txt)",
        "AIC calls:      build_model_config(tp_size, pp_size, attention_dp_size, moe_tp_size, moe_ep_size, "
        "*_quant_mode); model_config.workload_distribution = 'balanced' | 'power_law'; "
        "get_model(hf_id, model_config, 'trtllm'); EngineHandle(engine_spec_bincode_from_json("
        "build_engine_spec_json(...)))  [= sdk.engine.compile_engine with the routing table chosen];",
        f"                handle.decode_step_per_op(gen_tokens=batch/attention_dp_size, isl, osl={OSL}) (end to end, "
        f"s = isl + {OSL // 2 + 1}); pieces: handle.evaluate_ops_json(build_ops_json([leaf]), is_context=False, "
        f"batch_size=gen_tokens, s=isl + {OSL // 2 + 1}) per leaf op of model.generation_ops",
        "Configurations (qsengine plan <-> AIC parallel sizes; quant modes):",
    ]
    for c in CONFIGS:
        header.append(f"  {c.label}: qsengine {c.qs_model} {c.qs_precision} on {c.qs_accelerator} Plan({c.qs_plan}) "
                      f"<-> AIC {c.peer_model} on {c.peer_system} {c.peer_kwargs}"
                      + (f"  [{c.note}]" if c.note else ""))
    lines = report(rows, notes, header)
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(r.__dict__, ratio=r.ratio, ratios=r.ratios) for r in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
