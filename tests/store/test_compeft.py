"""ComPEFT codec, format 2: per-tensor top-k and scale (sign · α · std of that dense tensor), exact round
trips of ternary tensors (property-tested), a compact header, and refusal of corrupt files."""

import json
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from store_fixtures import lora_tensors

from adapters_store import compeft
from adapters_store.errors import InvalidAdapterError


def _flat(tensors):
    return np.concatenate([np.asarray(tensors[n], np.float64).ravel() for n in sorted(tensors)])


def test_compress_follows_the_per_tensor_definition():
    tensors = lora_tensors(rank=4, seed=3)
    tensors = {n: a * (10.0 if "lora_A" in n else 0.1) for n, a in tensors.items()}  # A ≫ B, as after peft
    packed = compeft.compress(tensors, density=0.1, alpha=2.0)
    dense = packed.to_dense()
    assert {n: a.shape for n, a in dense.items()} == {n: a.shape for n, a in tensors.items()}
    assert list(packed.counts) == [round(0.1 * tensors[n].size) for n in sorted(tensors)]
    for i, name in enumerate(sorted(tensors)):
        tau = tensors[name].astype(np.float64).ravel()
        k = round(0.1 * tau.size)
        kept = np.flatnonzero(dense[name].ravel())
        assert kept.size == k  # every tensor keeps its own top-k, B included
        assert (np.abs(tau[kept]) >= np.sort(np.abs(tau))[-k]).all()
        scale = np.float32(2.0 * tau.std())
        assert packed.scales[i] == scale
        expected = np.zeros(tau.size, np.float32)
        expected[kept] = np.where(tau[kept] > 0, scale, -scale)
        np.testing.assert_array_equal(dense[name].ravel(), expected)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(2, 40), st.floats(1e-3, 1e3)), min_size=1, max_size=5),
       st.floats(0.01, 1.0), st.floats(0.5, 8.0), st.integers(0, 2**31))
def test_each_tensor_keeps_its_own_top_k_and_scale(specs, density, alpha, seed):
    rng = np.random.default_rng(seed)
    tensors = {f"t{i}": (rng.normal(0, 1, n) * mag).astype(np.float32) for i, (n, mag) in enumerate(specs)}
    packed = compeft.decode(compeft.compress(tensors, density, alpha).encode())
    dense = packed.to_dense()
    for i, name in enumerate(sorted(tensors)):
        tau = tensors[name].astype(np.float64)
        k = min(tau.size, max(1, round(density * tau.size)))
        kept = np.flatnonzero(dense[name])
        assert packed.counts[i] == kept.size == k
        assert np.abs(tau[kept]).min() >= np.sort(np.abs(tau))[-k]
        assert set(np.abs(dense[name][kept]).tolist()) == {float(np.float32(alpha * tau.std()))}
        assert (np.sign(dense[name][kept]) == np.sign(tau[kept])).all()


def test_constant_tensor_keeps_nothing():
    packed = compeft.compress({"a": np.ones((2, 3), np.float32), "b": np.arange(6, dtype=np.float32)}, 0.5)
    assert list(packed.counts) == [0, 3] and packed.scales[0] == 0
    dense = compeft.decode(packed.encode()).to_dense()
    np.testing.assert_array_equal(dense["a"], np.zeros((2, 3), np.float32))


def test_compress_refuses_bad_arguments():
    with pytest.raises(ValueError, match="density"):
        compeft.compress(lora_tensors(), density=0.0)
    with pytest.raises(ValueError, match="alpha"):
        compeft.compress(lora_tensors(), density=0.1, alpha=-1.0)
    with pytest.raises(ValueError, match="empty"):
        compeft.compress({"a": np.zeros((0, 3), np.float32)}, density=0.1)


def test_compressed_bytes_are_small():
    tensors = lora_tensors(rank=16, seed=1, shapes={"q_proj": (512, 512), "v_proj": (512, 128)})
    dense_bytes = sum(a.nbytes for a in tensors.values())
    encoded = compeft.compress(tensors, density=0.1).encode()
    assert dense_bytes / len(encoded) > 30  # 40 dense bytes per kept entry vs ~1 byte of gap + 1 sign bit


def test_header_is_compact():
    """420 SmolLM2-style names cost ~38 KB as plain JSON; zlib-compressed they are ~1-2 KB."""
    names = [f"base_model.model.model.layers.{layer}.{block}.{target}.lora_{ab}.weight"
             for layer in range(30) for block, targets in (("self_attn", "qkvo"), ("mlp", "gud"))
             for target in (f"{t}_proj" for t in targets) for ab in "AB"]
    tensors = {n: np.random.default_rng(0).normal(0, 1, (4, 8)).astype(np.float32) for n in names}
    data = compeft.compress(tensors, density=0.1).encode()
    header_len = struct.unpack_from("<I", data, 8)[0]
    assert len(names) == 420 and header_len < 3000


ternary = st.integers(0, 4).flatmap(lambda n: st.lists(
    st.tuples(st.integers(0, 6), st.integers(0, 9)), min_size=n, max_size=n)).flatmap(
    lambda shapes: st.tuples(
        st.just(shapes),
        st.lists(st.sampled_from([-1, 0, 0, 0, 1]), min_size=sum(a * b for a, b in shapes),
                 max_size=sum(a * b for a, b in shapes)),
        st.lists(st.floats(1 / 1024, 1024.0, width=32), min_size=len(shapes), max_size=len(shapes))))


@settings(max_examples=200, deadline=None)
@given(ternary)
def test_round_trip_is_exact_for_ternary_tensors(case):
    shapes, signs, scales = case  # one scale per tensor
    flat, tensors, start = np.array(signs, dtype=np.float32), {}, 0
    for i, (a, b) in enumerate(shapes):
        tensors[f"t{i}"] = flat[start : start + a * b].reshape(a, b) * np.float32(scales[i])
        start += a * b
    packed = compeft.from_ternary(tensors)
    decoded = compeft.decode(packed.encode())
    np.testing.assert_array_equal(decoded.scales, packed.scales)
    dense = decoded.to_dense()
    assert dense.keys() == tensors.keys()
    for name, arr in tensors.items():
        assert dense[name].dtype == np.float32
        np.testing.assert_array_equal(dense[name], arr)
        nz = arr != 0
        assert (dense[name][nz].view(np.uint32) == arr[nz].view(np.uint32)).all()  # bit for bit


@settings(max_examples=50, deadline=None)
@given(st.floats(1e-20, 1e20), st.integers(0, 2**31))
def test_decoded_magnitude_is_the_stored_float32_scale(alpha, seed):
    tensors = {"w": np.random.default_rng(seed).normal(0, 1, (7, 5)).astype(np.float32)}
    packed = compeft.compress(tensors, density=0.3, alpha=alpha)
    data = packed.encode()
    header_len = struct.unpack_from("<I", data, 8)[0]
    stored = np.frombuffer(data, "<f4", 1, 20 + header_len)[0]
    dense = compeft.decode(data).to_dense()["w"]
    assert (np.abs(dense[dense != 0]).view(np.uint32) == np.float32(stored).view(np.uint32)).all()


@given(st.lists(st.integers(0, 2**62), min_size=0, max_size=50))
def test_varints_round_trip(values):
    arr = np.array(values, dtype=np.uint64)
    np.testing.assert_array_equal(compeft._read_varints(compeft._varints(arr), len(values)), arr)


def _rebuild(data: bytes, header: dict | None = None, raw_header: bytes | None = None) -> bytes:
    """The same file with its header replaced (lengths kept consistent)."""
    _, _, _, h_len, p_len = compeft._PREFIX.unpack_from(data)
    raw = raw_header if raw_header is not None else zlib.compress(json.dumps(header).encode())
    return compeft._PREFIX.pack(compeft.MAGIC, 2, b"\0\0\0", len(raw), p_len) + raw + data[20 + h_len :]


def _header_of(data: bytes) -> dict:
    h_len = struct.unpack_from("<I", data, 8)[0]
    return json.loads(zlib.decompress(data[20 : 20 + h_len]))


def test_decode_refuses_corrupt_files():
    packed = compeft.compress(lora_tensors(seed=2), density=0.3)
    good = packed.encode()
    compeft.decode(good)
    h = _header_of(good)
    h_len = struct.unpack_from("<I", good, 8)[0]
    scales_at = 20 + h_len
    bad = {
        "empty": b"",
        "magic": b"XXXX" + good[4:],
        "version 9": good[:4] + b"\x09" + good[5:],
        "reserved": good[:5] + b"\x01" + good[6:],
        "truncated": good[:-1],
        "trailing": good + b"\0",
        "cut in the header": good[:40],
        "header not zlib": _rebuild(good, raw_header=b"not zlib"),
        "header zlib trailing bytes": _rebuild(good, raw_header=zlib.compress(json.dumps(h).encode()) + b"x"),
        "header not json": _rebuild(good, raw_header=zlib.compress(b"{nope")),
        "header missing counts": _rebuild(good, {k: v for k, v in h.items() if k != "counts"}),
        "count over numel": _rebuild(good, h | {"counts": [10**6] + h["counts"][1:]}),
        "count mismatch": _rebuild(good, h | {"counts": [h["counts"][0] - 1] + h["counts"][1:]}),
        "float count": _rebuild(good, h | {"counts": [float(h["counts"][0])] + h["counts"][1:]}),
        "repeated names": _rebuild(good, h | {"names": [h["names"][0]] * len(h["names"])}),
        "negative dim": _rebuild(good, h | {"shapes": [[-1, 4]] + h["shapes"][1:]}),
        "lists differ": _rebuild(good, h | {"shapes": h["shapes"][1:]}),
        "huge tensor": _rebuild(good, h | {"shapes": [[2**30, 2**30]] + h["shapes"][1:]}),
        "nan scale": good[:scales_at] + struct.pack("<f", float("nan")) + good[scales_at + 4 :],
        "negative scale": good[:scales_at] + struct.pack("<f", -1.0) + good[scales_at + 4 :],
    }
    for what, data in bad.items():
        with pytest.raises(InvalidAdapterError):
            compeft.decode(data)
            pytest.fail(what)
    # a zlib bomb in the header
    bomb = _rebuild(good, raw_header=zlib.compress(b" " * (compeft._MAX_HEADER_BYTES + 10)))
    with pytest.raises(InvalidAdapterError, match="inflates past"):
        compeft.decode(bomb)


def test_decode_refuses_format_1_clearly():
    v1 = compeft.MAGIC + b"\x01\0\0\0" + struct.pack("<I", 2) + b"{}"
    with pytest.raises(InvalidAdapterError, match="version 1 .* no longer supported"):
        compeft.decode(v1)


def test_decode_refuses_positions_outside_their_tensor():
    packed = compeft.compress(lora_tensors(seed=2), density=0.3)
    c0, numel0 = int(packed.counts[0]), packed.layout[0].numel
    # the last kept entry of tensor 0 pushed past its end (it would land in tensor 1 in a flat index)
    pos = packed.positions.copy()
    pos[c0 - 1] = numel0 + 1
    with pytest.raises(InvalidAdapterError, match="strictly increasing"):
        compeft.decode(_replace(packed, positions=pos).encode())
    # a repeated position (gap 0 after the first)
    pos = packed.positions.copy()
    pos[1] = pos[0]
    with pytest.raises(InvalidAdapterError, match="strictly increasing"):
        compeft.decode(_replace(packed, positions=pos).encode())
    # gaps each below the tensor's size but summing past it (and, if large, past uint64)
    data = packed.encode()
    assert c0 >= 8
    huge = compeft._varints(np.array([numel0 - 1] * 8, dtype=np.uint64))
    h = _header_of(data)
    n = sum(h["counts"])
    gaps = compeft._varints(np.ones(n - 8, dtype=np.uint64))
    h_len = struct.unpack_from("<I", data, 8)[0]
    scales = data[20 + h_len : 20 + h_len + 4 * len(h["names"])]
    signs = data[-((n + 7) // 8) :]
    forged = (compeft._PREFIX.pack(compeft.MAGIC, 2, b"\0\0\0", h_len, len(huge) + len(gaps))
              + data[20 : 20 + h_len] + scales + huge + gaps + signs)
    with pytest.raises(InvalidAdapterError):
        compeft.decode(forged)


def _replace(packed, **changes):
    fields = {f: getattr(packed, f) for f in ("layout", "counts", "positions", "positive", "scales", "density",
                                               "alpha")}
    return compeft.CompeftTensors(**(fields | changes))


def test_from_ternary_refuses_two_magnitudes_in_one_tensor():
    with pytest.raises(ValueError, match="not ternary"):
        compeft.from_ternary({"a": np.array([1.0, 2.0, 0.0], dtype=np.float32)})
    # different magnitudes in different tensors are fine: one scale per tensor
    packed = compeft.from_ternary({"a": np.array([1.0, -1.0], np.float32), "b": np.array([0, 2.0], np.float32)})
    assert list(packed.scales) == [1.0, 2.0]
