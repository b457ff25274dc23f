"""Models and accelerators the packing tests need, built directly from the
reference numbers in /work/shared/reference (models/*.toml, gpus/*.toml).

Temporary: the integrator will swap these for the shipped loaders
(``qsengine.specs.loaders.load_model("deepseek-v3")`` ...). SI units.
"""

from __future__ import annotations

import math

from qsengine.specs import Accelerator, Attention, Cluster, Model

# ----------------------------------------------------------------- models
DEEPSEEK_V3 = Model(
    id="deepseek-v3", name="DeepSeek-V3 (671B)", num_layers=61, hidden_size=7168, vocab_size=129280,
    attention=Attention(kind="mla", num_heads=128, num_kv_heads=128, head_dim=192, v_head_dim=128,
                        q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128),
    dense_layers=3, moe_layers=58, dense_intermediate=18432, routed_experts=256, top_k=8,
    moe_intermediate=2048, shared_experts=1, shared_intermediate=2048, expert_groups=8, top_groups=4,
    published_total_params=671e9, published_active_params=37e9,
)

SWITCH_C = Model(
    id="switch-c-2048", name="Switch Transformer C-2048 (1.6T)", num_layers=30, hidden_size=2080,
    vocab_size=32128, attention=Attention(kind="mha", num_heads=30, num_kv_heads=30, head_dim=64),
    dense_layers=0, moe_layers=30, routed_experts=2048, top_k=1, moe_intermediate=6144,
    gated_ffn=False, tie_embeddings=True, encoder_layers=15, published_total_params=1571e9,
)

QWEN3_235B = Model(
    id="qwen3-235b-a22b", name="Qwen3-235B-A22B", num_layers=94, hidden_size=4096, vocab_size=151936,
    attention=Attention(kind="gqa", num_heads=64, num_kv_heads=4, head_dim=128),
    dense_layers=0, moe_layers=94, routed_experts=128, top_k=8, moe_intermediate=1536,
    published_total_params=235e9, published_active_params=22e9,
)

LLAMA_31_70B = Model(
    id="llama-3.1-70b", name="Llama-3.1-70B", num_layers=80, hidden_size=8192, vocab_size=128256,
    attention=Attention(kind="gqa", num_heads=64, num_kv_heads=8, head_dim=128),
    dense_layers=80, moe_layers=0, dense_intermediate=28672, published_total_params=70e9,
)


def dense_twin(moe: Model, q: float | None = None) -> Model:
    """A dense model of q·N_active parameters (q defaults to 1/sqrt(s)) with
    the MoE's depth, width and attention; the FFN width is solved for."""
    s = moe.sparsity
    q = 1.0 / math.sqrt(s) if q is None else q
    target = q * moe.active_params
    base = Model(
        id=f"{moe.id}-dense-twin", name=f"dense twin of {moe.id}", num_layers=moe.num_layers,
        hidden_size=moe.hidden_size, vocab_size=moe.vocab_size, attention=moe.attention,
        dense_layers=moe.num_layers, moe_layers=0, dense_intermediate=1, gated_ffn=moe.gated_ffn,
        tie_embeddings=moe.tie_embeddings, encoder_layers=moe.encoder_layers,
    )
    per_width = base.num_layers * (3 if moe.gated_ffn else 2) * moe.hidden_size
    width = max(1, round((target - (base.total_params - per_width)) / per_width))
    return base.replace(dense_intermediate=width)


# ----------------------------------------------------------------- accelerators
def _acc(id: str, hbm_gb: float, bw_tbps: float, bf16_tflops: float, nvlink_gbs: float, net_gbit: float,
         per_node: int = 8, domain: int = 8) -> Accelerator:
    return Accelerator(
        id=id, name=id, hbm_bytes=hbm_gb * 1e9, hbm_bandwidth=bw_tbps * 1e12,
        flops={"bf16": bf16_tflops * 1e12, "fp8": 2 * bf16_tflops * 1e12},
        scaleup_bandwidth=nvlink_gbs * 1e9, internode_bandwidth=net_gbit * 1e9 / 8,
        gpus_per_node=per_node, scaleup_domain=domain,
    )


H100 = _acc("h100-sxm", 80, 3.35, 989.4, 450, 400)
H200 = _acc("h200-sxm", 141, 4.8, 989.4, 450, 400)
B200 = _acc("b200", 180, 8.0, 2250, 900, 400)
GB200 = _acc("gb200", 186, 8.0, 2500, 900, 400, per_node=4, domain=72)
MI300X = _acc("mi300x", 192, 5.3, 1307.4, 448, 400)


def cluster(acc: Accelerator, n: int) -> Cluster:
    return Cluster(acc, n)
