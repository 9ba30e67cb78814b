"""S²FT adapters: mixed batches (S²FT, LoRA and base rows) against a transformers model whose weights
have the deltas added (the oracle), the fast kernel against the reference, and refused files."""

import copy
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import TINY, make_tiny_model

from workers.adapters.layers import AdapterContext, attach_adapter_layers
from workers.adapters.lora import LoRAWeights
from workers.adapters.ops import build_adapter_batch
from workers.adapters.s2ft import CONFIG_FILE, WEIGHTS_FILE, read_s2ft, write_s2ft
from workers.adapters.s2ft_ops import (
    NO_S2FT,
    S2FTContext,
    S2FTDeviceStore,
    attach_s2ft_layers,
    build_s2ft_batch,
    s2ft_add_fast,
    s2ft_add_reference,
)
from workers.adapters.slots import LoRARowBank
from workers.errors import AdapterValidationError
from workers.model.batch import build_step_batch
from workers.model.config import DecoderConfig
from workers.model.kv_cache import KVCache
from workers.model.loader import ModelSpec, load_decoder
from workers.model.rope import rope_tables

BASE = DecoderConfig.from_hf_dict({"model_type": "llama", **TINY})  # 4 heads, 2 KV heads, head_dim 16
PARENT = {"o_proj": "self_attn", "v_proj": "self_attn", "down_proj": "mlp", "up_proj": "mlp"}
UNITS = {"o_proj": BASE.num_heads, "v_proj": BASE.num_kv_heads, "down_proj": BASE.intermediate_size,
         "up_proj": BASE.intermediate_size}
SPECS = {  # (layer, module) → number of selected heads / channels
    "s1": {(0, "o_proj"): 2, (0, "down_proj"): 10, (1, "down_proj"): 6, (1, "v_proj"): 1, (0, "up_proj"): 7},
    "s2": {(0, "o_proj"): 1, (1, "o_proj"): 3, (0, "v_proj"): 2, (1, "up_proj"): 12},
    "s3": {(1, "down_proj"): 20, (0, "up_proj"): 5},  # no attention updates at all
}


def weight_lines(module: str, units: list[int]) -> list[int]:
    """Rows/columns of the base weight covered by these heads/channels (written out, not via s2ft.expand)."""
    width = BASE.head_dim if module in ("o_proj", "v_proj") else 1
    return [u * width + j for u in units for j in range(width)]


def random_updates(spec: dict, seed: int, scale: float = 0.1) -> dict:
    """(layer, module) → (unit indices in shuffled original order, delta)."""
    g = torch.Generator().manual_seed(seed)
    updates = {}
    for (layer, module), k in spec.items():
        units = torch.randperm(UNITS[module], generator=g)[:k].tolist()
        n = len(weight_lines(module, units))
        out, fan_in = {"o_proj": (64, 64), "down_proj": (64, 128), "v_proj": (32, 64), "up_proj": (128, 64)}[module]
        shape = (out, n) if module in ("o_proj", "down_proj") else (n, fan_in)
        updates[(layer, module)] = (units, torch.randn(shape, generator=g) * scale)
    return updates


# kernels -------------------------------------------------------------------------------------------
def test_fast_kernel_equals_reference_with_mixed_adapters_and_base_rows(tmp_path):
    store = S2FTDeviceStore(BASE.num_layers, torch.float32, torch.device("cpu"))
    ids = {}
    for i, (name, spec) in enumerate(SPECS.items()):
        _, weights = read_s2ft(write_s2ft(tmp_path / name, random_updates(spec, seed=i, scale=1.0)), BASE)
        ids[name] = store.add(weights)
    s1, s2, s3 = ids["s1"], ids["s2"], ids["s3"]
    # scattered groups of each adapter; (s1, s3): a row with its adapter and a fused adapter's correction
    decode_ids = [(), (s2,), (s1,), (s2,), (s3,), (NO_S2FT,), (s1,), (s1, s3)]
    chunks = [(8, 13, (s1,)), (13, 16, ()), (16, 25, (s2,)), (25, 27, (s3, s2))]
    batch = build_s2ft_batch(decode_ids, chunks, torch.device("cpu"))
    assert {a for a, _ in batch.decode_groups} == {s1, s2, s3} and len(batch.segments) == 4
    torch.manual_seed(0)
    for (layer, module), table in store.tables.items():
        out, fan_in = {"o_proj": (64, 64), "down_proj": (64, 128), "v_proj": (32, 64), "up_proj": (128, 64)}[module]
        x, y0 = torch.randn(27, fan_in), torch.randn(27, out)  # x: [N, in]; y0: [N, out] (the base output)
        y_fast, y_ref = y0.clone(), y0.clone()
        s2ft_add_fast(y_fast, x, table, batch)
        s2ft_add_reference(y_ref, x, table, batch)
        torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-5)
        for token in (0, 5, *range(13, 16)):  # base rows untouched
            assert torch.equal(y_ref[token], y0[token])
        assert not torch.equal(y_ref, y0), (layer, module)  # some adapter updates every (layer, module)


def test_store_ids_are_reused_and_removal_clears_every_table(tmp_path):
    store = S2FTDeviceStore(BASE.num_layers, torch.float32, torch.device("cpu"))
    _, w1 = read_s2ft(write_s2ft(tmp_path / "a", random_updates(SPECS["s1"], 0)), BASE)
    _, w3 = read_s2ft(write_s2ft(tmp_path / "c", random_updates(SPECS["s3"], 2)), BASE)
    a, b = store.add(w1), store.add(w3)
    assert (a, b) == (1, 2) and store.nbytes > 0
    assert set(store.table(1, "down_proj")) == {1, 2} and set(store.table(0, "o_proj")) == {1}
    store.remove(a)
    assert all(a not in t for t in store.tables.values()) and store.add(w3) == 1


def test_written_format_reads_back_with_heads_expanded_to_columns(tmp_path):
    updates = random_updates(SPECS["s1"], 0)
    source, weights = read_s2ft(write_s2ft(tmp_path / "a", updates, "tiny-llama"), BASE)
    cfg = json.loads((tmp_path / "a" / CONFIG_FILE).read_text())
    assert cfg["format"] == "s2ft" and cfg["version"] == 1 and cfg["base_model_name_or_path"] == "tiny-llama"
    assert set(cfg["modules"]) == {"o_proj", "down_proj", "v_proj", "up_proj"}
    assert source.nbytes == sum((tmp_path / "a" / f).stat().st_size for f in (WEIGHTS_FILE, CONFIG_FILE))
    assert source.decode(BASE).num_params == weights.num_params == sum(d.numel() for _, d in updates.values())
    for (layer, module), (units, delta) in updates.items():
        u = weights.modules[(layer, module)]
        assert u.index.tolist() == weight_lines(module, units) and u.index.dtype == torch.int64
        assert u.kind == ("col" if module in ("o_proj", "down_proj") else "row")
        assert torch.equal(u.delta, delta)


# the oracle: transformers with the deltas added to its weights --------------------------------------
def merged_hf(hf, updates: dict):
    """A copy of the transformers model with W[:, cols] += C (columns) or W[rows, :] += C (rows)."""
    model = copy.deepcopy(hf)
    with torch.no_grad():
        for (layer, module), (units, delta) in updates.items():
            w = getattr(getattr(model.model.layers[layer], PARENT[module]), module).weight  # [out, in]
            lines = torch.tensor(weight_lines(module, units))
            if module in ("o_proj", "down_proj"):
                w[:, lines] += delta
            else:
                w[lines, :] += delta
    return model


def lora_weights(seed: int) -> LoRAWeights:
    g = torch.Generator().manual_seed(seed)
    shapes = {"q_proj": (64, 64), "o_proj": (64, 64), "down_proj": (128, 64)}  # (in, out)
    modules = {(layer, t): (torch.randn(4, i, generator=g) * 0.1, torch.randn(o, 4, generator=g) * 0.1)
               for layer in range(2) for t, (i, o) in shapes.items()}
    return LoRAWeights(rank=4, alpha=8.0, use_rslora=False, modules=modules)


def merged_hf_lora(hf, weights: LoRAWeights):
    model = copy.deepcopy(hf)
    with torch.no_grad():
        for (layer, t), (a, b) in weights.modules.items():
            parent = "mlp" if t == "down_proj" else "self_attn"
            getattr(getattr(model.model.layers[layer], parent), t).weight += weights.scale(4) * b @ a
    return model


class Harness:
    """Our decoder with LoRA and S²FT wrappers attached, driven step by step with per-step metadata."""

    def __init__(self, folder, kernel: str):
        self.model = load_decoder(ModelSpec(str(folder)))
        cfg = self.model.config
        self.bank = LoRARowBank(cfg, 4, torch.float32, torch.device("cpu"), ("q_proj", "o_proj", "down_proj"))
        self.lora_ctx, self.s2ft_ctx = AdapterContext(kernel), S2FTContext(kernel)
        attach_adapter_layers(self.model, self.bank, self.lora_ctx)  # S²FT wraps the LoRA wrappers
        self.store = S2FTDeviceStore(cfg.num_layers, torch.float32, torch.device("cpu"))
        attach_s2ft_layers(self.model, self.store, self.s2ft_ctx)
        self.kv = KVCache(cfg.num_layers, 8, 64, cfg.num_kv_heads, cfg.head_dim, torch.float32, torch.device("cpu"))
        self.cos, self.sin = rope_tables(cfg, 64)

    def step(self, decode: list, prefill: list) -> torch.Tensor:
        """decode: (slot, position, token, (lora rows, s2ft id)); prefill: (slot, start, tokens, (rows, id)).
        Returns logits for every token of the step: [N, vocab]."""
        cpu = torch.device("cpu")
        batch = build_step_batch([d[:3] for d in decode], [(*p[:3], True) for p in prefill], self.cos, self.sin,
                                 None, cpu)
        batch = dataclasses.replace(batch, logits_rows=torch.arange(batch.num_tokens))
        chunks, offset = [], len(decode)
        for _, _, tokens, adapter in prefill:
            chunks.append((offset, offset + len(tokens), adapter))
            offset += len(tokens)
        self.lora_ctx.batch = build_adapter_batch([d[3][0] for d in decode], [(s, e, a[0]) for s, e, a in chunks],
                                                  torch.float32, cpu)
        self.s2ft_ctx.batch = build_s2ft_batch([d[3][1] for d in decode], [(s, e, a[1]) for s, e, a in chunks], cpu)
        with torch.inference_mode():
            return self.model(batch, self.kv)


ROWS = ["s1", None, "s2", "lora", "s3", "s1", None, "s2"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("s2ft")
    folder, hf = make_tiny_model(root / "base", "llama")
    adapters = {name: random_updates(spec, seed=10 + i) for i, (name, spec) in enumerate(SPECS.items())}
    paths = {name: write_s2ft(root / name, u, str(folder)) for name, u in adapters.items()}
    lora = lora_weights(seed=3)
    oracles = {name: merged_hf(hf, u) for name, u in adapters.items()}
    oracles["lora"], oracles[None] = merged_hf_lora(hf, lora), hf
    return folder, paths, lora, oracles


@pytest.mark.parametrize("kernel", ["fast", "reference"])
def test_mixed_batch_logits_equal_transformers_with_deltas_added(tiny_llama, kernel):
    folder, paths, lora, oracles = tiny_llama
    h = Harness(folder, kernel)
    ids = {name: h.store.add(read_s2ft(path, h.model.config)[1]) for name, path in paths.items()}
    lora_rows = h.bank.allocate(4)
    h.bank.write(lora_rows, lora)
    adapter = {None: ((), ()), "lora": ((lora_rows,), ()), **{name: ((), (i,)) for name, i in ids.items()}}
    prompts = [[(13 * r + 7 * j) % 250 + 3 for j in range(5 + r)] for r in range(len(ROWS))]
    with torch.no_grad():
        ref = [oracles[a](torch.tensor([p])).logits[0] for a, p in zip(ROWS, prompts)]  # [L, vocab] per row

    def check(logits, emitted):  # emitted: (row, position) of each token of the step, in order
        assert logits.shape[0] == len(emitted)
        for out, (r, pos) in zip(logits, emitted):
            expected = ref[r][pos]
            assert (out - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max()), (ROWS[r], pos)

    first, second = range(4), range(4, 8)
    # step 1: rows 0-3 prefill all but their last two tokens
    check(h.step([], [(r, 0, prompts[r][:-2], adapter[ROWS[r]]) for r in first]),
          [(r, p) for r in first for p in range(len(prompts[r]) - 2)])
    # step 2: rows 0-3 decode, rows 4-7 prefill all but their last token (decode rows + chunks in one step)
    decode = [(r, len(prompts[r]) - 2, prompts[r][-2], adapter[ROWS[r]]) for r in first]
    prefill = [(r, 0, prompts[r][:-1], adapter[ROWS[r]]) for r in second]
    check(h.step(decode, prefill),
          [(r, len(prompts[r]) - 2) for r in first] + [(r, p) for r in second for p in range(len(prompts[r]) - 1)])
    # step 3: every row decodes its last prompt token
    decode = [(r, len(prompts[r]) - 1, prompts[r][-1], adapter[ROWS[r]]) for r in range(8)]
    check(h.step(decode, []), [(r, len(prompts[r]) - 1) for r in range(8)])
    for name in ("s1", "s2", "s3", "lora"):  # every adapter changes the output (the test is not vacuous)
        r = ROWS.index(name)
        assert (ref[r] - oracles[None](torch.tensor([prompts[r]])).logits[0]).abs().max() > 1e-2, name


# refused files ------------------------------------------------------------------------------------
VALID = {(0, "o_proj"): ([1, 3], torch.zeros(64, 32)), (1, "down_proj"): ([5, 0, 9], torch.zeros(64, 3)),
         (0, "v_proj"): ([1], torch.zeros(16, 64)), (1, "up_proj"): ([2], torch.zeros(1, 64))}


def with_update(key, index, delta):
    return lambda d: write_s2ft(d, {**VALID, key: (index, delta)})


def edit_config(**changes):
    def mutate(d):
        write_s2ft(d, VALID)
        cfg = json.loads((d / CONFIG_FILE).read_text())
        (d / CONFIG_FILE).write_text(json.dumps({**cfg, **changes}))
    return mutate


def edit_tensors(change):
    def mutate(d):
        write_s2ft(d, VALID)
        tensors = load_file(d / WEIGHTS_FILE)
        change(tensors)
        save_file(tensors, d / WEIGHTS_FILE)
    return mutate


def set_tensors(tensors: dict):
    return edit_tensors(lambda t: t.update(tensors))


def write_pickle(d):
    write_s2ft(d, VALID)
    (d / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")


def drop_config(d):
    write_s2ft(d, VALID)
    (d / CONFIG_FILE).unlink()


def truncate(d):
    write_s2ft(d, VALID)
    f = d / WEIGHTS_FILE
    f.write_bytes(f.read_bytes()[:60])


BAD = {
    "head out of range": (with_update((0, "o_proj"), [1, 4], torch.zeros(64, 32)), "head 4 out of range"),
    "kv head out of range (GQA)": (with_update((0, "v_proj"), [2], torch.zeros(16, 64)), "kv_head 2 out of range"),
    "channel out of range": (with_update((1, "down_proj"), [128], torch.zeros(64, 1)), "channel 128 out of range"),
    "negative index": (with_update((1, "up_proj"), [-1], torch.zeros(1, 64)), "out of range"),
    "duplicate heads": (with_update((0, "o_proj"), [3, 3], torch.zeros(64, 32)), "duplicate"),
    "duplicate channels": (with_update((1, "down_proj"), [7, 2, 7], torch.zeros(64, 3)), "duplicate"),
    "column delta shape": (with_update((0, "o_proj"), [1, 3], torch.zeros(64, 2)), "shape"),
    "row delta shape": (with_update((0, "v_proj"), [1], torch.zeros(64, 16)), "shape"),
    "non-finite delta": (with_update((1, "up_proj"), [2], torch.full((1, 64), float("nan"))), "non-finite"),
    "float index": (set_tensors({"model.layers.0.self_attn.o_proj.index": torch.tensor([1.0, 3.0])}),
                    "not an integer"),
    "integer delta": (set_tensors({"model.layers.1.mlp.up_proj.delta": torch.zeros(1, 64, dtype=torch.int32)}),
                      "not floating"),
    "unknown module tensor": (set_tensors({"model.layers.0.self_attn.q_proj.index": torch.tensor([0]),
                                           "model.layers.0.self_attn.q_proj.delta": torch.zeros(64, 16)}),
                              "unknown module"),
    "unknown module in config": (edit_config(modules=["o_proj", "down_proj", "v_proj", "up_proj", "k_proj"]),
                                 "unknown modules"),
    "module not declared": (edit_config(modules=["o_proj", "down_proj", "v_proj"]), "not listed"),
    "layer out of range": (with_update((2, "o_proj"), [0], torch.zeros(64, 16)), "layer 2"),
    "missing delta": (edit_tensors(lambda t: t.pop("model.layers.1.mlp.down_proj.delta")), "both be present"),
    "stray tensor": (edit_tensors(lambda t: t.update({"lm_head.weight": torch.zeros(2, 2)})), "unsupported tensor"),
    "wrong version": (edit_config(version=2), "version 2"),
    "wrong format": (edit_config(format="lora"), "format"),
    "unknown config key": (edit_config(permuted=True), "unknown keys"),
    "missing config": (drop_config, "no s2ft_config.json"),
    "pickle file": (write_pickle, "pickle"),
    "truncated weights": (truncate, "not a valid safetensors"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_files_are_refused_with_a_clear_message(tmp_path, case):
    mutate, message = BAD[case]
    mutate(tmp_path)
    with pytest.raises(AdapterValidationError, match=message):
        read_s2ft(tmp_path, BASE)


def test_the_valid_fixture_itself_reads(tmp_path):
    _, weights = read_s2ft(write_s2ft(tmp_path, VALID), BASE)
    assert weights.modules[(0, "o_proj")].index.tolist() == [*range(16, 32), *range(48, 64)]
    assert weights.modules[(0, "v_proj")].index.tolist() == list(range(16, 32))


def test_a_compressed_folder_reads_as_its_decoded_deltas_and_the_cache_keeps_the_compressed_bytes(tmp_path):
    from adapters_store import compeft, s2ft_format

    write_s2ft(tmp_path / "plain", VALID)
    tensors = load_file(str(tmp_path / "plain" / WEIGHTS_FILE))
    arrays = {k: v.numpy() for k, v in tensors.items()}
    files = s2ft_format.compressed_files((tmp_path / "plain" / CONFIG_FILE).read_bytes(), arrays, 0.3, 1.0)
    (tmp_path / "packed").mkdir()
    for name, data in files.items():
        (tmp_path / "packed" / name).write_bytes(data)
    source, weights = read_s2ft(tmp_path / "packed", BASE)
    assert source.nbytes == sum(len(b) for b in files.values())
    packed = compeft.decode(files[compeft.FILENAME]).to_dense()
    _, plain = read_s2ft(tmp_path / "plain", BASE)
    for (layer, module), u in weights.modules.items():
        key = f"model.layers.{layer}.{PARENT[module]}.{module}"
        assert torch.equal(u.index, plain.modules[(layer, module)].index)
        assert torch.equal(u.delta, torch.from_numpy(packed[f"{key}.delta"]))
