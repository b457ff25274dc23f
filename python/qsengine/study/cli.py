"""``qsengine study`` and ``qsengine simulate``."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from qsengine.study.config import (
    DEFAULT_CLUSTERS,
    DEFAULT_CONTEXTS,
    DEFAULT_MODELS,
    DEFAULT_TIE,
    StudyConfig,
    _validate,
    checkpoint_dir,
    parse_tokens,
)
from qsengine.decode.point import DEFAULT_SLO_TPOT
from qsengine.study.run import run_study
from qsengine.study.text import format_summary, format_table



# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def _slo_arg(text: str) -> float | None:
    """``--slo-tpot-ms``: a p99 TPOT target in ms > 0 (returned in seconds), or 'none'."""
    import argparse

    if text.strip().lower() == "none":
        return None
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a number of milliseconds > 0, or 'none'") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a number of milliseconds > 0, or 'none' for no "
                                         "latency target (0 is not 'unset')")
    return v / 1e3


def _q_arg(text: str) -> float | str:
    import argparse

    if text == "sqrt":
        return text
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a number > 0 or 'sqrt'") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a number > 0 or 'sqrt' (0 is not 'unset')")
    return v


def _microbatches_arg(text: str) -> int | str:
    import argparse

    if text == "auto":
        return text
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: must be an integer >= 0 or 'auto'") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be an integer >= 0 or 'auto'")
    return v


def add_parser(sub) -> None:
    """``qsengine study`` and ``qsengine simulate``."""
    from qsengine.specs.precision import PRESETS
    from qsengine.sweep_cli import add_executor_args

    d = StudyConfig()
    p = sub.add_parser(
        "study", help="run the built-in MoE vs dense-twin study (the main job)",
        description="MoE models against their quality-matched dense twins over clusters and contexts. Prints one "
                    "verdict line per model x cluster; writes summary.md, results.csv/parquet and figures to --out. "
                    "Checkpointed: after Ctrl-C the same command resumes.")
    p.add_argument("--out", type=Path, default=d.out, help="output folder (default %(default)s)")
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), metavar="MODEL",
                   help="MoE models: shipped names (qsengine list models), model TOML files or Hugging Face "
                        "config.json files (default: %(default)s)")
    p.add_argument("--clusters", nargs="+", default=list(DEFAULT_CLUSTERS), metavar="CLUSTER",
                   help="clusters: shipped names, 'NxGPU' such as 8xH200 or 72xGB200, or cluster TOML files "
                        "(default: %(default)s)")
    p.add_argument("--contexts", nargs="+", default=list(DEFAULT_CONTEXTS), metavar="TOKENS",
                   help="context lengths: 32768, 32K or 1M (default: 4K 8K 16K 32K 64K 128K)")
    p.add_argument("--q", type=_q_arg, default="sqrt",
                   help="dense twin size: q x the MoE's active parameters; a number > 0 or 'sqrt' = 1/sqrt(s) "
                        "(default)")
    p.add_argument("--precision", default=None, choices=sorted(PRESETS), metavar="PRESET",
                   help="weights/KV precision for every model (default: each model's deployed precision, "
                        f"qsengine show MODEL); one of {', '.join(sorted(PRESETS))}")
    p.add_argument("--routing", default="uniform",
                   help="routing model of the Monte Carlo: uniform | powerlaw:A | group:G:T[:BASE] | ... "
                        "(default uniform)")
    p.add_argument("--microbatches", type=_microbatches_arg, default="auto",
                   help="routing Monte Carlo microbatches per point; 'auto' (default) sizes it per point, "
                        "0 = closed form (fast)")
    p.add_argument("--slo-tpot-ms", type=_slo_arg, default=DEFAULT_SLO_TPOT, metavar="MS",
                   help="the p99 per-token latency (ms) both sides are compared at, or 'none' for each side at "
                        f"its largest batch (default {DEFAULT_SLO_TPOT * 1e3:g}); the maximum-throughput ratio "
                        "is reported beside it either way")
    p.add_argument("--twins", nargs="+", choices=("same", "gqa"), default=list(d.twins), metavar="SHAPE",
                   help="dense twin shapes compared with every MoE point: same (the MoE's shape, wider FFN) and/or "
                        "gqa (a conventional dense shape) (default: %(default)s)")
    _request_args(p)
    p.add_argument("--seed", type=int, default=d.seed, help="study seed (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="C++ threads per point (default: all cores)")
    p.add_argument("--beyond-max-context", choices=("flag", "skip"), default="flag",
                   help="contexts above a model's max_context: compute and flag them (default) or skip them")
    p.add_argument("--tie", type=float, default=DEFAULT_TIE,
                   help="ratios within this fraction of 1 are ties (default %(default)s)")
    p.add_argument("--table", action="store_true", help="also print every point (the table in summary.md)")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.add_argument("--no-resume", action="store_true", help="discard this study's checkpoint and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is shown only on a terminal)")
    add_executor_args(p)
    p.set_defaults(handler=_run_study_cli)

    s = sub.add_parser("simulate", help="simulate one point: MoE vs its dense twin",
                       description="One point: the MoE's and its dense twin's best plan, batch, TPOT and "
                                   "tokens/s on one cluster at one context, and the ratio.")
    s.add_argument("--model", required=True, help="MoE model: shipped name, TOML or HF config.json")
    s.add_argument("--cluster", required=True, help="cluster: shipped name, 'NxGPU' (8xH200) or TOML file")
    s.add_argument("--context", required=True, help="context length: 32768 or 32K")
    s.add_argument("--q", type=_q_arg, default=None, help="twin size multiplier > 0 or 'sqrt' (default sqrt)")
    s.add_argument("--dense", default=None, help="explicit dense model instead of a twin (must be dense)")
    s.add_argument("--routing", default="uniform", help="routing model of the Monte Carlo (default uniform)")
    s.add_argument("--precision", default=None, choices=sorted(PRESETS), metavar="PRESET",
                   help="precision preset (default: the model's deployed precision)")
    s.add_argument("--microbatches", type=_microbatches_arg, default="auto",
                   help="routing Monte Carlo microbatches; 'auto' (default) or 0 = closed form")
    s.add_argument("--slo-tpot-ms", type=_slo_arg, default=DEFAULT_SLO_TPOT, metavar="MS",
                   help="the p99 per-token latency (ms) both sides are compared at, or 'none' "
                        f"(default {DEFAULT_SLO_TPOT * 1e3:g})")
    _request_args(s)
    s.add_argument("--seed", type=int, default=None, help="seed (default: fresh entropy, printed)")
    s.add_argument("--threads", type=int, default=None, help="C++ threads (default: all cores)")
    s.add_argument("--json", action="store_true", help="print the full result as JSON")
    s.set_defaults(handler=_run_simulate_cli)


def _study_command(args) -> str:
    """The command line that resumes this study (same settings)."""
    import shlex

    argv = getattr(args, "_argv", None)
    if argv is not None:
        return "qsengine " + " ".join(shlex.quote(a) for a in argv if a != "--no-resume")
    return "qsengine study (same arguments)"


def _output_tokens(text: str) -> int:
    """--output: 0 or a token count like 2048 / 2K."""
    import argparse

    try:
        return 0 if str(text).strip() == "0" else parse_tokens(text, "--output")
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(f"{exc} (0: decode only)") from None


def _request_args(p) -> None:
    """The workload and serving options of ``study`` and ``simulate``: --output / --prefill (whole
    requests, docs/model.md "Whole requests"), the length laws, the serving engine and speculative decoding."""
    p.add_argument("--output", type=_output_tokens, default=0, metavar="TOKENS",
                   help="generated tokens per request, e.g. 2K; the context is then the prompt (default 0: decode "
                        "only at the context)")
    p.add_argument("--prefill", choices=("none", "colocated", "disaggregated"), default="none",
                   help="prefill costed on the decode GPUs (colocated) or a separate pool (disaggregated); the "
                        "ratio is then end-to-end (default none: decode only)")
    for flag, what in (("--context-dist", "prompt"), ("--output-dist", "output")):
        p.add_argument(flag, default="fixed", metavar="LAW",
                       help=f"law of the {what} length around its mean: fixed (default), uniform:W, exponential, "
                            "lognormal:S (docs/model.md \"Length distributions\")")
    p.add_argument("--serving", choices=("qsengine", "vllm", "sglang", "trtllm"), default="qsengine",
                   help="serving engine's memory policy and batch cap (default qsengine: the accelerator spec's "
                        "usable HBM, no cap; docs/model.md 'Serving engines')")
    p.add_argument("--draft-tokens", type=int, default=0, metavar="D",
                   help="speculative decoding / MTP on both sides: draft tokens per step (default 0: off; "
                        "docs/model.md 'Speculative decoding')")
    p.add_argument("--acceptance", type=float, default=0.0, metavar="A",
                   help="probability that a draft token is accepted given the ones before it were (default 0)")


def _request_kwargs(args) -> dict:
    """The keyword arguments of :func:`_request_args`' options."""
    return dict(output=args.output, prefill=args.prefill, context_dist=args.context_dist, output_dist=args.output_dist,
                serving=args.serving, draft_tokens=args.draft_tokens, acceptance=args.acceptance)


def _run_study_cli(args) -> int:
    from qsengine.sweep_cli import executor_from_args, interrupted_message

    cfg = StudyConfig(models=tuple(args.models), clusters=tuple(args.clusters), contexts=tuple(args.contexts),
                      q=args.q, routing=args.routing, precision=args.precision, microbatches=args.microbatches,
                      slo_tpot=args.slo_tpot_ms, twins=tuple(args.twins), seed=args.seed,
                      threads=args.threads, out=args.out, beyond_max_context=args.beyond_max_context, tie=args.tie,
                      **_request_kwargs(args))
    ck = checkpoint_dir(cfg)  # validates everything before any work
    progress = not args.no_progress and sys.stderr.isatty()
    try:
        with executor_from_args(args) as executor:
            df = run_study(cfg, progress=progress, figures=not args.no_figures, executor=executor,
                           resume=not args.no_resume)
    except KeyboardInterrupt:
        print(interrupted_message(ck, len(_validate(cfg).points), _study_command(args)), file=sys.stderr)
        return 130
    print(format_summary(df))
    if args.table:
        print(format_table(df))
        print()
    print(f"{len(df)} points ({df.attrs['computed_points']} computed, {df.attrs['resumed_points']} resumed) in "
          f"{df.attrs['elapsed_s']:.1f} s; summary.md, results.csv/parquet and figures in {df.attrs['out']}/")
    return 0


def _run_simulate_cli(args) -> int:
    from qsengine.decode.simulate import simulate
    from qsengine.specs.loaders import as_model, default_precision

    model = as_model(args.model)
    if args.dense is not None and as_model(args.dense).is_moe:
        raise ValueError(f"--dense {args.dense!r}: is an MoE model; the dense side must be a dense model")
    precision = args.precision if args.precision is not None else default_precision(model).name
    res = simulate(model, args.cluster, parse_tokens(args.context), q=args.q, dense=args.dense,
                   routing=args.routing, precision=precision, microbatches=args.microbatches,
                   slo_tpot=args.slo_tpot_ms, seed=args.seed,
                   threads=args.threads, **_request_kwargs(args))
    if args.json:
        print(json.dumps(res.to_dict(), indent=2, default=str))
    else:
        print(res.summary())
    return 0
