"""The Medusa kind: v1 and v2 layouts parse, heads evaluate as defined, bad files are refused clearly."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from workers.adapters.medusa import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    MedusaHeads,
    init_medusa,
    read_medusa,
    reference_head_logits,
    write_medusa,
)
from workers.errors import AdapterValidationError
from workers.model.config import DecoderConfig

BASE = DecoderConfig(model_type="llama", vocab_size=96, hidden_size=16, intermediate_size=32, num_layers=2,
                     num_heads=2, num_kv_heads=1, head_dim=8, rms_norm_eps=1e-6, max_position_embeddings=64,
                     tie_word_embeddings=False, qkv_bias=False, o_bias=False, mlp_bias=False, rope_theta=1e4)


def heads(version=2, num_heads=3, num_layers=2, hidden=16, vocab=96, seed=0):
    base = DecoderConfig(**{**BASE.__dict__, "hidden_size": hidden, "vocab_size": vocab})
    return init_medusa(base, num_heads, num_layers, version, std=0.2, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("version", [1, 2])
def test_both_layouts_round_trip_and_evaluate_as_defined(tmp_path, version):
    w = heads(version)
    write_medusa(tmp_path / "h", w, "tiny-base")
    keys = set(load_file(tmp_path / "h" / WEIGHTS_FILE))
    assert ("0.2.weight" in keys) == (version == 1) and "2.1.linear.bias" in keys
    got = read_medusa(tmp_path / "h", BASE)
    assert (got.version, got.num_heads, got.num_layers) == (version, 3, 2)
    assert got.base_model_name_or_path == "tiny-base"
    assert torch.equal(got.weights, w.weights) and torch.equal(got.biases, w.biases)
    lm_head = torch.nn.Linear(16, 96, bias=False)
    h = torch.randn(5, 16)  # [R, hidden]
    fast = MedusaHeads(got, lm_head).logits(h)  # [R, K, V]
    ref = reference_head_logits(got, lm_head.weight, h)
    assert fast.shape == (5, 3, 96)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    assert MedusaHeads(got, lm_head).topk(h, 4).shape == (5, 3, 4)


def test_version_is_inferred_from_the_keys_when_absent(tmp_path):
    for version in (1, 2):
        folder = write_medusa(tmp_path / str(version), heads(version))
        cfg = json.loads((folder / CONFIG_FILE).read_text())
        del cfg["version"]
        cfg.update({"architectures": ["MedusaModel"], "transformers_version": "4.40"})  # ignored extras
        (folder / CONFIG_FILE).write_text(json.dumps(cfg))
        assert read_medusa(folder, BASE).version == version


def _edit(folder, config=None, tensors=None):
    if config is not None:
        cfg = json.loads((folder / CONFIG_FILE).read_text())
        cfg.update(config)
        (folder / CONFIG_FILE).write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    if tensors is not None:
        t = load_file(folder / WEIGHTS_FILE)
        tensors(t)
        save_file(t, folder / WEIGHTS_FILE)
    return folder


def _drop(key):
    return lambda t: t.pop(key)


def _put(key, value):
    return lambda t: t.__setitem__(key, value)


BAD = [
    ("another base (hidden)", {}, None, dict(hidden=32), "shape"),
    ("another base (vocab)", {}, None, dict(vocab=50, version=1), "shape"),
    ("config for another base", {"hidden_size": 32}, None, {}, "another base"),
    ("head count", {"medusa_num_heads": 2}, None, {}, "head 2"),
    ("layer count", {"medusa_num_layers": 1}, None, {}, "ResBlock 1"),
    ("too many heads declared", {"medusa_num_heads": 4}, None, {}, "missing"),
    ("no heads", {"medusa_num_heads": 0}, None, {}, "medusa_num_heads"),
    ("bad version", {"version": 3}, None, {}, "version"),
    ("v2 with projections", {"version": 2}, None, dict(version=1), "version 2"),
    ("v1 without projections", {"version": 1}, None, {}, "missing"),
    ("missing bias", {}, _drop("1.0.linear.bias"), {}, "missing"),
    ("unknown tensor", {}, _put("lm_head.weight", torch.zeros(96, 16)), {}, "unsupported tensor"),
    ("wrong shape", {}, _put("0.0.linear.weight", torch.zeros(16, 15)), {}, "shape"),
    ("integer weights", {}, _put("0.0.linear.bias", torch.zeros(16, dtype=torch.int32)), {}, "floating"),
    ("non-finite", {}, _put("0.0.linear.bias", torch.full((16,), float("nan"))), {}, "non-finite"),
]


@pytest.mark.parametrize("name,config,tensors,make,match", BAD, ids=[b[0] for b in BAD])
def test_bad_heads_are_refused(tmp_path, name, config, tensors, make, match):
    folder = write_medusa(tmp_path / "h", heads(**make))
    _edit(folder, config, tensors)
    with pytest.raises(AdapterValidationError, match=match) as info:
        read_medusa(folder, BASE)
    assert info.value.status == 400


def test_unsafe_or_broken_files_are_refused(tmp_path):
    folder = write_medusa(tmp_path / "h", heads())
    (folder / "medusa_lm_head.pt").write_bytes(b"pickle")
    with pytest.raises(AdapterValidationError, match="pickle"):
        read_medusa(folder, BASE)
    (folder / "medusa_lm_head.pt").unlink()
    (folder / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(AdapterValidationError, match="safetensors"):
        read_medusa(folder, BASE)
    (folder / CONFIG_FILE).write_text("{")
    with pytest.raises(AdapterValidationError, match="JSON"):
        read_medusa(folder, BASE)
    with pytest.raises(AdapterValidationError, match="does not exist"):
        read_medusa(tmp_path / "nowhere", BASE)
