"""Parallel plans and workloads.

A plan places one model on ``G = dp · pp · tp`` GPUs:

* attention, dense FFN, norms, embeddings and LM head are sharded ``tp`` ways
  (tensor parallel) and split into ``pp`` pipeline stages; each of the ``dp``
  data-parallel replicas holds a full copy.
* routed experts of each stage are spread over ``ep · etp`` GPUs of the stage's
  ``dp · tp`` GPUs: ``ep`` groups of whole experts (expert parallel), each
  expert split ``etp`` ways (expert tensor parallel); the stage holds
  ``dp·tp / (ep·etp)`` copies of every expert.
* ``redundant``: redundant expert slots (DeepSeek EPLB,
  https://github.com/deepseek-ai/EPLB): each EP group holds ``E + redundant``
  expert slots, ``(E + redundant)/ep`` per GPU, the extra ones replicas of the
  most loaded experts; so ``ep`` need only divide ``E + redundant``.
* ``attn_dp``: attention data-parallel (SGLang DP-attention): attention and
  other non-expert weights are replicated on every GPU of the stage instead
  of tensor-sharded; each GPU serves its own sequences, the MoE runs EP over
  the stage. For a dense model only attention and norms are replicated: its
  FFN, embedding and LM head stay tensor-parallel over the ``tp`` GPUs of a
  replica, which gather their sequences' activations for the FFN (attention
  DP + TP FFN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from qsengine import _core
from qsengine.errors import SpecError
from qsengine.specs._validate import check_bool, check_float, check_int, check_opt_int, current_source, fail, type_fail

if TYPE_CHECKING:
    from qsengine.specs.hardware import Cluster
    from qsengine.specs.model import Model


def _violation(src: str, violation: tuple[str, str, str]) -> SpecError:
    """The core's (field, value, rule) of a broken plan rule, in the package's format."""
    field, value, rule = violation
    return SpecError(f"{src}: field {field!r} = {value}: {rule}")


@dataclass(frozen=True)
class Plan:
    """A parallel plan: degrees ``tp``, ``pp``, ``dp``, ``ep``, ``etp`` (None:
    the default, ``tp`` without EP and 1 with EP), ``attn_dp`` and
    ``redundant`` (extra expert slots per EP group holding replicas, EPLB).

    The rules a plan must follow live once, in the C++ core
    (``cpp/core/packing.h``, ``PlanRule``): the model-independent ones are
    checked here on construction, the rest by :meth:`validate_for` (and by
    every packing call); :func:`qsengine.packing.plans` lists exactly the
    plans they accept. The text form (:attr:`label`, :meth:`from_label`) is
    the core's too.
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    etp: int | None = None
    attn_dp: bool = False
    redundant: int = 0

    def __post_init__(self) -> None:
        src = current_source("Plan")
        for f in ("tp", "pp", "dp", "ep"):
            check_int(src, f, getattr(self, f), minimum=1)
        check_opt_int(src, "etp", self.etp, minimum=1)
        check_bool(src, "attn_dp", self.attn_dp)
        check_int(src, "redundant", self.redundant, minimum=0)
        violation = _core.check_plan_shape(self.core_desc())
        if violation is not None:
            raise _violation(src, violation)

    @classmethod
    def from_label(cls, text: str) -> "Plan":
        """The plan of a label ``tp<n>-pp<n>-dp<n>-ep<n>[-etp<n>][-red<n>][-adp]``
        (the format of :attr:`label`; parts in any order, missing parts take
        their default): ``Plan.from_label(p.label) == p`` for every plan whose
        ``etp`` is None or not the default."""
        src = current_source("Plan")
        if not isinstance(text, str):
            raise type_fail(src, "plan", text, "a plan label such as 'tp8-pp1-dp1-ep8'")
        try:
            d = _core.parse_plan_label(text)
        except ValueError as exc:
            raise SpecError(f"{src}: field 'plan' = {text!r}: {exc}") from None
        return cls(tp=d.tp, pp=d.pp, dp=d.dp, ep=d.ep, etp=d.etp or None, attn_dp=d.attn_dp, redundant=d.redundant)

    def core_desc(self) -> Any:
        """The core's ``PlanDesc`` of this plan (``etp`` 0 for the default)."""
        return _core.PlanDesc(int(self.tp), int(self.pp), int(self.dp), int(self.ep),
                              0 if self.etp is None else int(self.etp), bool(self.attn_dp), int(self.redundant))

    def validate_for(self, model: "Model", cluster: "Cluster") -> "Plan":
        """Check that this plan fits ``model`` on ``cluster``; return ``self``.

        The rules (``PlanRule`` in ``cpp/core/packing.h``, checked in this
        order; the first broken one is raised as a :class:`SpecError` naming
        the field, the value and the rule):

        * ``ep·etp`` divides ``dp·tp``, the GPUs of one pipeline stage
          (checked on construction);
        * ``tp·pp·dp`` equals the cluster's GPUs (every GPU serves);
        * ``pp`` ≤ the model's layers (every stage holds a layer);
        * unless ``attn_dp``: ``tp`` divides the query heads; for MHA/GQA
          ``tp`` divides the KV heads or is a multiple of them (each KV head
          then replicated on ``tp / kv_heads`` GPUs); MLA's latent KV is
          shared by all heads and has no such constraint;
        * a dense model has ``ep`` = 1; a MoE's ``ep`` divides the routed
          experts plus ``redundant`` (the EP group's expert slots) and ``etp``
          divides the expert FFN width;
        * ``redundant`` > 0 only for a MoE with ``ep`` > 1, at most
          ``E·(ep−1)`` (the copies of one expert sit on distinct GPUs).
        """
        from qsengine.packing import memory_description  # packing imports the specs
        from qsengine.specs.hardware import Cluster
        from qsengine.specs.model import Model

        if not isinstance(model, Model):
            raise type_fail("Plan", "model", model, "a Model")
        if not isinstance(cluster, Cluster):
            raise type_fail("Plan", "cluster", cluster, "a Cluster")
        self.check_desc(memory_description(model), cluster.num_gpus,
                        f"Plan {self.label} for {model.id} on {cluster.label}")
        return self

    def check_desc(self, desc: Any, num_gpus: int, src: str) -> None:
        """:meth:`validate_for` on the core's memory description of the model
        (``qsengine.packing.memory_description``) and a GPU count; ``src``
        starts the message."""
        violation = _core.check_plan(desc, self.core_desc(), int(num_gpus))
        if violation is not None:
            raise _violation(src, violation)

    @property
    def num_gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def expert_tp(self) -> int:
        """Expert tensor-parallel degree: default ``tp`` without EP, 1 with EP."""
        if self.etp is not None:
            return self.etp
        return self.tp if self.ep == 1 else 1

    @property
    def expert_copies(self) -> int:
        """Copies of each EP group (of all expert slots) per pipeline stage."""
        return (self.dp * self.tp) // (self.ep * self.expert_tp)

    def slots_per_gpu(self, experts: int) -> int:
        """Expert slots on each GPU of an EP group for a MoE of ``experts``
        routed experts: ``(experts + redundant) / ep``."""
        return (int(experts) + self.redundant) // self.ep

    @property
    def label(self) -> str:
        """``tp<n>-pp<n>-dp<n>-ep<n>[-etp<n>][-red<n>][-adp]`` (``etp`` only
        when not the default, ``red`` only when > 0); :meth:`from_label` reads
        it back."""
        return self.core_desc().label


@dataclass(frozen=True)
class Workload:
    """Decode workload: a fixed context length, or a distribution of lengths.

    ``lengths``/``weights`` describe a discrete distribution of context lengths
    (weights need not be normalised). ``context`` is the length used where a
    single number is needed (the mean for a distribution).
    """

    context: int
    lengths: tuple[int, ...] = ()
    weights: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        src = current_source("Workload")
        check_int(src, "context", self.context, minimum=1)
        if not isinstance(self.lengths, tuple):
            raise type_fail(src, "lengths", self.lengths, "a tuple of ints")
        if not isinstance(self.weights, tuple):
            raise type_fail(src, "weights", self.weights, "a tuple of numbers")
        for i, n in enumerate(self.lengths):
            check_int(src, f"lengths[{i}]", n, minimum=1)
        if len(self.weights) != len(self.lengths):
            raise fail(src, "weights", len(self.weights), f"needs one weight per length ({len(self.lengths)})")
        for i, w in enumerate(self.weights):
            check_float(src, f"weights[{i}]", w, allow_zero=True)
        if self.lengths and not sum(self.weights) > 0:
            raise fail(src, "weights", sum(self.weights), "must have positive total mass")

    @classmethod
    def fixed(cls, context: int) -> "Workload":
        return cls(context=context)

    @classmethod
    def distribution(cls, lengths: Sequence[int], weights: Sequence[float] | None = None) -> "Workload":
        lengths = tuple(lengths)
        w = tuple(weights) if weights is not None else (1.0,) * len(lengths)
        src = current_source("Workload")
        if not lengths:
            raise fail(src, "lengths", lengths, "must not be empty")
        lengths = tuple(check_int(src, f"lengths[{i}]", n, minimum=1) for i, n in enumerate(lengths))
        if len(w) != len(lengths):
            raise fail(src, "weights", len(w), f"needs one weight per length ({len(lengths)})")
        wf = tuple(check_float(src, f"weights[{i}]", x, allow_zero=True) for i, x in enumerate(w))
        total = math.fsum(wf)
        if not total > 0:
            raise fail(src, "weights", total, "must have positive total mass")
        mean = max(1, round(math.fsum(n * x for n, x in zip(lengths, wf)) / total))
        return cls(context=mean, lengths=lengths, weights=wf)

    @property
    def is_distribution(self) -> bool:
        return len(self.lengths) > 0
