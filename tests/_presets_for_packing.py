"""Shipped presets used by the packing tests (loaded by name, as users do)."""

from __future__ import annotations

from qsengine import load_accelerator, load_model
from qsengine.specs import Accelerator, Cluster, Model

DEEPSEEK_V3 = load_model("deepseek-v3")
SWITCH_C = load_model("switch-c-2048")
QWEN3_235B = load_model("qwen3-235b-a22b")
LLAMA_31_70B = load_model("llama-3.1-70b")

H100 = load_accelerator("h100-sxm")
H200 = load_accelerator("h200-sxm")
B200 = load_accelerator("b200")
GB200 = load_accelerator("gb200")
MI300X = load_accelerator("mi300x")


def dense_twin(moe: Model, q: float | None = None) -> Model:
    """The quality-matched dense twin (q = 1/sqrt(s) by default)."""
    return moe.dense_twin("sqrt" if q is None else q)


def cluster(acc: Accelerator, n: int) -> Cluster:
    return Cluster(acc, n)
