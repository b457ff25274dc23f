"""Parallel plans and workloads.

A plan places one model on ``G = dp · pp · tp`` GPUs:

* attention, dense FFN, norms, embeddings and LM head are sharded ``tp`` ways
  (tensor parallel) and split into ``pp`` pipeline stages; each of the ``dp``
  data-parallel replicas holds a full copy.
* routed experts of each stage are spread over ``ep · etp`` GPUs of the stage's
  ``dp · tp`` GPUs: ``ep`` groups of whole experts (expert parallel), each
  expert split ``etp`` ways (expert tensor parallel); the stage holds
  ``dp·tp / (ep·etp)`` copies of every expert.
* ``attn_dp``: attention data-parallel (SGLang DP-attention): attention and
  other non-expert weights are replicated on every GPU of the stage instead
  of tensor-sharded; each GPU serves its own sequences, the MoE runs EP over
  the stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from qsengine.specs._validate import check_bool, check_float, check_int, check_opt_int, current_source, fail, type_fail

if TYPE_CHECKING:
    from qsengine.specs.hardware import Cluster
    from qsengine.specs.model import Model


@dataclass(frozen=True)
class Plan:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    etp: int | None = None
    attn_dp: bool = False

    def __post_init__(self) -> None:
        src = current_source("Plan")
        for f in ("tp", "pp", "dp", "ep"):
            check_int(src, f, getattr(self, f), minimum=1)
        check_opt_int(src, "etp", self.etp, minimum=1)
        check_bool(src, "attn_dp", self.attn_dp)
        if (self.dp * self.tp) % (self.ep * self.expert_tp):
            raise fail(src, "ep", self.ep,
                       f"ep x etp ({self.ep} x {self.expert_tp}) must divide dp x tp ({self.dp} x {self.tp}), "
                       "the GPUs of one pipeline stage")

    def validate_for(self, model: "Model", cluster: "Cluster") -> "Plan":
        """Check that this plan fits ``model`` on ``cluster``; return ``self``.

        Rules (each failure names the field, the value and the rule):

        * ``tp·pp·dp`` divides the cluster's GPUs (extra whole copies of the
          plan serve more traffic);
        * ``tp`` divides the query heads (unless ``attn_dp``). For GQA, when
          ``tp`` exceeds the KV heads each KV head is replicated on
          ``tp / kv_heads`` GPUs, so ``kv_heads`` must divide ``tp``; otherwise
          ``tp`` must divide ``kv_heads``. MLA's latent KV is shared by all
          heads and has no such constraint;
        * ``ep`` divides the routed experts (``ep`` must be 1 for a dense
          model), ``etp`` divides the expert FFN width;
        * ``pp`` ≤ decode layers.
        """
        from qsengine.specs.hardware import Cluster
        from qsengine.specs.model import Model

        if not isinstance(model, Model):
            raise type_fail("Plan", "model", model, "a Model")
        if not isinstance(cluster, Cluster):
            raise type_fail("Plan", "cluster", cluster, "a Cluster")
        src = f"Plan {self.label} for {model.id} on {cluster.label}"
        if cluster.num_gpus % self.num_gpus:
            raise fail(src, "tp*pp*dp", self.num_gpus, f"must divide the cluster's GPUs ({cluster.num_gpus})")
        a = model.attention
        if not self.attn_dp:
            if a.num_heads % self.tp:
                raise fail(src, "tp", self.tp, f"must divide num_heads ({a.num_heads})")
            if a.kind != "mla":
                kv = a.num_kv_heads
                if self.tp <= kv and kv % self.tp:
                    raise fail(src, "tp", self.tp, f"must divide num_kv_heads ({kv})")
                if self.tp > kv and self.tp % kv:
                    raise fail(src, "tp", self.tp,
                               f"exceeds num_kv_heads ({kv}) and must be a multiple of it (KV heads are replicated)")
        if model.is_moe:
            if model.routed_experts % self.ep:
                raise fail(src, "ep", self.ep, f"must divide routed_experts ({model.routed_experts})")
            if model.moe_intermediate % self.expert_tp:
                raise fail(src, "etp", self.expert_tp, f"must divide moe_intermediate ({model.moe_intermediate})")
        elif self.ep != 1:
            raise fail(src, "ep", self.ep, f"must be 1 for a dense model ({model.id})")
        if self.pp > model.decode_layers:
            raise fail(src, "pp", self.pp, f"must be <= decode layers ({model.decode_layers})")
        return self

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
        """Copies of each expert per pipeline stage."""
        return (self.dp * self.tp) // (self.ep * self.expert_tp)

    @property
    def label(self) -> str:
        s = f"tp{self.tp}-pp{self.pp}-dp{self.dp}-ep{self.ep}"
        if self.etp is not None and self.etp != (self.tp if self.ep == 1 else 1):
            s += f"-etp{self.etp}"
        return s + ("-adp" if self.attn_dp else "")


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
