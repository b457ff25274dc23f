"""Parallel plans: one set of rules (the core's), one text format.

* ``Plan.from_label`` reads back ``Plan.label`` (hypothesis round trip).
* The core's enumeration (``qsengine.plans``) equals a slow, obvious Python
  enumeration written from the rules as documented (``Plan.validate_for``'s
  docstring, ``docs/packing.md``), over random toy models and GPU counts.
* ``Plan.validate_for`` accepts exactly those plans (up to the canonical form
  of equivalent plans), so a sweep refuses at validation what the core would
  refuse at run time.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qsengine as q
from qsengine import Attention, Cluster, Model, Plan, SpecError
from qsengine.packing.cli import _parse_plan

H100 = q.load_accelerator("h100")
PROPS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

degrees = st.integers(1, 64)


@st.composite
def plans_(draw) -> Plan:
    """Any plan that constructs: ep*etp divides dp*tp."""
    tp, pp, dp = draw(degrees), draw(st.integers(1, 8)), draw(degrees)
    stage = dp * tp
    divs = [d for d in range(1, stage + 1) if stage % d == 0]
    ep = draw(st.sampled_from(divs))
    etp = draw(st.none() | st.sampled_from([d for d in divs if (stage // ep) % d == 0]))
    red = draw(st.sampled_from([0, 0, 1, 3, 8, 32]))
    return Plan(tp=tp, pp=pp, dp=dp, ep=ep, etp=etp, attn_dp=draw(st.booleans()), redundant=red)


def _canonical(p: Plan) -> Plan:
    """The same plan with an ``etp`` equal to its default written as None."""
    default = p.tp if p.ep == 1 else 1
    return Plan(p.tp, p.pp, p.dp, p.ep, None if p.etp == default else p.etp, p.attn_dp, p.redundant)


# ------------------------------------------------------------------ labels
@PROPS
@given(plans_())
def test_label_round_trip(p):
    back = Plan.from_label(p.label)
    assert back == _canonical(p)
    assert back.label == p.label


@PROPS
@given(plans_(), st.randoms(use_true_random=False), st.data())
def test_from_label_reads_parts_in_any_order_and_fills_defaults(p, rnd, data):
    parts = p.label.split("-")
    kept = [x for x in parts if x not in ("tp1", "pp1", "dp1", "ep1") or data.draw(st.booleans())]
    rnd.shuffle(kept)
    if not kept:
        kept = ["tp1"]
    assert Plan.from_label("-".join(kept)).label == p.label


def test_label_format():
    assert Plan().label == "tp1-pp1-dp1-ep1"
    assert Plan(tp=8, ep=8).label == "tp8-pp1-dp1-ep8"
    assert Plan(tp=4, dp=2, ep=4, etp=2, attn_dp=True).label == "tp4-pp1-dp2-ep4-etp2-adp"
    assert Plan(tp=4, etp=4).label == "tp4-pp1-dp1-ep1"  # the default etp is not written
    assert Plan.from_label("tp4-pp1-dp2-ep4-etp2-adp") == Plan(tp=4, dp=2, ep=4, etp=2, attn_dp=True)
    assert Plan(dp=72, ep=72, redundant=32).label == "tp1-pp1-dp72-ep72-red32"
    assert Plan.from_label("red32-ep72-dp72") == Plan(dp=72, ep=72, redundant=32)
    assert Plan(dp=8, ep=8, redundant=0).label == "tp1-pp1-dp8-ep8"  # no redundant slots: not written
    assert Plan(tp=4, dp=2, ep=8, redundant=8, attn_dp=True).label == "tp4-pp1-dp2-ep8-red8-adp"


@pytest.mark.parametrize(
    "text, exc, message",
    [
        ("", SpecError, r"field 'plan' = '': plan label is empty"),
        ("tp8-x", SpecError, r"field 'plan' = 'tp8-x': plan label part 'x' is not tp<n>"),
        ("tp8-tp4", SpecError, r"part 'tp4' repeats tp"),
        ("tp-8", SpecError, r"part 'tp' is not"),
        ("TP8", SpecError, r"part 'TP8' is not"),
        ("tp8--ep8", SpecError, r"part '' is not"),
        ("tp99999999999999999999", SpecError, r"tp must be <= 2\^53"),
        ("tp0", SpecError, r"Plan: field 'tp' = 0: must be positive"),
        ("tp4-ep8", SpecError, r"field 'ep' = 8: ep x etp \(8 x 1\) must divide dp x tp \(1 x 4\)"),
        ("ep8-dp8-red8-red8", SpecError, r"part 'red8' repeats red"),
        (8, TypeError, r"field 'plan' = 8: must be a plan label"),
    ],
)
def test_from_label_errors(text, exc, message):
    with pytest.raises(exc, match=message):
        Plan.from_label(text)


def test_cli_plan_parsing_is_from_label():
    assert _parse_plan("auto") == "auto"
    assert _parse_plan("ep8-dp8") == Plan(dp=8, ep=8) == Plan.from_label("tp1-pp1-dp8-ep8")
    with pytest.raises(SpecError, match=r"field 'plan' = 'tp3x'"):
        _parse_plan("tp3x")


# ------------------------------------------------------------------ enumeration, two ways
@st.composite
def toy_models(draw) -> Model:
    layers = draw(st.integers(1, 12))
    kind = draw(st.sampled_from(["mha", "gqa", "mla"]))
    kv = draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
    heads = kv * draw(st.sampled_from([1, 2, 3, 4])) if kind != "mha" else kv
    if kind == "mla":
        att = Attention(kind="mla", num_heads=heads, num_kv_heads=kv, head_dim=64, v_head_dim=64,
                        kv_lora_rank=32, qk_rope_head_dim=16)
    else:
        att = Attention(kind=kind, num_heads=heads, num_kv_heads=heads if kind == "mha" else kv, head_dim=64)
    moe = draw(st.integers(0, layers))
    kw: dict = {}
    if moe:
        experts = draw(st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16]))
        kw = dict(routed_experts=experts, top_k=1, moe_intermediate=draw(st.sampled_from([64, 96, 128, 192, 256])))
    return Model(id="toy", name="toy", num_layers=layers, hidden_size=256, vocab_size=1000, attention=att,
                 dense_layers=layers - moe, moe_layers=moe, dense_intermediate=512 if layers - moe else 0, **kw)


def _slow_plans(m: Model, g: int) -> list[Plan]:
    """Every plan for ``g`` GPUs, from the documented rules, by brute force
    over the whole box of degrees, in the documented order (tp, pp, ep, etp,
    attn_dp ascending; no attn_dp first). A MoE's ``ep`` comes with R = 0, or,
    when it spans the stage (ep = dp*tp), the smallest redundant slot count
    R >= 0 such that ep divides E + R."""
    a = m.attention
    out = []
    for tp in range(1, g + 1):
        for pp in range(1, g + 1):
            for dp in range(1, g + 1):
                if tp * pp * dp != g or pp > m.num_layers:  # every GPU serves; every stage holds a layer
                    continue
                heads_ok = a.num_heads % tp == 0 and (
                    a.kind == "mla" or a.num_kv_heads % tp == 0 or tp % a.num_kv_heads == 0)
                if not m.is_moe:
                    # dense: no expert degrees; attn_dp (attention DP + TP FFN) needs tp > 1, no head rule
                    if heads_ok:
                        out.append(Plan(tp, pp, dp))
                    if tp > 1 and a.num_heads % tp == 0:  # the TP FFN takes TP degrees that divide the heads
                        out.append(Plan(tp, pp, dp, attn_dp=True))
                    continue
                for ep in range(1, dp * tp + 1):
                    for etp in range(1, dp * tp + 1):
                        if (dp * tp) % (ep * etp) or m.moe_intermediate % etp:
                            continue
                        # slots only where EP spans the stage: E + red is then the next multiple of ep
                        red = -m.routed_experts % ep if ep == dp * tp else 0
                        if (m.routed_experts + red) % ep:
                            continue
                        default = tp if ep == 1 else 1
                        e = None if etp == default else etp
                        if heads_ok:
                            out.append(Plan(tp, pp, dp, ep, e, redundant=red))
                        if tp > 1:  # attn_dp: no head rule; with tp=1 it is the plan without it
                            out.append(Plan(tp, pp, dp, ep, e, attn_dp=True, redundant=red))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(toy_models(), st.integers(1, 24))
def test_core_enumeration_equals_the_documented_rules(m, g):
    got = q.plans(m, g)
    assert got == _slow_plans(m, g)
    assert q.plans(m, Cluster(H100, g)) == got
    for p in got:  # every listed plan passes validate_for
        assert p.validate_for(m, Cluster(H100, g)) is p


@st.composite
def plans_on(draw, g: int) -> Plan:
    """A plan with tp*pp*dp == g (so the GPU rule holds and the others decide)."""
    tp = draw(st.sampled_from([d for d in range(1, g + 1) if g % d == 0]))
    pp = draw(st.sampled_from([d for d in range(1, g // tp + 1) if (g // tp) % d == 0]))
    dp = g // (tp * pp)
    divs = [d for d in range(1, dp * tp + 1) if (dp * tp) % d == 0]
    ep = draw(st.sampled_from(divs))
    etp = draw(st.none() | st.sampled_from([d for d in divs if (dp * tp // ep) % d == 0]))
    red = draw(st.sampled_from([0, 0, 0, 1, 2, 3, 4, 6, 8, 12, 16, 64]))
    return Plan(tp=tp, pp=pp, dp=dp, ep=ep, etp=etp, attn_dp=draw(st.booleans()), redundant=red)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(toy_models(), st.integers(1, 16), st.data())
def test_validate_for_accepts_exactly_the_enumerated_plans(m, g, data):
    """Up to the canonical form of equivalent plans (a dense model's listed
    plans have no expert degrees; attn_dp needs tp > 1),
    validate_for passes iff the plan is listed."""
    p = data.draw(st.one_of(plans_on(g), plans_()))
    cluster = Cluster(H100, g)
    listed = set(q.plans(m, g))
    try:
        p.validate_for(m, cluster)
        valid = True
    except SpecError as exc:
        valid = False
        assert str(exc).startswith(f"Plan {p.label} for toy on {cluster.label}: field '")
    if not m.is_moe:
        if p.attn_dp and p.tp == 1:
            expected = p.ep == 1 and p.redundant == 0 and Plan(p.tp, p.pp, p.dp) in listed  # the plan without it
        else:
            expected = p.ep == 1 and p.redundant == 0 and Plan(p.tp, p.pp, p.dp, attn_dp=p.attn_dp) in listed
    else:
        c = _canonical(p)
        if p.attn_dp and p.tp == 1:
            c = Plan(c.tp, c.pp, c.dp, c.ep, c.etp, redundant=c.redundant)  # attn_dp over one GPU: the plan without
        # the search lists each ep with one redundant count; any other R is valid when ep divides
        # E + R, ep > 1 and R <= E*(ep-1) (each copy of an expert on its own GPU)
        E, R = m.routed_experts, c.redundant
        searched = -E % c.ep if c.ep == c.dp * c.tp else 0
        slots_ok = (E + R) % c.ep == 0 and (R == 0 or (c.ep > 1 and R <= E * (c.ep - 1)))
        if R == searched:
            expected = c in listed and slots_ok
        else:  # a redundant count the search does not list: the documented rules, spelt out
            a = m.attention
            heads_ok = c.attn_dp or (a.num_heads % c.tp == 0 and (
                a.kind == "mla" or a.num_kv_heads % c.tp == 0 or c.tp % a.num_kv_heads == 0))
            expected = (c.num_gpus == g and c.pp <= m.num_layers and heads_ok and slots_ok
                        and m.moe_intermediate % c.expert_tp == 0)
    assert valid == expected


def test_pack_and_validate_for_give_the_same_message():
    m, c = q.load_model("deepseek-v3"), q.load_cluster("16xh200")
    with pytest.raises(SpecError) as a:
        Plan(tp=8).validate_for(m, c)
    with pytest.raises(SpecError) as b:
        q.pack(m, c, 4096, plan=Plan(tp=8))
    assert str(a.value) == str(b.value) == (
        "Plan tp8-pp1-dp1-ep1 for deepseek-v3 on 16xh200: field 'tp*pp*dp' = 8: must equal the cluster's GPUs (16)")


@pytest.mark.parametrize("plan, message", [
    (Plan(dp=72, ep=72), r"field 'ep' = 72: must divide routed_experts \(256\)"),
    (Plan(dp=72, ep=72, redundant=31), r"field 'ep' = 72: must divide routed_experts \+ redundant \(256 \+ 31 expert "
                                       r"slots per EP group\)"),
    (Plan(tp=8, dp=9, redundant=8), r"field 'redundant' = 8: must be 0 without expert parallelism"),
])
def test_redundant_slot_rules_name_field_value_and_rule(plan, message):
    m, c = q.load_model("deepseek-v3"), q.load_cluster("72xgb200")
    with pytest.raises(SpecError, match=message):
        plan.validate_for(m, c)
    with pytest.raises(SpecError, match=message):
        q.pack(m, c, 4096, plan=plan)


def test_redundant_slots_are_refused_for_a_dense_model_and_negative_counts():
    with pytest.raises(SpecError, match=r"field 'redundant' = -1: must be"):
        Plan(dp=8, ep=8, redundant=-1)
    with pytest.raises(SpecError, match=r"field 'redundant' = 8: must be 0 for a dense model"):
        Plan(dp=8, redundant=8).validate_for(q.load_model("llama-3.1-8b"), q.load_cluster("8xh100"))


def test_sweep_refuses_a_plan_the_core_would_refuse(tmp_path):
    """Plan(tp=8) on 16 GPUs used to pass sweep validation (tp*pp*dp divided
    the GPUs) and fail when the point ran."""
    with pytest.raises(ValueError, match=r"field 'plan' = 'tp8-pp1-dp1-ep1'.*must equal the cluster's GPUs \(16\)"):
        q.sweep({"model": ["deepseek-v3"], "cluster": ["16xh200"], "context": [4096], "plan": [Plan(tp=8)],
                 "microbatches": [0]}, checkpoint=tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").glob("chunk-*"))


def test_plan_count_grows_with_divisors():
    """A closed form for a case the rules pin down: a dense MHA model whose
    heads and layers every degree divides has one plan per ordered
    factorisation g = tp*pp*dp (the number of such triples is sum over
    divisors d of g of d(g/d)), plus its attention-DP variant when tp > 1."""
    m = Model(id="toy", name="toy", num_layers=64, hidden_size=256, vocab_size=1000,
              attention=Attention(kind="mha", num_heads=64, num_kv_heads=64, head_dim=64),
              dense_layers=64, moe_layers=0, dense_intermediate=512)
    for g in (1, 2, 8, 16, 64):
        divs = [d for d in range(1, g + 1) if g % d == 0]
        want = sum(sum(1 for e in range(1, g // d + 1) if (g // d) % e == 0) * (2 if d > 1 else 1) for d in divs)
        assert len(q.plans(m, g)) == want, g
