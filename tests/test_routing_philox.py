"""Known-answer test: the core's Philox4x64-10 streams equal numpy.random.Philox."""

import numpy as np
import pytest

from qsengine import _core


@pytest.mark.parametrize("key", [(0, 0), (1, 2), (0x0123456789ABCDEF, 0xFEDCBA9876543210), (2**64 - 1, 2**63)])
@pytest.mark.parametrize("index,purpose", [(0, 0), (7, 3), (123456, 1), (2**40, 2)])
def test_stream_matches_numpy_philox(key, index, purpose):
    ref = np.random.Philox(key=np.array(key, dtype=np.uint64),
                           counter=np.array([0, 0, index, purpose], dtype=np.uint64))
    want = ref.random_raw(1000)
    got = _core.philox_raw(key[0], key[1], index, purpose, 1000)
    np.testing.assert_array_equal(got, want)


def test_seed_key_matches_seed_sequence():
    from qsengine._seed import philox_key

    seq = np.random.SeedSequence(42)
    k0, k1 = philox_key(seq)
    words = seq.generate_state(2, dtype=np.uint64)
    assert (k0, k1) == (int(words[0]), int(words[1]))
