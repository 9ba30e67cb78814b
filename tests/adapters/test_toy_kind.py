"""Adding an adapter kind is one module and one registration line: a toy kind, defined only here, with its
own weights (a bias per layer added to the attention output, o_proj's), its own device table and its own
batch view, served by the engine in a mixed batch beside LoRA and base rows, against transformers models
with the same bias hooked onto o_proj (and LoRA merged) — the plain reference."""

import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save_file
from test_s2ft_engine import greedy
from tiny_models import make_lora, make_tiny_model
from torch import nn

from workers.adapters import kinds
from workers.adapters.kind import AdapterKind, DeviceContext, ReadContext
from workers.engine.types import GenerationRequest, SamplingParams
from workers.errors import AdapterValidationError

FILE = "toy_bias.safetensors"


@dataclass(frozen=True)
class BiasWeights:
    kind = "toy_bias"
    biases: dict[int, torch.Tensor]  # layer → [hidden]

    @property
    def parts(self):
        return (self,)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.biases.values())


@dataclass(frozen=True)
class BiasSource:
    data: bytes
    kind = "toy_bias"
    fusable = False
    targets = frozenset({"o_proj"})

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def decode(self, base) -> BiasWeights:
        tensors = load(self.data)
        biases = {}
        for key, t in tensors.items():
            layer = int(key.split(".")[1])
            if layer >= base.num_layers or t.shape != (base.hidden_size,):
                raise AdapterValidationError(f"{key}: {tuple(t.shape)} does not fit the base")
            biases[layer] = t.float()
        return BiasWeights(biases)


class BiasLinear(nn.Module):
    """o_proj, plus each token's bias: y += mix [N, slots] @ table [slots, hidden]."""

    def __init__(self, base: nn.Module, table: torch.Tensor, device: "BiasDevice"):
        super().__init__()
        self.base, self.table, self.device = base, table, device

    def forward(self, x):
        y = self.base(x)
        if self.device.mix is not None:
            y += self.device.mix @ self.table
        return y


class BiasDevice:
    def __init__(self, model, ctx: DeviceContext):
        self.table = torch.zeros(ctx.base.num_layers, ctx.max_adapters + 1, ctx.base.hidden_size, dtype=ctx.dtype)
        self.used: set[int] = set()
        self.mix: torch.Tensor | None = None  # the batch view: [tokens, slots], 1 where a token adds a slot
        for index, layer in enumerate(model.model.layers):
            layer.self_attn.o_proj = BiasLinear(layer.self_attn.o_proj, self.table[index], self)

    def check(self, source) -> None:
        pass

    def fits(self, part) -> bool:
        return len(self.used) < self.table.shape[1] - 1

    def place(self, part: BiasWeights) -> int:
        slot = min(set(range(1, self.table.shape[1])) - self.used)
        self.used.add(slot)
        for layer, bias in part.biases.items():
            self.table[layer, slot] = bias
        return slot

    def free(self, slot: int) -> None:
        self.used.discard(slot)
        self.table[:, slot] = 0

    def set_batch(self, decode, chunks) -> None:
        per_token = list(decode) + [slots for start, end, slots in chunks for _ in range(end - start)]
        if not any(per_token):
            self.mix = None
            return
        self.mix = torch.zeros(len(per_token), self.table.shape[1], dtype=self.table.dtype)
        for token, slots in enumerate(per_token):
            for slot in slots:
                self.mix[token, slot] += 1

    def stats(self) -> dict:
        return {"device_toy_bias_adapters": len(self.used)}


class BiasKind(AdapterKind):
    name = "toy_bias"

    def matches(self, folder: Path) -> bool:
        return (folder / FILE).is_file()

    def read(self, folder: Path, ctx: ReadContext):
        source = BiasSource((folder / FILE).read_bytes())
        return source, source.decode(ctx.base)

    def on_device(self, model, ctx: DeviceContext) -> BiasDevice:
        return BiasDevice(model, ctx)


@pytest.fixture
def toy_kind():
    kinds.register(BiasKind())
    yield
    kinds.unregister(BiasKind.name)


def write_bias(folder: Path, seed: int, layers: int = 2, hidden: int = 64) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    biases = {layer: torch.randn(hidden, generator=g) * 0.5 for layer in range(layers)}
    folder.mkdir(parents=True)
    save_file({f"layers.{layer}.o_proj.bias": b for layer, b in biases.items()}, str(folder / FILE))
    return biases


def hooked(hf, biases: dict[int, torch.Tensor]):
    """The reference: a copy of the transformers model whose o_proj outputs get the bias added."""
    model = copy.deepcopy(hf)
    for layer, bias in biases.items():
        model.model.layers[layer].self_attn.o_proj.register_forward_hook(lambda m, i, out, b=bias: out + b)
    return model


def test_toy_kind_rows_beside_lora_and_base_rows_equal_reference(tmp_path, make_core, toy_kind):
    folder, hf = make_tiny_model(tmp_path / "base", "llama")
    biases = {name: write_bias(tmp_path / name, seed) for seed, name in enumerate(("t1", "t2"))}
    lora = make_lora(folder, tmp_path / "lora", r=4, targets=("q_proj", "o_proj", "down_proj"))
    core = make_core(folder, max_batch=6, max_loras=2, max_rank=4)
    for name in biases:
        core.load_adapter(name, tmp_path / name)
    core.load_adapter("lora", lora)
    rows = ["t1", None, "lora", "t2", "t1"]
    prompts = [[(11 * i + j) % 250 + 3 for j in range(4 + i)] for i in range(len(rows))]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    outs = core.generate([GenerationRequest(tuple(p), params, adapter=a) for p, a in zip(prompts, rows)])
    from peft import PeftModel

    oracles = {name: hooked(hf, b) for name, b in biases.items()}
    oracles[None] = hf
    oracles["lora"] = PeftModel.from_pretrained(copy.deepcopy(hf), lora).merge_and_unload()
    for prompt, adapter, events in zip(prompts, rows, outs):
        assert [e.token_id for e in events] == greedy(oracles[adapter], prompt, 8), adapter
    assert greedy(oracles["t1"], prompts[0], 8) != greedy(hf, prompts[0], 8)  # the toy adapter matters
    stats = core.adapters.stats()
    assert stats["device_toy_bias_adapters"] == 2 and stats["device_adapters"] == 3 and not core.adapters.pins
    core.unload_adapter("t2")  # its device slot is freed through the kind's device
    assert core.adapters.stats()["device_toy_bias_adapters"] == 1


def test_toy_kind_folder_is_checked_by_its_kind(tmp_path, make_core, toy_kind):
    folder, _ = make_tiny_model(tmp_path / "base", "llama")
    write_bias(tmp_path / "wide", seed=0, hidden=96)
    core = make_core(folder)
    with pytest.raises(AdapterValidationError, match="does not fit the base"):
        core.load_adapter("wide", tmp_path / "wide")
    assert core.adapters.resident() == []
