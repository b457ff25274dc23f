"""Serving-engine memory policies and batch caps.

An engine decides how much of each GPU's HBM holds weights and the KV cache
and how many sequences one scheduler runs at once; the batch a plan admits,
and so its throughput, follow. A :class:`ServingPolicy` states those
decisions with their sources; :func:`serving_policy` looks one up by name
(the point field ``serving``). Each policy is applied to the accelerator
(:meth:`ServingPolicy.accelerator`: ``usable_hbm_fraction``,
``runtime_reserve_bytes``, ``kv_fraction``) and caps the sequences per
scheduler (:meth:`ServingPolicy.max_sequences`; one scheduler per replica, or
per attention rank under attention data-parallelism).

Policies (defaults of each engine, as their source code sets them):

* ``"qsengine"`` (default): the accelerator spec's own budget, usable HBM
  = ``hbm x usable_hbm_fraction - runtime_reserve`` (0.9 and 4 GB for the
  shipped specs), all of it after the weights for KV, no sequence cap.
* ``"vllm"``: ``gpu_memory_utilization = 0.9`` of HBM for weights, KV and
  activations (vllm/config/cache.py, ``CacheConfig``), the activation and
  CUDA-graph memory inside it (qsengine's runtime reserve stands for what
  vLLM profiles at start-up); ``max_num_seqs`` = 1024 on GPUs with at least
  70 GiB that are not A100s, else 256 (vllm/engine/arg_utils.py,
  ``get_batch_defaults``, OpenAI server).
* ``"sglang"``: ``mem_fraction_static`` = (M - R)/M of HBM for weights and
  the KV pool, R from SGLang's heuristic in MiB (python/sglang/srt/server_args.py,
  ``_handle_gpu_memory_settings``): R = 512 + 1.5·max(chunked_prefill, 2048)
  + 2·cuda_graph_max_bs + 1024·tp·pp/8, at least 10 GiB on GPUs above 60 GiB;
  chunked_prefill 8192 below 160 GiB and 16384 above, cuda_graph_max_bs 512
  (tp >= 4); evaluated for one node of tensor parallelism (tp = the node's
  GPUs, pp = 1, no attention-DP padding, which SGLang adds on top); no sequence
  cap beyond the KV pool.
* ``"trtllm"``: the KV cache gets ``free_gpu_memory_fraction = 0.9`` of the
  memory left after weights and the runtime's buffers
  (tensorrt_llm/llmapi/llm_args.py ``KvCacheConfig``); ``max_batch_size`` =
  2048 per rank (``BuildConfig.max_batch_size``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from qsengine.errors import SpecError
from qsengine.specs._validate import did_you_mean
from qsengine.specs.hardware import Accelerator

__all__ = ["ServingPolicy", "SERVING_POLICIES", "serving_policy"]

_MIB = 1 << 20
_GIB = 1 << 30


def _vllm_max_seqs(acc: Accelerator) -> int:
    big = acc.hbm_bytes >= 70 * _GIB and "a100" not in acc.id.lower()
    return 1024 if big else 256


def _sglang_fraction(acc: Accelerator) -> float:
    """SGLang's default ``mem_fraction_static`` for one node of tensor parallelism."""
    m = acc.hbm_bytes / _MIB
    tp = acc.gpus_per_node
    chunk = 16384 if m >= 160 * 1024 else (8192 if m >= 60 * 1024 else 4096)
    graph_bs = 512 if (tp >= 4 or m >= 160 * 1024) else 256
    reserved = 512 + 1.5 * max(chunk, 2048) + 2 * graph_bs + tp / 8 * 1024
    if m > 60 * 1024:
        reserved = max(reserved, 10 * 1024)
    return round((m - reserved) / m, 3)


@dataclass(frozen=True)
class ServingPolicy:
    """One serving engine's memory budget and batch cap.

    Attributes:
        name: the policy's name (the point field ``serving``).
        description: one line on what it sets.
    """

    name: str
    description: str

    def accelerator(self, acc: Accelerator) -> Accelerator:
        """``acc`` with this engine's HBM budget (the spec itself for ``"qsengine"``)."""
        if self.name == "vllm":
            return dataclasses.replace(acc, usable_hbm_fraction=0.9, kv_fraction=1.0)
        if self.name == "sglang":
            return dataclasses.replace(acc, usable_hbm_fraction=_sglang_fraction(acc), runtime_reserve_bytes=0.0,
                                       kv_fraction=1.0)
        if self.name == "trtllm":
            return dataclasses.replace(acc, usable_hbm_fraction=1.0, kv_fraction=0.9)
        return acc

    def max_sequences(self, acc: Accelerator) -> int:
        """Sequences one scheduler runs at most (0: no cap beyond memory)."""
        if self.name == "vllm":
            return _vllm_max_seqs(acc)
        if self.name == "trtllm":
            return 2048
        return 0


#: The policies by name, in the order documented above.
SERVING_POLICIES: dict[str, ServingPolicy] = {
    "qsengine": ServingPolicy("qsengine", "the accelerator spec's usable HBM fraction and reserve, no batch cap"),
    "vllm": ServingPolicy("vllm", "gpu_memory_utilization 0.9, max_num_seqs 1024 (256 below 70 GiB or on A100)"),
    "sglang": ServingPolicy("sglang", "mem_fraction_static from SGLang's memory heuristic, no batch cap"),
    "trtllm": ServingPolicy("trtllm", "free_gpu_memory_fraction 0.9 for the KV cache, max_batch_size 2048"),
}


def serving_policy(name: "str | ServingPolicy") -> ServingPolicy:
    """The policy called ``name`` (case-insensitive; a :class:`ServingPolicy` passes through)."""
    if isinstance(name, ServingPolicy):
        return name
    if not isinstance(name, str):
        raise TypeError(f"serving: must be a policy name, got {type(name).__name__}")
    key = name.strip().lower().replace("_", "-").replace("tensorrt-llm", "trtllm")
    if key not in SERVING_POLICIES:
        raise SpecError(f"serving: {name!r}: unknown policy; known: {list(SERVING_POLICIES)}"
                        f"{did_you_mean(key, SERVING_POLICIES)}")
    return SERVING_POLICIES[key]
