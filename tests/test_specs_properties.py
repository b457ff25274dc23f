"""Hypothesis properties over random valid architectures."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qsengine import Attention, Model, SpecError


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def attentions(draw, hidden: int) -> Attention:
    kind = draw(st.sampled_from(["mha", "gqa", "mla"]))
    head_dim = draw(st.sampled_from([32, 64, 96, 128, 192, 256]))
    kv = draw(st.integers(1, 16))
    heads = kv * draw(st.integers(1, 8))
    if kind == "mha":
        kv = heads
    if kind == "mla":
        rope = draw(st.integers(1, head_dim - 1))
        return Attention(
            kind="mla", num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
            v_head_dim=draw(st.sampled_from([64, 128])), q_lora_rank=draw(st.none() | st.integers(16, 2048)),
            kv_lora_rank=draw(st.integers(16, 1024)), qk_rope_head_dim=rope,
            qk_nope_head_dim=draw(st.sampled_from([None, head_dim - rope])),
        )
    return Attention(kind=kind, num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
                     v_head_dim=draw(st.none() | st.sampled_from([64, 128])), qkv_bias=draw(st.booleans()))


@st.composite
def architectures(draw) -> Model:
    hidden = draw(st.integers(256, 8192))
    layers = draw(st.integers(1, 96))
    encoder = draw(st.integers(0, layers - 1)) if draw(st.booleans()) else 0
    moe = draw(st.integers(0, layers))
    att = draw(attentions(hidden))
    decode = layers - encoder
    local = draw(st.integers(0, decode))
    if local:
        att = Attention(**{**att.__dict__, "local_layers": local, "local_window": draw(st.integers(1, 65536)),
                           "local_kind": draw(st.sampled_from(["sliding", "chunked"]))})
    kw = {}
    if moe:
        experts = draw(st.integers(1, 512))
        groups = draw(st.sampled_from(_divisors(experts)))
        top_groups = draw(st.integers(1, groups))
        kw = dict(routed_experts=experts, expert_groups=groups, top_groups=top_groups,
                  top_k=draw(st.integers(1, min(experts, top_groups * (experts // groups)))),
                  moe_intermediate=draw(st.integers(64, 32768)))
        if draw(st.booleans()):
            kw.update(shared_experts=draw(st.integers(1, 2)), shared_intermediate=draw(st.integers(64, 16384)))
    return Model(
        id="rand", name="random", num_layers=layers, hidden_size=hidden, vocab_size=draw(st.integers(1000, 262144)),
        attention=att, dense_layers=layers - moe, moe_layers=moe,
        dense_intermediate=draw(st.integers(64, 65536)) if layers - moe else 0,
        gated_ffn=draw(st.booleans()), ffn_bias=draw(st.booleans()), tie_embeddings=draw(st.booleans()),
        encoder_layers=encoder, cross_attention=bool(encoder) and draw(st.booleans()),
        published_total_params=draw(st.none() | st.floats(1e6, 1e13)),
        max_context=draw(st.none() | st.integers(1, 10_000_000)), notes=draw(st.text(max_size=30)), **kw,
    )


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(architectures())
def test_active_le_total_and_additive(m):
    by = m.params_by_component()
    assert all(v >= 0 for v in by.values())
    assert sum(by.values()) == m.total_params
    act = m.active_params_by_component()
    assert sum(act.values()) == m.active_params
    assert all(act[k] <= by[k] for k in by)
    assert 0 < m.active_params <= m.total_params
    assert 0 < m.sparsity <= 1
    if not m.is_moe:
        assert m.total_params - m.active_params == (0 if m.tie_embeddings else m.embedding_params)


@FAST
@given(architectures())
def test_toml_round_trip(m):
    back = Model.from_toml(m.to_toml())
    assert back == m
    assert back.notes == m.notes
    assert back.total_params == m.total_params


@FAST
@given(architectures(), st.integers(1, 1 << 22))
def test_kv_bounds(m, context):
    per = m.kv_bytes_per_token()
    seq = m.kv_bytes_per_sequence(context)
    assert m.kv_bytes_per_token_long() * context <= seq <= per * context
    assert m.kv_bytes_per_sequence(context, 1.0) * 2 == seq


@FAST
@given(architectures(), st.floats(1.0, 40.0))
def test_dense_twin_hits_q_times_active(m, q):
    try:
        t = m.dense_twin(q)
    except SpecError as exc:  # only when the model is too small for an integer FFN width
        assert "field 'q'" in str(exc)
        return
    assert math.isclose(t.active_params, q * m.active_params, rel_tol=0.005)
    assert t.kv_bytes_per_token() == m.kv_bytes_per_token()
    assert t.kv_bytes_per_sequence(100_000) == m.kv_bytes_per_sequence(100_000)
    assert not t.is_moe
