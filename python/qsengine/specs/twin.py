"""The quality-matched dense twin of a model, and the qs inequality.

A dense model matches an MoE's quality at ``q`` times the MoE's *active*
parameters (the study's size multiplier). The twin is built so that
``twin.active_params == q * moe.active_params`` (within 0.5%, in practice
within ~0.01%); see ``docs/model.md`` ("Dense twin construction").

``qs = q * s = N_dense / N_total``: below 1 the quality-matched dense model is
smaller than the weights the MoE keeps resident, and the MoE is structurally
disadvantaged in long-context decode.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass
from typing import Literal, Union

import numpy as np

from qsengine.errors import SpecError
from qsengine.specs._validate import check_float, did_you_mean
from qsengine.specs.model import Attention, Model

QLike = Union[float, int, Literal["sqrt"]]

#: Relative tolerance within which ``qs`` counts as 1 ("neutral").
QS_NEUTRAL_TOL = 1e-6
#: The conventional dense shape (``attention="gqa"``), from published dense
#: families. Llama 3 (arXiv:2407.21783, Table 3): 8B 32 layers x 4096 (aspect
#: 128), FFN 14,336 (3.5x); 70B 80 x 8192 (102), FFN 28,672 (3.5x); 405B
#: 126 x 16,384 (130), FFN 53,248 (3.25x); head width 128 and 8 KV heads in
#: all three. Qwen2.5-72B (its config.json): 80 x 8192, FFN 29,568 (3.6x),
#: head 128, 8 KV heads. Aspect ratio hidden_size / layers:
GQA_ASPECT = 128
#: Head width and KV heads of the conventional twin.
GQA_HEAD_DIM = 128
GQA_KV_HEADS = 8
#: FFN width / hidden size used to size the conventional twin's depth and
#: width (the FFN width itself is then solved exactly).
GQA_FFN_RATIO = 3.5


@dataclass(frozen=True)
class TwinSpec:
    """How a dense twin is shaped (everything but its size, which is q x the
    MoE's active parameters).

    ``kind="same"``: the MoE's depth, hidden size, attention, embeddings and
    FFN style, every extra parameter in the FFN width (KV bytes per token
    equal to the MoE's). ``kind="conventional"``: a decoder-only GQA model
    sized like published dense families: ``hidden / layers = aspect``, head
    width ``head_dim``, ``kv_heads`` KV heads (fewer when the head count is
    not a multiple), gated FFN; hidden size and depth are chosen for the
    target assuming FFN width ``ffn_ratio x hidden``, then the FFN width is
    solved exactly. The defaults are the Llama-3 family's (see
    :data:`GQA_ASPECT`). ``name``: the suffix of the twin's id (default: a
    label of the parameters).

    Named shapes (:data:`TWIN_SHAPES`): ``"same"`` and ``"gqa"`` (the
    conventional defaults); pass a ``TwinSpec`` wherever ``twin_attention`` /
    ``attention`` is accepted to override them.
    """

    kind: Literal["same", "conventional"] = "conventional"
    aspect: float = GQA_ASPECT
    ffn_ratio: float = GQA_FFN_RATIO
    head_dim: int = GQA_HEAD_DIM
    kv_heads: int = GQA_KV_HEADS
    name: str | None = None

    def __post_init__(self) -> None:
        src = "TwinSpec"
        if self.kind not in ("same", "conventional"):
            raise SpecError(f"{src}: field 'kind' = {self.kind!r}: must be 'same' or 'conventional'")
        for f in ("aspect", "ffn_ratio"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and 0 < v <= 1e6):
                raise SpecError(f"{src}: field {f!r} = {v!r}: must be a finite number in (0, 1e6]")
        for f in ("head_dim", "kv_heads"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1 << 20:
                raise SpecError(f"{src}: field {f!r} = {v!r}: must be an int in [1, 2^20]")
        if self.name is not None and (not isinstance(self.name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9._-]*",
                                                                                          self.name)):
            raise SpecError(f"{src}: field 'name' = {self.name!r}: must be lower-case letters, digits, '.', '_', '-'")
        named = globals().get("TWIN_SHAPES", {})
        if self.name in named and named[self.name] != TwinSpec(**{**self.__dict__, "name": None}):
            raise SpecError(f"{src}: field 'name' = {self.name!r}: names a shipped shape with other parameters")

    @property
    def label(self) -> str:
        """The suffix of the twin's id: ``name``, else ``same`` / ``gqa`` for
        the named shapes, else the parameters."""
        if self.name is not None:
            return self.name
        for k, v in TWIN_SHAPES.items():
            if v == self:
                return k
        return f"gqa-a{self.aspect:g}-f{self.ffn_ratio:g}-h{self.head_dim}-kv{self.kv_heads}"


#: The named twin shapes (``twin_attention=`` / ``attention=`` strings).
TWIN_SHAPES: dict[str, TwinSpec] = {"same": TwinSpec(kind="same"), "gqa": TwinSpec()}
#: Accepted ``attention=`` names of :func:`dense_twin` (or a :class:`TwinSpec`).
TWIN_ATTENTION = tuple(TWIN_SHAPES)


def as_twin_spec(attention: "str | TwinSpec") -> TwinSpec:
    """A twin shape by name (:data:`TWIN_SHAPES`) or as given; SpecError otherwise."""
    if isinstance(attention, TwinSpec):
        return attention
    if isinstance(attention, str) and attention in TWIN_SHAPES:
        return TWIN_SHAPES[attention]
    raise SpecError(f"dense twin: field 'attention' = {attention!r}: must be one of {list(TWIN_ATTENTION)} or a "
                    f"TwinSpec{did_you_mean(str(attention), TWIN_ATTENTION) if isinstance(attention, str) else ''}")


def resolve_q(model: Model, q: object) -> float:
    """The numeric size multiplier: ``q`` itself (finite, > 0) or, for
    ``"sqrt"``, the geometric-mean rule ``q = 1 / sqrt(s)``."""
    if isinstance(q, str):
        if q.strip().lower() == "sqrt":
            return 1.0 / math.sqrt(model.sparsity)
        raise SpecError(f"dense twin of {model.id}: field 'q' = {q!r}: must be a positive number or 'sqrt'"
                        f"{did_you_mean(q.strip().lower(), ['sqrt'])}")
    return check_float(f"dense twin of {model.id}", "q", q)


def _dense(model: Model, *, ident: str, name: str, notes: str, attention: Attention, num_layers: int,
           hidden: int, width: int, gated: bool, bias: bool, encoder_layers: int, cross: bool) -> Model:
    return Model(
        id=ident, name=name, num_layers=num_layers, hidden_size=hidden, vocab_size=model.vocab_size,
        attention=attention, dense_layers=num_layers, moe_layers=0, dense_intermediate=width,
        gated_ffn=gated, ffn_bias=bias, tie_embeddings=model.tie_embeddings, encoder_layers=encoder_layers,
        cross_attention=cross, source="", published_total_params=None, published_active_params=None,
        notes=notes, max_context=model.max_context,
        deployed_precision=model.deployed_precision,  # the twin is served like the MoE it stands for
        deployed_precision_source=model.deployed_precision_source,
    )


def solve_widths(a1, slope, target):
    """FFN widths for many targets at once (numpy arrays).

    ``a1`` = active parameters at width 1, ``slope`` = active parameters per
    unit of width (active parameters are affine in the width), ``target`` =
    q x active. Returns (width, exact): width 0 where even width 1 overshoots
    (exact < 1); a multiple of 128 when that misses the target by <= 0.1%;
    else the nearest integer."""
    a1 = np.asarray(a1, dtype=np.int64)
    slope = np.asarray(slope, dtype=np.int64)
    target = np.asarray(target, dtype=np.float64)
    exact = 1 + (target - a1) / slope
    w128 = np.maximum(128, np.round(exact / 128).astype(np.int64) * 128)
    ok128 = np.abs(a1 + (w128 - 1) * slope - target) <= 1e-3 * target
    wint = np.maximum(1, np.round(exact).astype(np.int64))
    width = np.where(exact < 1, 0, np.where(ok128, w128, wint))
    return width, exact


def twin_width_ok(a1, slope, width, target):
    """Whether a solved width is a valid twin: >= 1 and its active parameters
    a1 + (width - 1)·slope within :data:`TWIN_TOLERANCE` of the target."""
    width = np.asarray(width, dtype=np.int64)
    active = np.asarray(a1, dtype=np.int64) + (width - 1) * np.asarray(slope, dtype=np.int64)
    miss = active / np.asarray(target, dtype=np.float64) - 1.0
    return (width >= 1) & ~(np.abs(miss) > TWIN_TOLERANCE)


@dataclass(frozen=True)
class TwinShape:
    """Everything of a dense twin but its FFN width: twins of one shape differ
    only in the width, and their parameters are affine in it."""

    attention: Attention
    num_layers: int
    hidden: int
    gated: bool
    bias: bool
    encoder_layers: int
    cross: bool


@dataclass(frozen=True)
class TwinLine:
    """The twins of one MoE and one :class:`TwinShape`: ``base`` is the
    width-1 twin; a twin of width w has ``a1 + (w-1)·slope`` active and
    ``f1 + (w-1)·fslope`` dense-FFN parameters."""

    shape: TwinShape
    base: Model
    a1: int
    slope: int
    f1: int
    fslope: int

    def build(self, model: Model, width: int, ident: str, name: str, notes: str) -> Model:
        sh = self.shape
        return _dense(model, ident=ident, name=name, notes=notes, attention=sh.attention, num_layers=sh.num_layers,
                      hidden=sh.hidden, width=int(width), gated=sh.gated, bias=sh.bias,
                      encoder_layers=sh.encoder_layers, cross=sh.cross)

    def ffn_params(self, width: np.ndarray) -> np.ndarray:
        """Dense-FFN parameters of the twins of these widths (>= 1)."""
        return self.f1 + (np.maximum(np.asarray(width, dtype=np.int64), 1) - 1) * self.fslope


_LINES: dict[tuple[Model, TwinShape], TwinLine] = {}


def twin_line(model: Model, shape: TwinShape) -> TwinLine:
    """The :class:`TwinLine` of ``model``'s twins of ``shape`` (cached)."""
    got = _LINES.get((model, shape))
    if got is None:
        probe = TwinLine(shape, model, 0, 0, 0, 0)
        m1 = probe.build(model, 1, f"{model.id}-dense", f"{model.name} dense twin", "")
        m2 = probe.build(model, 2, f"{model.id}-dense", f"{model.name} dense twin", "")
        got = TwinLine(shape, m1, m1.active_params, m2.active_params - m1.active_params, m1.dense_ffn_params,
                       m2.dense_ffn_params - m1.dense_ffn_params)
        if len(_LINES) > 4096:
            _LINES.clear()
        _LINES[(model, shape)] = got
    return got


def _gqa_shape(model: Model, hidden: int, layers: int, spec: TwinSpec) -> TwinShape:
    heads = max(1, hidden // spec.head_dim)
    kv = math.gcd(spec.kv_heads, heads)
    att = Attention(kind="gqa" if kv != heads else "mha", num_heads=heads, num_kv_heads=kv, head_dim=spec.head_dim)
    return TwinShape(att, layers, hidden, True, False, 0, False)


@dataclass(frozen=True)
class TwinSolution:
    """Twins of one MoE for many q (:func:`solve_twins`): per lane the index
    of its line in ``lines``, its FFN width, and whether it is a valid twin;
    ``failure`` says why not (``"floor"``: even width 1 overshoots the target;
    ``"tolerance"``: the nearest width misses it by more than
    :data:`TWIN_TOLERANCE`; ``"size"``: q x active exceeds 2^53)."""

    lines: tuple[TwinLine, ...]
    line_of: np.ndarray
    width: np.ndarray
    ok: np.ndarray
    failure: np.ndarray  # object: "" where ok

    def ffn_params(self) -> np.ndarray:
        out = np.zeros(self.width.shape, dtype=np.float64)
        for i, line in enumerate(self.lines):
            sel = self.line_of == i
            out[sel] = line.ffn_params(self.width[sel])
        return out


def solve_twins(model: Model, qv: np.ndarray, attention: "str | TwinSpec" = "same") -> TwinSolution:
    """The dense twins of ``model`` for many numeric q at once: the one
    construction rule behind :func:`dense_twin` and the vectorised pipeline.

    ``attention`` (a :class:`TwinSpec` or a name in :data:`TWIN_SHAPES`):
    ``"same"``: one shape (the MoE's depth, hidden size, attention,
    embeddings and FFN style); conventional (``"gqa"``): hidden size and depth
    sized for the target assuming FFN width ``ffn_ratio`` x hidden (head
    width, KV heads and ``hidden / layers`` from the spec), one layer fewer
    while even width 1 overshoots. Then the FFN width is solved exactly on
    each shape's line."""
    spec = as_twin_spec(attention)
    qv = np.asarray(qv, dtype=np.float64).reshape(-1)
    n = qv.size
    target = qv * model.active_params
    width = np.zeros(n, dtype=np.int64)
    ok = np.zeros(n, dtype=bool)
    failure = np.full(n, "", dtype=object)
    line_of = np.zeros(n, dtype=np.int64)
    lines: list[TwinLine] = []
    index: dict[TwinShape, int] = {}
    big = ~(target <= 2.0**53)  # also inf/NaN: spec integers stay exact in a double
    failure[big] = "size"

    def place(lanes: np.ndarray, shape: TwinShape) -> None:
        k = index.get(shape)
        if k is None:
            k = index[shape] = len(lines)
            lines.append(twin_line(model, shape))
        line = lines[k]
        w, _ = solve_widths(np.full(lanes.size, line.a1), np.full(lanes.size, line.slope), target[lanes])
        line_of[lanes] = k
        width[lanes] = w
        good = twin_width_ok(line.a1, line.slope, w, target[lanes])
        ok[lanes] = good
        failure[lanes] = np.where(good, "", np.where(w < 1, "floor", "tolerance"))

    live = np.flatnonzero(~big)
    if spec.kind == "same":
        if live.size:
            place(live, TwinShape(model.attention, model.num_layers, model.hidden_size, model.gated_ffn,
                                  model.ffn_bias, model.encoder_layers, model.cross_attention))
        return TwinSolution(tuple(lines), line_of, width, ok, failure)
    # "gqa": size hidden and depth, then solve the FFN width
    per_layer_coef = 2 + 3 * spec.ffn_ratio  # q,o (2 d^2) + gated FFN (3 * ratio * d^2), K/V ignored for sizing
    t = target[live]
    d_real = (np.maximum(t, 1.0) * spec.aspect / per_layer_coef) ** (1 / 3)
    for _ in range(3):  # take the LM head / embedding out of the budget
        body = t - model.vocab_size * d_real
        d_real = (np.maximum(body, 1.0) * spec.aspect / per_layer_coef) ** (1 / 3)
    step = np.where(d_real >= 8 * spec.head_dim, 8 * spec.head_dim, spec.head_dim)
    hidden = np.maximum(spec.head_dim, np.round(d_real / step).astype(np.int64) * step)
    layers = np.maximum(1, np.round(hidden / spec.aspect).astype(np.int64))
    todo = np.arange(live.size)
    while todo.size:
        again = []
        keys = np.stack([hidden[todo], layers[todo]], axis=1)
        uniq, inv = np.unique(keys, axis=0, return_inverse=True)
        for j, (h, nl) in enumerate(uniq.tolist()):
            sel = todo[inv.reshape(-1) == j]
            place(live[sel], _gqa_shape(model, int(h), int(nl), spec))
            if nl > 1:
                retry = sel[width[live[sel]] < 1]
                layers[retry] -= 1
                again.append(retry)
        todo = np.concatenate(again) if again else np.zeros(0, dtype=np.int64)
    return TwinSolution(tuple(lines), line_of, width, ok, failure)


def twin_id(model: Model, qv: float, attention: "str | TwinSpec") -> str:
    """The id of ``model``'s twin at numeric ``qv`` (the records' ``dense_model``)."""
    label = as_twin_spec(attention).label
    return f"{model.id}-dense-q{qv:.2f}{'' if label == 'same' else '-' + label}"


def dense_twin(model: Model, q: QLike, attention: "str | TwinSpec" = "same") -> Model:
    """Dense model with ``q x model.active_params`` active parameters.

    ``attention="same"``: keep the depth (including any encoder layers),
    hidden size, attention block, embeddings and FFN style (gated or not, with
    or without biases); every layer gets a dense FFN whose width is solved so
    the active parameters hit the target. KV bytes per token are then equal to
    the MoE's.

    ``attention="gqa"``: a conventional decoder-only GQA shape (the Llama-3
    family's proportions): head width 128, 8 KV heads, ``hidden / layers =
    128``, gated FFN; hidden size and depth are sized for the target assuming
    FFN width 3.5 x hidden, then the FFN width is solved exactly. A
    :class:`TwinSpec` overrides those proportions.

    ``q`` may be ``"sqrt"`` (q = 1/sqrt(s)). Raises :class:`SpecError` if
    ``q`` is not a positive finite number, or if ``q x active`` is too small to
    hold even the non-FFN weights. One lane of :func:`solve_twins`.
    """
    if not isinstance(model, Model):
        raise TypeError(f"dense twin: model must be a Model, got {type(model).__name__}")
    qv = resolve_q(model, q)
    try:
        spec = as_twin_spec(attention)
    except SpecError as e:
        raise SpecError(f"dense twin of {model.id}: " + str(e).removeprefix("dense twin: ")) from None
    target = qv * model.active_params
    sol = solve_twins(model, np.array([qv]), attention)
    why = sol.failure[0]
    src = f"dense twin of {model.id}: field 'q' = {qv!r}"
    if why == "size":
        raise SpecError(f"{src}: q x active ({target:.4g}) exceeds 2^53 parameters")
    line = sol.lines[int(sol.line_of[0])]
    if why == "floor":
        if spec.kind == "same":
            floor = line.a1 - line.slope
            raise SpecError(f"{src}: q x active ({target:.4g}) is smaller than the twin's attention, norm and "
                            f"embedding weights ({floor:.4g}); q must be > {floor / model.active_params:.4g}")
        raise SpecError(f"{src}: q x active ({target:.4g}) is smaller than a one-layer GQA model of hidden size "
                        f"{line.shape.hidden} ({line.a1:.4g}); use attention='same' or a larger q")
    width = int(sol.width[0])
    if why == "tolerance":
        miss = (line.a1 + (width - 1) * line.slope) / target - 1.0
        raise SpecError(f"{src}: the nearest integer FFN width ({width}) misses q x active by {100 * miss:+.2f}% "
                        f"(> {100 * TWIN_TOLERANCE}%): the model is too small for this q; use a larger q")
    name = f"{model.name} dense twin (q={qv:.3g}, attention={spec.label})"
    notes = (f"Quality-matched dense twin of {model.id}: active parameters = q x {model.active_params} "
             f"with q = {qv!r} (twin shape {spec!r}).")
    return line.build(model, width, twin_id(model, qv, attention), name, notes)


#: Largest relative miss of ``q x active`` a twin may have.
TWIN_TOLERANCE = 0.005


class Verdict(str, enum.Enum):
    """Which side the qs inequality disadvantages in long-context decode."""

    MOE_DISADVANTAGED = "moe-disadvantaged"
    NEUTRAL = "neutral"
    DENSE_DISADVANTAGED = "dense-disadvantaged"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class QsResult:
    """The qs inequality for one model and size multiplier.

    Attributes:
        s: active / total parameters of the MoE.
        q: dense-twin size multiplier over the MoE's active parameters.
        qs: ``q * s = N_dense / N_total``.
        verdict: ``"moe-disadvantaged"`` when qs < 1 (the quality-matched
            dense model is smaller than the MoE's resident weights),
            ``"dense-disadvantaged"`` when qs > 1, ``"neutral"`` within
            :data:`QS_NEUTRAL_TOL` of 1.
        asymptotic_ratio: ``1 / qs``, the dense / MoE decode throughput
            ratio the qs inequality predicts **at equal batch when weight reads
            dominate the step** (bandwidth-bound, every expert touched each
            step, so each side reads all its weights per step). It is not the
            engine's long-context limit: there KV reads dominate both steps and
            the ratio is set by the batches each side's KV-free HBM holds and
            how each side's plan reads its KV (``why_headroom``,
            ``why_attention``; docs/model.md, section "qs").
        model: id of the MoE.
    """

    s: float
    q: float
    qs: float
    verdict: Verdict
    asymptotic_ratio: float
    model: str = ""


def qs(model: Model | str, q: QLike | Model | str = "sqrt") -> QsResult:
    """s, q, qs = q·s, the verdict and 1/(qs) for ``model``.

    ``q`` is a positive number, ``"sqrt"`` (q = 1/sqrt(s)), or an explicit
    dense model (then q = dense.active_params / model.active_params). ``model``
    (and a dense ``q``) may be a shipped name.
    """
    from qsengine.specs.loaders import as_model

    m = as_model(model)
    if isinstance(q, Model) or (isinstance(q, str) and q.strip().lower() != "sqrt"):
        try:
            dense = as_model(q)  # type: ignore[arg-type]
        except SpecError as exc:
            raise SpecError(f"qs of {m.id}: field 'q' = {q!r}: must be a positive number, 'sqrt' or a dense model "
                            f"({exc})") from None
        qv = dense.active_params / m.active_params
    else:
        qv = resolve_q(m, q)
    s = m.sparsity
    value = qv * s
    if math.isclose(value, 1.0, rel_tol=QS_NEUTRAL_TOL):
        verdict = Verdict.NEUTRAL
    elif value < 1.0:
        verdict = Verdict.MOE_DISADVANTAGED
    else:
        verdict = Verdict.DENSE_DISADVANTAGED
    return QsResult(s=s, q=qv, qs=value, verdict=verdict, asymptotic_ratio=1.0 / value, model=m.id)
