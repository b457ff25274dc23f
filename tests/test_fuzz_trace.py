"""Fuzz Trace.load on generated, truncated and corrupted .npy/.npz files
(rules in tests/_fuzz.py): a Trace, or a ValueError/TypeError naming the file.
Nothing is unpickled."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import qsengine as q
from _fuzz import fuzz_settings, memory_limited, outcome

DTYPES = st.sampled_from(["int8", "int16", "int32", "int64", "uint8", "uint32", "uint64", "float32", "float64",
                          "bool", "complex64", "U3", "S2", "datetime64[s]", ">i4", "<u2"])
ARRAYS = DTYPES.flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)))


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _npz(arrays: dict, compressed: bool) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


@st.composite
def trace_files(draw):
    kind = draw(st.sampled_from(["npy", "npz", "npz-compressed", "pickle", "garbage", "zip-junk"]))
    if draw(st.booleans()):  # a real trace: [steps, tokens, k] distinct ids per token
        steps, tokens, k = draw(st.integers(1, 6)), draw(st.integers(1, 8)), draw(st.integers(1, 4))
        E = draw(st.integers(k, 16))
        rng = np.random.default_rng(draw(st.integers(0, 2**32)))
        ids = np.argsort(rng.random((steps, tokens, E)), axis=-1)[..., :k]
        arr = ids.astype(draw(st.sampled_from(["int8", "int16", "int32", "int64", "uint8", "uint16"])))
    else:
        arr = draw(ARRAYS)
    if kind == "npy":
        data, suffix = _npy(arr), ".npy"
    elif kind.startswith("npz"):
        names = draw(st.lists(st.sampled_from(["expert_ids", "ids", "x", "arr_0"]), min_size=0, max_size=3,
                              unique=True))
        data, suffix = _npz({n: arr for n in names}, kind == "npz-compressed"), ".npz"
    elif kind == "pickle":  # an object array: must be refused, never unpickled
        buf = io.BytesIO()
        np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
        data, suffix = buf.getvalue(), draw(st.sampled_from([".npy", ".npz"]))
    elif kind == "zip-junk":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("expert_ids.npy", draw(st.binary(max_size=64)))
        data, suffix = buf.getvalue(), ".npz"
    else:
        data, suffix = draw(st.binary(max_size=300)), draw(st.sampled_from([".npy", ".npz", ".bin"]))
    damage = draw(st.sampled_from(["none", "none", "truncate", "flip", "header"]))
    if damage == "truncate" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif damage == "flip" and data:
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
    elif damage == "header" and len(data) > 20:  # claim a huge shape in the header
        data = data.replace(b"'shape': (", b"'shape': (99999999999, ", 1)
    return data, suffix, draw(st.sampled_from([None, "expert_ids", "x", "nope"]))


@fuzz_settings(300)
@given(f=trace_files())
def test_fuzz_trace_load(tmp_path_factory, f):
    data, suffix, key = f
    p = tmp_path_factory.mktemp("t") / f"trace{suffix}"
    p.write_bytes(data)
    with memory_limited(64 << 20):
        t = outcome("Trace.load", lambda: q.Trace.load(p, key=key), [str(p)])
    if t is None:
        return
    ids = t.expert_ids
    assert ids.ndim == 3 and ids.dtype == np.int64 and min(ids.shape) >= 1
    # and route either replays it or names what is wrong with it
    steps, B, k = ids.shape
    E = int(max(ids.max() + 1, k, 1))
    outcome("route (trace)", lambda: q.route(E, k, B, None, routing=t), ["expert_ids", "experts", "batch", "top_k"])


def test_trace_npz_bomb_refused_before_inflating(tmp_path):
    p = tmp_path / "bomb.npz"
    np.savez_compressed(p, expert_ids=np.zeros((64, 1024, 1024), dtype=np.int8))  # 64 MiB of zeros, tiny file
    assert p.stat().st_size < 1 << 20
    with pytest.raises(q.ResourceLimitError, match="inflates to"):
        q.Trace.load(p, max_bytes=8 << 20)


def test_trace_missing_or_truncated_file_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        q.Trace.load(tmp_path / "missing.npy")
    p = tmp_path / "t.npy"
    np.save(p, np.zeros((2, 3, 2), dtype=np.int32))
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"t\.npy"):
        q.Trace.load(p)
