"""ComPEFT codec: the paper's definition (global top-k, sign · α · std of the dense τ), exact round trips of
ternary tensors (property-tested), and refusal of corrupt files."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from store_fixtures import lora_tensors

from adapters_store import compeft
from adapters_store.errors import InvalidAdapterError


def test_compress_follows_the_definition():
    tensors = lora_tensors(rank=4, seed=3)
    packed = compeft.compress(tensors, density=0.1, alpha=2.0)
    tau = np.concatenate([tensors[n].ravel().astype(np.float64) for n in sorted(tensors)])
    k = round(0.1 * tau.size)
    assert packed.positions.size == k
    threshold = np.sort(np.abs(tau))[-k]
    assert (np.abs(tau[packed.positions]) >= threshold).all()
    dense = packed.to_dense()
    flat = np.concatenate([dense[n].ravel() for n in sorted(dense)])
    expected = np.zeros_like(tau)
    expected[packed.positions] = np.sign(tau[packed.positions]) * 2.0 * tau.std()
    np.testing.assert_array_equal(flat, expected.astype(np.float32))
    assert {n: a.shape for n, a in dense.items()} == {n: a.shape for n, a in tensors.items()}


def test_compressed_bytes_are_small():
    tensors = lora_tensors(rank=16, seed=1, shapes={"q_proj": (512, 512), "v_proj": (512, 128)})
    dense_bytes = sum(a.nbytes for a in tensors.values())
    encoded = compeft.compress(tensors, density=0.1).encode()
    assert dense_bytes / len(encoded) > 30  # 40 dense bytes per kept entry vs ~1 byte of gap + 1 sign bit


ternary = st.integers(1, 4).flatmap(lambda n: st.lists(
    st.tuples(st.integers(0, 6), st.integers(0, 9)), min_size=n, max_size=n)).flatmap(
    lambda shapes: st.tuples(
        st.just(shapes),
        st.lists(st.sampled_from([-1, 0, 0, 0, 1]), min_size=sum(a * b for a, b in shapes),
                 max_size=sum(a * b for a, b in shapes)),
        st.floats(1 / 1024, 1024.0, width=32)))


@settings(max_examples=200, deadline=None)
@given(ternary)
def test_round_trip_is_exact_for_ternary_tensors(case):
    shapes, signs, scale = case
    flat, tensors, start = np.array(signs, dtype=np.float32) * np.float32(scale), {}, 0
    for i, (a, b) in enumerate(shapes):
        tensors[f"t{i}"] = flat[start : start + a * b].reshape(a, b)
        start += a * b
    decoded = compeft.decode(compeft.from_ternary(tensors).encode()).to_dense()
    assert decoded.keys() == tensors.keys()
    for name, arr in tensors.items():
        assert decoded[name].dtype == np.float32
        np.testing.assert_array_equal(decoded[name], arr)


@given(st.lists(st.integers(0, 2**62), min_size=0, max_size=50))
def test_varints_round_trip(values):
    arr = np.array(values, dtype=np.uint64)
    np.testing.assert_array_equal(compeft._read_varints(compeft._varints(arr), len(values)), arr)


def test_decode_refuses_corrupt_files():
    good = compeft.compress(lora_tensors(seed=2), density=0.3).encode()
    compeft.decode(good)
    bad = [b"", b"XXXX" + good[4:], good[:4] + b"\x09" + good[5:], good[:-1], good + b"\0", good[:40]]
    for data in bad:
        with pytest.raises(InvalidAdapterError):
            compeft.decode(data)
    # a gap that steps past the end of the tensors
    packed = compeft.compress(lora_tensors(seed=2), density=0.3)
    out_of_range = compeft.CompeftTensors(packed.layout, packed.positions + packed.total, packed.positive,
                                          packed.scale, packed.density, packed.alpha)
    with pytest.raises(InvalidAdapterError, match="strictly increasing"):
        compeft.decode(out_of_range.encode())


def test_from_ternary_refuses_two_magnitudes():
    with pytest.raises(ValueError, match="not ternary"):
        compeft.from_ternary({"a": np.array([1.0, 2.0, 0.0], dtype=np.float32)})
