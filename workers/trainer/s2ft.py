"""S²FT fine-tuning on the HF model: per layer, a seeded random selection of attention heads (columns of
`o_proj`, rows of `v_proj` for KV heads) and FFN channels (columns of `down_proj`, rows of `up_proj`, the
same channels as down_proj's when both are chosen) gets a dense trainable delta; the base stays frozen, so
gradients and optimizer state exist only for the submatrices. Written with workers.adapters.s2ft.write_s2ft.

    column update (o_proj, down_proj):  y = W x + x[..., cols] @ Cᵀ      C: [out, k]   (≡ W[:, cols] += C)
    row update    (v_proj, up_proj):    y = W x;  y[..., rows] += x @ Cᵀ  C: [k, in]   (≡ W[rows, :] += C)
"""

from __future__ import annotations

from pathlib import Path

import torch

from workers.adapters.s2ft import MODULES, write_s2ft
from workers.trainer.method_contract import MethodSetup, TrainingSpec
from workers.trainer.sft import decoder_layers, load_base, sft_setup


class ColumnDelta(torch.nn.Module):
    def __init__(self, base: torch.nn.Linear, cols: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("cols", cols, persistent=False)  # [k] long, columns of W
        self.delta = torch.nn.Parameter(torch.zeros(base.out_features, cols.numel()))  # [out, k]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] → [..., out]
        return self.base(x) + x[..., self.cols] @ self.delta.T


class RowDelta(torch.nn.Module):
    def __init__(self, base: torch.nn.Linear, rows: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("rows", rows, persistent=False)  # [k] long, rows of W
        self.delta = torch.nn.Parameter(torch.zeros(rows.numel(), base.in_features))  # [k, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] → [..., out]
        return self.base(x).index_add(-1, self.rows, x @ self.delta.T)


def count(ratio: float, units: int) -> int:
    """Units selected at `ratio` of `units`: 0 for ratio 0, else at least one."""
    return 0 if ratio == 0 else min(units, max(1, round(ratio * units)))


def unit_layout(config) -> dict[str, tuple[int, int]]:
    """module → (selectable units, weight columns/rows per unit) of an HF Llama-family config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return {"o_proj": (config.num_attention_heads, head_dim), "v_proj": (kv_heads, head_dim),
            "down_proj": (config.intermediate_size, 1), "up_proj": (config.intermediate_size, 1)}


def select_units(config, method: dict, num_layers: int, seed: int) -> dict[tuple[int, str], list[int]]:
    """(layer, module) → sorted unit indices, S²FT's default random selection (seeded)."""
    layout = unit_layout(config)
    g = torch.Generator().manual_seed(seed)
    picked = {}
    for layer in range(num_layers):
        channels = None
        for module in method["modules"]:
            units, _ = layout[module]
            k = count(method["head_ratio"] if module in ("o_proj", "v_proj") else method["channel_ratio"], units)
            if k == 0:
                continue
            if module in ("down_proj", "up_proj") and channels is not None:
                picked[(layer, module)] = channels  # co-selected FFN channels
                continue
            chosen = sorted(torch.randperm(units, generator=g)[:k].tolist())
            if module in ("down_proj", "up_proj"):
                channels = chosen
            picked[(layer, module)] = chosen
    return picked


def expand(units: list[int], width: int) -> torch.Tensor:
    """Unit indices → weight columns/rows [k · width], each unit its `width` consecutive ones."""
    index = torch.tensor(units, dtype=torch.long)
    return (index[:, None] * width + torch.arange(width)).reshape(-1)


def inject(model, picked: dict[tuple[int, str], list[int]]) -> dict[str, torch.nn.Parameter]:
    layout = unit_layout(model.config)
    layers = decoder_layers(model)
    params = {}
    for (layer, module), units in sorted(picked.items()):
        parent_name, kind, _ = MODULES[module]
        parent = getattr(layers[layer], parent_name)
        index = expand(units, layout[module][1])
        wrapper = (ColumnDelta if kind == "col" else RowDelta)(getattr(parent, module), index)
        setattr(parent, module, wrapper)
        params[f"model.layers.{layer}.{parent_name}.{module}.delta"] = wrapper.delta
    return params


def save(folder: Path, picked: dict, params: dict[str, torch.nn.Parameter], spec: TrainingSpec) -> Path:
    updates = {}
    for (layer, module), units in picked.items():
        delta = params[f"model.layers.{layer}.{MODULES[module][0]}.{module}.delta"]
        updates[(layer, module)] = (units, delta.detach().clone())
    m = spec.method
    meta = {"trainer": "adapterd", "head_ratio": m["head_ratio"], "channel_ratio": m["channel_ratio"],
            "seed": spec.seed}
    return write_s2ft(folder, updates, base_model_name_or_path=spec.base_model_path, metadata=meta)


def setup(spec: TrainingSpec) -> MethodSetup:
    model, tokenizer = load_base(spec.base_model_path)
    picked = select_units(model.config, spec.method, len(decoder_layers(model)), spec.seed)
    if not picked:
        raise ValueError("S²FT selects no heads or channels at these ratios")
    params = inject(model, picked)
    return sft_setup(spec, model, tokenizer, "s2ft", params, save=lambda folder: save(folder, picked, params, spec))


def load_into(model, folder: str | Path, base_model_path: str) -> None:
    """Applies a saved S²FT folder to the HF model (frozen), e.g. to distil an adapter's continuations."""
    from workers.adapters.s2ft import read_s2ft
    from workers.model.config import DecoderConfig

    _, weights = read_s2ft(folder, DecoderConfig.from_folder(base_model_path))
    layers = decoder_layers(model)
    for (layer, module), update in weights.modules.items():
        parent = getattr(layers[layer], MODULES[module][0])
        wrapper = (ColumnDelta if update.kind == "col" else RowDelta)(getattr(parent, module), update.index)
        with torch.no_grad():
            wrapper.delta.copy_(update.delta)
        wrapper.delta.requires_grad_(False)
        setattr(parent, module, wrapper)
