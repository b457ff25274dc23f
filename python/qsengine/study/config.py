"""The study's inputs: defaults, token counts (``128K``), canonical cluster names,
:class:`StudyConfig` and its validation into a grid before any work."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qsengine.decode.point import DEFAULT_SLO_TPOT


DEFAULT_MODELS: tuple[str, ...] = ("deepseek-v3", "qwen3-235b-a22b", "grok-1", "switch-c-2048")
DEFAULT_CLUSTERS: tuple[str, ...] = (
    "8xh100", "8xh200", "8xb200", "8xmi300x", "8xmi355x", "16xh100", "32xh100", "72xgb200",
)
DEFAULT_CONTEXTS: tuple[int, ...] = (4096, 8192, 16384, 32768, 65536, 131072)
DEFAULT_SEED = 20261128
#: Ratios within this relative distance of 1 are ties: the step model's
#: efficiency constants (docs/model.md) are not known to better than a few
#: percent, so a smaller difference is not an answer.
DEFAULT_TIE = 0.02
#: z of the normal 99th percentile: sd ≈ (p99 − mean) / 2.326.
_Z99 = 2.326



# ---------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------

_TOKENS_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")


def parse_tokens(text: str | int, what: str = "context") -> int:
    """A token count from ``32768``, ``"32768"``, ``"32K"`` / ``"32k"`` (×1024)
    or ``"1M"`` (×1024²); must be a positive integer."""
    if isinstance(text, bool):
        raise TypeError(f"{what}={text!r}: must be a number of tokens like 32768 or 32K")
    if isinstance(text, int):
        n = text
    else:
        m = _TOKENS_RE.match(str(text).replace("_", ""))
        if not m:
            raise ValueError(f"{what}={text}: must be a number of tokens like 32768, 32K or 1M")
        value = float(m.group(1)) * {"": 1, "k": 1024, "m": 1024 ** 2}[m.group(2).lower()]
        if value != int(value):
            raise ValueError(f"{what}={text}: must be a whole number of tokens")
        n = int(value)
    if n < 1:
        raise ValueError(f"{what}={text}: must be >= 1 token")
    return n


def format_tokens(n: int) -> str:
    """``131072`` -> ``"128K"``; counts that are not a multiple of 1024 as is."""
    if n >= 1024 ** 2 and n % 1024 ** 2 == 0:
        return f"{n // 1024 ** 2}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}K"
    return f"{n:,}"


def cluster_display(cluster: Any) -> str:
    """Canonical cluster name: ``8×H100``, ``32×H100``, ``72×GB200``."""
    from qsengine.specs.loaders import as_cluster

    c = as_cluster(cluster)
    acc = re.sub(r"-sxm\d*$", "", c.accelerator.id).upper()
    return f"{c.num_gpus}×{acc}"


#: What each twin shape is, in the study's words.
TWIN_SHAPE_TEXT = {
    "same": "same (the MoE's depth, width and attention; every extra parameter in the FFN width)",
    "gqa": "gqa (a conventional dense shape: Llama-3 proportions, hidden/layers 128, FFN 3.5x hidden, 8 KV heads)",
}


@dataclass(frozen=True)
class StudyConfig:
    """What the study runs; every field has a documented default.

    ``precision=None`` runs each model at its deployed precision
    (:func:`qsengine.default_precision`); ``beyond_max_context`` is "flag"
    (computed, marked in every output) or "skip" (not computed, listed in the
    summary) for contexts above a model's ``max_context``; ``tie`` is the
    relative band around ratio 1 called a tie (widened to twice the Monte
    Carlo's standard error where that is larger); ``twins`` are the dense
    twin shapes compared with each MoE point (``"same"``: the MoE's shape with
    a wider FFN; ``"gqa"``: a conventional dense shape; see
    :class:`qsengine.TwinSpec`)."""

    models: tuple[str, ...] = DEFAULT_MODELS
    clusters: tuple[str, ...] = DEFAULT_CLUSTERS
    contexts: tuple[int | str, ...] = DEFAULT_CONTEXTS
    q: float | str = "sqrt"
    routing: Any = "uniform"
    precision: str | None = None
    microbatches: int | str = "auto"
    slo_tpot: float | None = DEFAULT_SLO_TPOT
    twins: tuple[str, ...] = ("same", "gqa")
    seed: int = DEFAULT_SEED
    threads: int | None = None
    out: Path = field(default_factory=lambda: Path("qsengine-out") / "study")
    beyond_max_context: str = "flag"
    tie: float = DEFAULT_TIE
    #: whole requests (point fields ``output``, ``prefill``; docs/model.md "Whole requests"): 0 and "none"
    #: study decode only at each context; with output >= 1 each context is the prompt length
    output: int = 0
    prefill: str = "none"
    #: length laws of the prompt and the output around their means (point fields ``context_dist``,
    #: ``output_dist``: "fixed", "uniform:W", "exponential", "lognormal:S"; docs/model.md "Length distributions")
    context_dist: str = "fixed"
    output_dist: str = "fixed"
    #: the serving engine's memory policy and batch cap (qsengine.specs.serving: "qsengine", "vllm", "sglang",
    #: "trtllm")
    serving: str = "qsengine"
    #: speculative decoding / MTP on both sides: draft tokens per step and their acceptance rate
    #: (docs/model.md "Speculative decoding"); 0 = off
    draft_tokens: int = 0
    acceptance: float = 0.0


#: StudyConfig fields passed to every point when they differ from the point's default
_POINT_OPTIONS = ("output", "prefill", "context_dist", "output_dist", "serving", "draft_tokens", "acceptance")


def _workload(cfg: StudyConfig) -> tuple[str, str]:
    """(sentence, short label) of the studied workload."""
    from qsengine.decode.prefill import LengthDist

    laws = [f"{what} {LengthDist.parse(law).label}" for what, law in (("prompt", cfg.context_dist),
                                                                       ("output", cfg.output_dist))
            if LengthDist.parse(law).label != "fixed"]
    law_text = f"; lengths: {', '.join(laws)} around the means" if laws else ""
    if not cfg.output:
        return ("every sequence at the studied context (decode, full KV cache)" + law_text,
                "decode at context" + (f" ({', '.join(laws)})" if laws else ""))
    sentence = (f"requests: the studied context in, {cfg.output:,} tokens out, prefill {cfg.prefill} (ratio "
                + ("end-to-end, output tokens/s per GPU including prefill)" if cfg.prefill != "none"
                   else "decode only, KV cache growing from the context)") + law_text)
    return sentence, (f"requests: context in, {format_tokens(cfg.output)} out, prefill {cfg.prefill}"
                      + (f" ({', '.join(laws)})" if laws else ""))


@dataclass(frozen=True)
class _Plan:
    """The validated study: grid points (simulate kwargs) and run settings."""

    points: list[dict[str, Any]]
    skipped: list[tuple[str, int, int]]  # (model, context, max_context) not computed
    settings: dict[str, Any]
    models: dict[str, Any]  # id -> Model
    key: str


def _validate(cfg: StudyConfig) -> _Plan:
    """Every input checked (and every spec loaded) before any work."""
    from qsengine import __version__, code_fingerprint
    from qsengine.specs.loaders import as_cluster, as_model, as_precision, default_precision

    if not cfg.models or not cfg.clusters or not cfg.contexts:
        raise ValueError("study: give at least one model, one cluster and one context")
    contexts = [parse_tokens(t) for t in cfg.contexts]
    models = {}
    spelled = {}  # id -> the name or path as given (what the sweep loads)
    for name in cfg.models:
        m = as_model(name)
        if not m.is_moe:
            raise ValueError(f"models: {name!r} is dense; the study compares an MoE model with its dense twin")
        models[m.id] = m
        spelled.setdefault(m.id, name)
    clusters = [as_cluster(c) for c in cfg.clusters]
    q = cfg.q
    # the study's point fields are checked by the points' own validation (one rule set, one message format)
    from qsengine.decode.point import check_value

    if q is None:
        raise ValueError("field 'q' = None: the study needs a number > 0 or 'sqrt' (0 is not 'unset')")
    check_value("q", q)
    check_value("slo_tpot", cfg.slo_tpot)
    check_value("routing", cfg.routing)
    check_value("microbatches", cfg.microbatches)
    from qsengine.decode.point import FIELDS

    for f in _POINT_OPTIONS:
        check_value(f, getattr(cfg, f))
    options = {f: getattr(cfg, f) for f in _POINT_OPTIONS if getattr(cfg, f) != FIELDS[f]}
    from qsengine.specs.twin import TWIN_ATTENTION

    twins = tuple(cfg.twins) if not isinstance(cfg.twins, str) else (cfg.twins,)
    if not twins or len(set(twins)) != len(twins) or any(t not in TWIN_ATTENTION for t in twins):
        raise ValueError(f"twins={cfg.twins!r}: must be distinct twin shapes among {list(TWIN_ATTENTION)}")
    if cfg.beyond_max_context not in ("flag", "skip"):
        raise ValueError(f"beyond_max_context={cfg.beyond_max_context!r}: must be 'flag' or 'skip'")
    if not (isinstance(cfg.tie, (int, float)) and 0 <= cfg.tie < 1):
        raise ValueError(f"tie={cfg.tie!r}: must be a fraction in [0, 1)")
    precision = {mid: (as_precision(cfg.precision) if cfg.precision is not None else default_precision(m)).name
                 for mid, m in models.items()}
    points: list[dict[str, Any]] = []
    skipped: list[tuple[str, int, int]] = []
    for mid, m in models.items():
        for c, cname in zip(clusters, cfg.clusters):
            for t in contexts:
                if cfg.beyond_max_context == "skip" and m.max_context is not None and t > m.max_context:
                    if (mid, t, m.max_context) not in skipped:
                        skipped.append((mid, t, m.max_context))
                    continue
                for tw in twins:  # innermost: the twins of one MoE point share its Monte Carlo (one chunk)
                    points.append({"model": spelled[mid], "cluster": cname, "context": t, "q": q,
                                   "routing": cfg.routing, "precision": precision[mid],
                                   "microbatches": cfg.microbatches, "slo_tpot": cfg.slo_tpot,
                                   "twin_attention": tw, **options})
    if not points:
        raise ValueError("study: every point is beyond its model's max_context and beyond_max_context='skip'")
    workload, workload_label = _workload(cfg)
    settings = {
        "precision": precision if cfg.precision is None else cfg.precision,
        "precision_rule": "deployed precision per model" if cfg.precision is None else "given",
        "routing": cfg.routing if isinstance(cfg.routing, str) else repr(cfg.routing),
        "twin": f"q = {q}" + (" (1/sqrt(s))" if q == "sqrt" else "") + "; shapes: " + ", ".join(
            TWIN_SHAPE_TEXT[t] for t in twins),
        "workload": workload,
        "workload_label": workload_label,
        "serving": cfg.serving,
        "speculative": "off" if not cfg.draft_tokens else
                       f"{cfg.draft_tokens} draft token(s) per step at acceptance {cfg.acceptance:g} (both sides)",
        "slo_tpot_ms": None if cfg.slo_tpot is None else cfg.slo_tpot * 1e3,
        "microbatches": cfg.microbatches,
        "seed": cfg.seed,
        "tie": cfg.tie,
        "beyond_max_context": cfg.beyond_max_context,
        "qsengine_version": __version__,
        "qsengine_code": code_fingerprint(),  # the version is the same at every commit; this is not
    }
    # the key covers the specs' content too: an edited model or cluster file gets its own checkpoint;
    # not the code fingerprint: a checkpoint of other code is refused by the sweep (meta.json "code"),
    # never left behind beside a new one at every edit
    ident = json.dumps({"points": points, "seed": cfg.seed, "version": __version__,
                        "specs": [repr(m) for m in models.values()] + [repr(c) for c in clusters]},
                       sort_keys=True, default=repr)
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return _Plan(points=points, skipped=skipped, settings=settings, models=models, key=key)


def checkpoint_dir(config: StudyConfig) -> Path:
    """Where :func:`run_study` keeps (and resumes) the completed points of ``config``."""
    return Path(config.out) / "checkpoint" / _validate(config).key
