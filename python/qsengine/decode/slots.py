"""Redundant expert slots (DeepSeek EPLB) as the step model and the routing
Monte Carlo see them.

A plan with ``redundant = R`` gives each EP group of ``ep`` GPUs ``E + R``
expert slots, ``(E + R)/ep`` per GPU (``Plan.slots_per_gpu``). Which expert
fills which slot is the core's EPLB-style placement
(``_core.place_slots``, ``cpp/core/packing.h``; after
https://github.com/deepseek-ai/EPLB ``eplb.py``: ``replicate_experts`` then
``balanced_packing``, with the two copies of an expert never on one GPU),
computed from the expected load of each expert: its per-token inclusion
probability π_e under the routing law (uniform: k/E).

Token split (the routing engine's rule, ``qsengine.routing.Placement``): the
assignment of token t (its index in the microbatch) to an expert with c copies
goes to copy ``t mod c``. Copy j of expert e therefore sees about ``B/c`` of
the B tokens, each of which picks e with probability π_e; the closed form
takes a slot as ``B/c_e`` independent tokens (docs/model.md, "Redundant expert
slots"); GPUs whose slots carry equal loads form one class (``class_*``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qsengine import _core

__all__ = ["SlotLayout", "slot_layout", "slot_placement"]


@dataclass(frozen=True)
class SlotLayout:
    """The slots of one EP group: ``expert[s]`` fills slot s (rank-major: GPU g
    holds slots ``[g·m, (g+1)·m)``, m = ``per_gpu``), ``copies[e]`` copies of
    expert e, ``share[s] = 1/copies[expert[s]]`` (the fraction of the expert's
    tokens slot s serves). GPUs whose slots carry the same (load, share)
    multiset are alike for the straggler: ``class_expert`` / ``class_share``
    (classes, per_gpu) are the slots of one GPU of each class, ``class_count``
    how many GPUs it stands for."""

    expert: np.ndarray
    copies: np.ndarray
    share: np.ndarray
    gpus: int
    per_gpu: int
    class_expert: np.ndarray
    class_share: np.ndarray
    class_count: np.ndarray


_LAYOUTS: dict[tuple, SlotLayout] = {}


def slot_layout(load: np.ndarray, gpus: int, redundant: int) -> SlotLayout:
    """The (cached) :class:`SlotLayout` of ``E = len(load)`` experts with
    expected loads ``load`` on ``gpus`` GPUs with ``redundant`` extra slots
    (``_core.place_slots``; ValueError naming the rule when ``gpus`` does not
    divide ``E + redundant`` or ``redundant`` exceeds ``E·(gpus−1)``)."""
    load = np.ascontiguousarray(load, dtype=np.float64)
    key = (load.tobytes(), int(gpus), int(redundant))
    got = _LAYOUTS.get(key)
    if got is None:
        expert, copies, _ = _core.place_slots(load, int(gpus), int(redundant))
        expert = np.asarray(expert, dtype=np.int64)
        copies = np.asarray(copies, dtype=np.int64)
        share = 1.0 / copies[expert].astype(np.float64)
        per = (load.size + int(redundant)) // int(gpus)
        # one GPU's slots sorted by (load, share): equal rows = GPUs alike for the straggler
        ex = expert.reshape(int(gpus), per)
        sh = share.reshape(int(gpus), per)
        order = np.lexsort((sh, load[ex]), axis=1)
        rows = np.concatenate([np.take_along_axis(load[ex], order, axis=1), np.take_along_axis(sh, order, axis=1)],
                              axis=1)
        _, first, count = np.unique(rows, axis=0, return_index=True, return_counts=True)
        got = SlotLayout(expert=expert, copies=copies, share=share, gpus=int(gpus), per_gpu=per,
                         class_expert=ex[first], class_share=sh[first], class_count=count.astype(np.int64))
        if len(_LAYOUTS) > 4096:
            _LAYOUTS.clear()
        _LAYOUTS[key] = got
    return got


def slot_placement(experts: int, top_k: int, gpus: int, redundant: int, pi: np.ndarray | None = None):
    """The routing engine's ``Placement`` of a plan's slots (``redundant`` > 0):
    each expert's first slot is its primary, the others its replicas, in slot
    order; the layout comes from the inclusion probabilities ``pi`` (None:
    uniform k/E)."""
    from qsengine.routing import Placement

    load = np.full(experts, top_k / experts) if pi is None else np.asarray(pi, dtype=np.float64)
    lay = slot_layout(load, gpus, redundant)
    primary = np.full(experts, -1, dtype=np.int64)
    extra: dict[int, list[int]] = {}
    for s, e in enumerate(lay.expert.tolist()):
        g = s // lay.per_gpu
        if primary[e] < 0:
            primary[e] = g
        else:
            extra.setdefault(e, []).append(g)
    return Placement.explicit(primary.tolist(), gpus).with_replicas(extra)
