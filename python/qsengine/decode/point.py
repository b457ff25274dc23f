"""One comparison point: its fields, their defaults, and their validation.

A *point* is everything that defines one MoE-vs-dense comparison (the keyword
arguments of :func:`qsengine.simulate` without ``seed``/``threads``). Every
field is checked here, once, by the same code whichever entry point received
it: :func:`qsengine.simulate` (one point), :func:`qsengine.sweep` and the
study (a grid, checked per distinct value and per distinct combination before
any work), and the vectorised pipeline (:mod:`qsengine.decode.pipeline`).

Messages have one format, ``field '<name>' = <value>: <rule>``; a sweep
prefixes ``grid:`` or ``grid point <i>:``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from qsengine.errors import QsengineWarning
from qsengine.specs import Cluster, Model, Plan, Precision, TwinSpec

__all__ = ["DEFAULT_SLO_TPOT", "FIELDS", "Value", "Validator", "Point", "ContextWarning", "canonical_json", "plain"]

#: ``microbatches`` default of a point.
DEFAULT_MICROBATCHES = "auto"

#: ``slo_tpot`` default of a point: both sides are compared at equal latency,
#: each at its best throughput with a p99 time per output token of at most
#: 50 ms (20 tokens/s per user). For scale, MLPerf Inference v5.0 bounds the
#: p99 TPOT at 40 ms in its interactive Llama-2-70B scenario and at 200 ms in
#: the original server scenario (https://mlcommons.org/2025/04/llm-inference-v5/).
#: ``slo_tpot=None`` drops the target: each side at the largest batch its HBM
#: holds (maximum throughput, at whatever latency that gives); the
#: maximum-throughput ratio is reported beside the headline either way.
DEFAULT_SLO_TPOT = 0.050

#: The point fields, in canonical order, and their defaults (``...`` = required).
FIELDS: dict[str, Any] = {
    "model": ...,
    "cluster": ...,
    "context": ...,
    "q": None,
    "dense": None,
    "routing": "uniform",
    "plan": "auto",
    "precision": None,
    "microbatches": DEFAULT_MICROBATCHES,
    "rtol": 1e-3,
    "slo_tpot": DEFAULT_SLO_TPOT,
    "batch": None,
    "twin_attention": "same",
    "break_even": True,
    "options": None,
    "output": 0,
    "prefill": "none",
    "draft_tokens": 0,
    "acceptance": 0.0,
    "context_dist": "fixed",
    "output_dist": "fixed",
    "serving": "qsengine",
}


class ContextWarning(QsengineWarning):
    """A point's context is longer than the model's published maximum context.

    The result is computed (the physics does not stop at the limit) but the
    model was not trained for it. ``strict=True`` (simulate, sweep) makes it
    an error."""


def plain(x: Any) -> Any:
    """A JSON-able, canonical form of ``x`` (dataclasses by type and fields)."""
    import dataclasses
    from collections.abc import Mapping

    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, numbers.Integral):
        return int(x)
    if isinstance(x, numbers.Real):
        return float(x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        d = {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
        return {"__type__": type(x).__name__, **d}
    if isinstance(x, Mapping):
        return {str(k): plain(v) for k, v in sorted(x.items(), key=lambda kv: str(kv[0]))}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return [plain(v) for v in x.tolist()]
    if hasattr(x, "to_dict"):
        return {"__type__": type(x).__name__, **plain(x.to_dict())}
    return {"__repr__": repr(x)}


def canonical_json(x: Any) -> str:
    """Sorted-key, compact JSON of a :func:`plain` value (what a point id hashes)."""
    return json.dumps(x, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _err(field: str, value: Any, rule: str, exc: type[Exception] = ValueError) -> Exception:
    return exc(f"field {field!r} = {value!r}: {rule}")


@dataclass(frozen=True)
class Value:
    """One validated field value.

    ``arg``: the value as given (normalised: ``"sqrt"``, floats, ints);
    ``obj``: the resolved object the pipeline uses (a Model, Cluster,
    Precision, StepOptions, routing model, or ``arg``); ``canon``: its
    canonical JSON (names resolved to their spec content, defaults filled
    in); ``display``: its short form for tables (ids, labels)."""

    arg: Any
    obj: Any
    canon: str
    display: Any


def _spec(field: str, v: Any, loader: Callable[[Any], Any], kind: type, display: Callable[[Any], Any]) -> Value:
    if not isinstance(v, (str, kind)):
        raise _err(field, v, f"must be a shipped name, a TOML path or a {kind.__name__}, got {type(v).__name__}",
                   TypeError)
    try:
        obj = loader(v)
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        if msg.startswith(f"field {field!r} = "):  # the loader already names the field
            raise
        raise type(exc)(f"field {field!r} = {v!r}: {msg}") from None
    return Value(v, obj, canonical_json(plain(obj)), display(obj))


def check_value(field: str, v: Any) -> Value:
    """Validate one field's value on its own; raise naming the field, the value and the rule."""
    from qsengine.specs.loaders import as_cluster, as_model, as_precision

    if field == "model":
        val = _spec(field, v, as_model, Model, lambda m: m.id)
        if not val.obj.is_moe:
            raise _err(field, v, "is a dense model; a point compares an MoE model with a dense one "
                                 "(give the MoE as model and the dense model as dense)")
        return val
    if field == "dense":
        if v is None:
            return Value(None, None, "null", None)
        val = _spec(field, v, as_model, Model, lambda m: m.id)
        if val.obj.is_moe:
            raise _err(field, v, "is an MoE model; the dense side must be a dense model "
                                 "(or leave dense=None for the quality-matched twin)")
        return val
    if field == "cluster":
        return _spec(field, v, as_cluster, Cluster, lambda c: c.label)
    if field == "precision":
        if v is None:  # the MoE's deployed precision (qsengine.default_precision), for both sides
            return Value(None, None, "null", "deployed")
        return _spec(field, v, as_precision, Precision, lambda p: p.name)
    if field == "context":
        if not _is_int(v):
            raise _err(field, v, f"must be an int number of tokens, got {type(v).__name__}", TypeError)
        if v < 1:
            raise _err(field, v, "must be >= 1 token")
        if v > 2**53:
            raise _err(field, v, "must be <= 2^53 tokens")
        return Value(int(v), int(v), str(int(v)), int(v))
    if field == "q":
        if v is None:
            return Value(None, None, "null", None)
        if isinstance(v, str):
            if v.strip().lower() != "sqrt":
                raise _err(field, v, "must be a positive number or 'sqrt'")
            return Value("sqrt", "sqrt", '"sqrt"', "sqrt")
        if not _is_real(v):
            raise _err(field, v, f"must be a positive number, 'sqrt' or None, got {type(v).__name__}", TypeError)
        if not (math.isfinite(v) and v > 0):
            raise _err(field, v, "must be a finite number > 0")
        return Value(float(v), float(v), canonical_json(float(v)), float(v))
    if field == "routing":
        from qsengine.routing import parse_routing

        try:
            obj = parse_routing(v)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"field 'routing' = {v!r}: {exc}") from None
        return Value(v, obj, canonical_json(plain(obj)), v.strip() if isinstance(v, str) else repr(v))
    if field == "plan":
        if isinstance(v, str):
            if v != "auto":
                raise _err(field, v, "must be 'auto' or a qsengine.Plan")
            return Value(v, v, '"auto"', "auto")
        if not isinstance(v, Plan):
            raise _err(field, v, f"must be 'auto' or a qsengine.Plan, got {type(v).__name__}", TypeError)
        return Value(v, v, canonical_json(plain(v)), v.label)
    if field == "microbatches":
        if isinstance(v, str) and v == "auto":
            return Value("auto", "auto", '"auto"', "auto")
        if not _is_int(v):
            raise _err(field, v, f"must be 'auto' or an int >= 0, got {type(v).__name__}", TypeError)
        if v < 0:
            raise _err(field, v, "must be 'auto' or an int >= 0")
        return Value(int(v), int(v), str(int(v)), int(v))
    if field == "rtol":
        if not _is_real(v):
            raise _err(field, v, f"must be a number in (0, 1), got {type(v).__name__}", TypeError)
        if not (0 < v < 1):
            raise _err(field, v, "must be in (0, 1): the relative standard error microbatches='auto' runs to")
        return Value(float(v), float(v), canonical_json(float(v)), float(v))
    if field == "slo_tpot":
        if v is None:
            return Value(None, None, "null", None)
        if not _is_real(v):
            raise _err(field, v, f"must be a positive number of seconds or None, got {type(v).__name__}",
                       TypeError)
        if not (math.isfinite(v) and v > 0):
            raise _err(field, v, "must be a finite number of seconds > 0 (None for no target)")
        return Value(float(v), float(v), canonical_json(float(v)), float(v))
    if field == "batch":
        if v is None:
            return Value(None, None, "null", None)
        if not _is_int(v):
            raise _err(field, v, f"must be an int number of sequences per replica or None, got {type(v).__name__}",
                       TypeError)
        if not 1 <= v <= 2**40:
            raise _err(field, v, "must be >= 1 sequence per replica (and <= 2^40)")
        return Value(int(v), int(v), str(int(v)), int(v))
    if field == "twin_attention":
        from qsengine.specs.twin import TWIN_ATTENTION

        if isinstance(v, TwinSpec):  # validated by its constructor
            return Value(v, v, canonical_json(plain(v)), v.label)
        if not isinstance(v, str):
            raise _err(field, v, f"must be one of {list(TWIN_ATTENTION)} or a TwinSpec, got {type(v).__name__}",
                       TypeError)
        if v not in TWIN_ATTENTION:
            raise _err(field, v, f"must be one of {list(TWIN_ATTENTION)} or a TwinSpec")
        return Value(v, v, canonical_json(v), v)
    if field == "break_even":
        if not isinstance(v, (bool, np.bool_)):
            raise _err(field, v, f"must be True or False, got {type(v).__name__}", TypeError)
        return Value(bool(v), bool(v), canonical_json(bool(v)), bool(v))
    if field == "options":
        from qsengine.decode.params import StepOptions

        if v is None:
            v = StepOptions()
        if not isinstance(v, StepOptions):
            raise _err(field, v, f"must be a qsengine.StepOptions or None, got {type(v).__name__}", TypeError)
        return Value(v, v, canonical_json(plain(v)), repr(v))
    if field == "output":  # generated tokens per request (0: decode only at a fixed context)
        if not _is_int(v):
            raise _err(field, v, f"must be an int number of generated tokens per request, got {type(v).__name__}",
                       TypeError)
        if not 0 <= v <= 2**53:
            raise _err(field, v, "must be >= 0 generated tokens per request (0: decode at a fixed context) "
                                 "and <= 2^53")
        return Value(int(v), int(v), str(int(v)), int(v))
    if field == "prefill":
        from qsengine.decode.prefill import PREFILL_MODES

        if not isinstance(v, str):
            raise _err(field, v, f"must be one of {list(PREFILL_MODES)}, got {type(v).__name__}", TypeError)
        if v not in PREFILL_MODES:
            raise _err(field, v, f"must be one of {list(PREFILL_MODES)}")
        return Value(v, v, canonical_json(v), v)
    if field in ("context_dist", "output_dist"):  # length laws of I and O (docs/model.md "Length distributions")
        from qsengine.decode.prefill import LengthDist

        d = LengthDist.parse(v, field)
        return Value(d.label, d, canonical_json(d.label), d.label)
    if field == "serving":  # the serving engine's memory policy and batch cap (qsengine.specs.serving)
        from qsengine.specs.serving import SERVING_POLICIES, ServingPolicy, serving_policy

        if not isinstance(v, (str, ServingPolicy)):
            raise _err(field, v, f"must be one of {list(SERVING_POLICIES)}, got {type(v).__name__}", TypeError)
        try:
            pol = serving_policy(v)
        except ValueError:
            raise _err(field, v, f"must be one of {list(SERVING_POLICIES)}") from None
        return Value(pol.name, pol, canonical_json(pol.name), pol.name)
    if field in ("draft_tokens", "acceptance"):  # speculative decoding (docs/model.md, "Speculative decoding")
        from qsengine.decode.params import check_speculation

        check_speculation(v, 0.0) if field == "draft_tokens" else check_speculation(0, v)
        c = int(v) if field == "draft_tokens" else float(v)
        return Value(c, c, canonical_json(c), c)
    raise AssertionError(field)  # pragma: no cover


def with_speculation(options: Any, draft_tokens: int, acceptance: float) -> Any:
    """``options`` (a StepOptions) carrying a point's speculative decoding;
    the same object when ``draft_tokens`` is 0, whatever the acceptance (no
    drafts: nothing to accept), so every non-speculative result is unchanged."""
    import dataclasses

    if not draft_tokens:
        return options
    return dataclasses.replace(options, draft_tokens=int(draft_tokens), acceptance=float(acceptance))


def _key(field: str, v: Any) -> tuple:
    try:
        key = (field, type(v), v)
        hash(key)
        return key
    except TypeError:
        return (field, "id", id(v))


class Validator:
    """Checks point fields value by value (cached per distinct value) and
    points as a whole (cached per distinct combination that matters): the
    one validation of simulate, sweep and the study."""

    def __init__(self, strict: bool = False) -> None:
        self.strict = bool(strict)
        self._values: dict[tuple, Value] = {}
        self._done: dict[tuple, None] = {}
        self._beyond: dict[tuple[str, int], list[int]] | None = None

    def value(self, field: str, v: Any) -> Value:
        key = _key(field, v)
        got = self._values.get(key)
        if got is None:
            got = self._values[key] = check_value(field, v)
        return got

    def point(self, values: dict[str, Value]) -> None:
        """Cross-field checks of one point: q or dense (not both), the twin
        can be built, the plan fits the model on the cluster, a closed-form
        point (``microbatches=0``) has independent routing, the context is
        within the models' maximum (a :class:`ContextWarning`, an error when
        strict). Each check runs once per distinct combination it reads."""
        for fields, check in self.CHECKS:
            key = (check, *(values[f].canon for f in fields))
            if key not in self._done:
                check(self, values)
                self._done[key] = None

    def _batch(self, values: dict[str, Value]) -> None:
        # a fixed batch is evaluated as given: the default latency target does not apply to it
        slo = values["slo_tpot"].obj
        if values["batch"].obj is not None and slo is not None and slo != DEFAULT_SLO_TPOT:
            raise ValueError(f"fields 'batch' = {values['batch'].obj} and 'slo_tpot' = {slo}: "
                             "give a fixed batch or a latency target, not both")

    def _twin(self, values: dict[str, Value]) -> None:
        q, dense, att = values["q"], values["dense"], values["twin_attention"]
        if dense.arg is not None and q.arg is not None:
            raise ValueError(f"fields 'q' = {q.arg!r} and 'dense' = {dense.display!r}: "
                             "give either q or dense, not both")
        if dense.arg is None:
            try:
                values["model"].obj.dense_twin("sqrt" if q.arg is None else q.arg, attention=att.arg)
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"field 'q' = {q.arg!r}: no dense twin can be built: {exc}") from None

    def _plan(self, values: dict[str, Value]) -> None:
        plan = values["plan"].obj
        if isinstance(plan, str):
            return
        for m in (values["model"].obj, values["dense"].obj):
            if m is None:
                continue
            try:
                (plan if m.is_moe or (plan.ep == 1 and plan.etp is None and plan.redundant == 0)
                 else dataclasses.replace(plan, ep=1, etp=None, redundant=0)).validate_for(m, values["cluster"].obj)
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"field 'plan' = {plan.label!r}: {exc}") from None

    def _context(self, values: dict[str, Value]) -> None:
        context = values["context"].obj + values["output"].obj  # the peak cache of a request
        for side, m in (("model", values["model"].obj), ("dense", values["dense"].obj)):
            if m is not None and m.max_context is not None and context > m.max_context:
                msg = (f"field 'context' = {context}: beyond {side} {m.id}'s maximum context "
                       f"({m.max_context:,} tokens)") if not values["output"].obj else (
                    f"fields 'context' = {values['context'].obj} and 'output' = {values['output'].obj}: the peak "
                    f"cache ({context:,} tokens) is beyond {side} {m.id}'s maximum context ({m.max_context:,} tokens)")
                if self.strict:
                    raise ValueError(msg + " (strict=True)")
                if self._beyond is not None:  # a grid: one warning for all, after the checks
                    self._beyond.setdefault((m.id, m.max_context), []).append(context)
                    continue
                warnings.warn(msg + "; the result extrapolates past what the model was trained for",
                              ContextWarning, stacklevel=5)

    def _law(self, values: dict[str, Value]) -> None:
        if values["microbatches"].obj != 0:
            return
        from qsengine.routing import independent_popularity

        try:
            independent_popularity(values["routing"].obj, values["model"].obj.routed_experts)
        except ValueError as exc:
            raise ValueError(f"field 'routing' = {values['routing'].display!r}: {exc}") from None

    def _speculation(self, values: dict[str, Value]) -> None:
        opts = values["options"].obj
        if opts.draft_tokens != 0 or opts.acceptance != 0.0:
            raise ValueError(f"field 'options' = {opts!r}: leave draft_tokens and acceptance at 0 in options; "
                             "speculative decoding is set by the point fields 'draft_tokens' and 'acceptance'")

    def _request(self, values: dict[str, Value]) -> None:
        out, mode, ctx = values["output"].obj, values["prefill"].obj, values["context"].obj
        if mode != "none" and out < 1:
            raise ValueError(f"fields 'prefill' = {mode!r} and 'output' = {out}: a prefill mode needs whole "
                             "requests: give output >= 1 generated tokens per request")
        if ctx + out > 2**53:
            raise ValueError(f"fields 'context' = {ctx} and 'output' = {out}: context + output must be <= 2^53 tokens")
        for name in ("context_dist", "output_dist"):
            if out < 1 and not values[name].obj.is_fixed:
                raise ValueError(f"fields {name!r} = {values[name].arg!r} and 'output' = {out}: a length "
                                 "distribution needs whole requests: give output >= 1 generated tokens per request")

    def _kv_layout(self, values: dict[str, Value]) -> None:
        # a KV layout other than "plain" describes MLA caches (FlashMLA's fp8 cache); asked of a model without
        # MLA it would silently change nothing, so it is refused (a GQA dense twin just keeps a plain cache)
        from qsengine.specs.loaders import default_precision

        m = values["model"].obj
        prec = values["precision"].obj or default_precision(m)
        if prec.kv_layout != "plain" and m.attention.kind != "mla":
            raise ValueError(f"field 'precision' = {prec.name!r}: its kv_layout {prec.kv_layout!r} stores MLA "
                             f"caches; model {m.id} has {m.attention.kind} attention (use a plain-layout precision, "
                             "e.g. 'fp8')")

    #: (fields read, check) of :meth:`point`
    CHECKS: tuple[tuple[tuple[str, ...], Callable[["Validator", dict[str, Value]], None]], ...] = (
        (("model", "q", "dense", "twin_attention"), _twin),
        (("model", "dense", "plan", "cluster"), _plan),
        (("model", "dense", "context", "output"), _context),
        (("model", "routing", "microbatches"), _law),
        (("model", "precision"), _kv_layout),
        (("batch", "slo_tpot"), _batch),
        (("context", "output", "prefill", "context_dist", "output_dist"), _request),
        (("options",), _speculation),
    )

    def points(self, values: dict[str, list[Value]], codes: dict[str, np.ndarray], n: int,
               where: Callable[[int, dict[str, Value]], str] | None = None) -> None:
        """:meth:`point` for ``n`` points given column-wise, each check once per
        distinct combination of the fields it reads (first occurrence first).
        ``where(i, values)`` prefixes a failing point's message."""
        from qsengine._groups import group

        self._beyond: dict[tuple[str, int], list[int]] | None = {}
        for fields, check in self.CHECKS:
            _, first = group(n, *(codes[f] for f in fields))
            for i in first.tolist():
                pv = {f: values[f][int(codes[f][i])] for f in FIELDS}
                try:
                    self.point_check(check, fields, pv)
                except (ValueError, TypeError) as exc:
                    if where is None:
                        raise
                    raise type(exc)(f"{where(i, pv)}: {exc}") from None
        beyond, self._beyond = self._beyond, None
        if beyond:
            parts = [f"{mid} (max {mx:,} tokens): {len(cs)} context(s) from {min(cs):,} to {max(cs):,}"
                     for (mid, mx), cs in beyond.items()]
            warnings.warn("field 'context': beyond the model's maximum context for " + "; ".join(parts)
                          + "; those results extrapolate past what the models were trained for (strict=True "
                          "refuses them)", ContextWarning, stacklevel=4)

    def point_check(self, check: Callable, fields: tuple[str, ...], values: dict[str, Value]) -> None:
        key = (check, *(values[f].canon for f in fields))
        if key not in self._done:
            check(self, values)
            self._done[key] = None


@dataclass(frozen=True)
class Point:
    """A validated point: every field resolved to the object the pipeline uses."""

    model: Model
    cluster: Cluster
    context: int
    q: float | str | None
    dense: Model | None
    routing: Any
    plan: Plan | str
    precision: Precision
    microbatches: int | str
    rtol: float
    slo_tpot: float | None
    batch: int | None
    twin_attention: str | TwinSpec
    break_even: bool
    options: Any
    output: int
    prefill: str
    draft_tokens: int
    acceptance: float
    context_dist: Any
    output_dist: Any
    serving: Any
    values: dict[str, Value]

    @classmethod
    def make(cls, *, strict: bool = False, **kwargs: Any) -> "Point":
        """Validate ``kwargs`` (point fields; defaults filled in) into a Point."""
        from qsengine.specs._validate import did_you_mean

        for k in kwargs:
            if k not in FIELDS:
                raise TypeError(f"unknown point field {k!r}{did_you_mean(k, list(FIELDS))}")
        v = Validator(strict)
        values: dict[str, Value] = {}
        for f, d in FIELDS.items():
            if d is ... and f not in kwargs:
                raise TypeError(f"required field {f!r} is missing")
            values[f] = v.value(f, kwargs.get(f, d))
        v.point(values)
        obj = {f: values[f].obj if f not in ("q",) else values[f].arg for f in FIELDS}
        if obj["precision"] is None:
            from qsengine.specs.loaders import default_precision

            obj["precision"] = default_precision(obj["model"])
        # the step model reads speculative decoding from its options (the pipeline folds it the same way)
        obj["options"] = with_speculation(obj["options"], obj["draft_tokens"], obj["acceptance"])
        return cls(**obj, values=values)

    def columns(self) -> dict[str, tuple[list[Any], np.ndarray]]:
        """This point as pipeline columns (one lane)."""
        return {f: ([val], np.zeros(1, dtype=np.int64)) for f, val in self.values.items()}
