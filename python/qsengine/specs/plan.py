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

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Plan:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    etp: int | None = None
    attn_dp: bool = False

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

    @classmethod
    def fixed(cls, context: int) -> "Workload":
        return cls(context=context)

    @classmethod
    def distribution(cls, lengths: Sequence[int], weights: Sequence[float] | None = None) -> "Workload":
        lengths = tuple(int(x) for x in lengths)
        w = tuple(float(x) for x in (weights if weights is not None else [1.0] * len(lengths)))
        total = sum(w)
        mean = round(sum(l * x for l, x in zip(lengths, w)) / total) if total > 0 else 0
        return cls(context=mean, lengths=lengths, weights=w)

    @property
    def is_distribution(self) -> bool:
        return len(self.lengths) > 0
