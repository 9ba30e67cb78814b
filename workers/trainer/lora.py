"""LoRA fine-tuning, hand-written on the HF model: each target linear is wrapped so that
`y = W x + (alpha / r) · B (A x)` with A [r, in] (Kaiming-uniform, as PEFT) and B [out, r] (zeros) the only
trainable tensors. The result is written in PEFT format (adapter_config.json + adapter_model.safetensors,
keys `base_model.model.model.layers.{L}.{self_attn|mlp}.{module}.lora_{A|B}.weight`), read by
workers/adapters/lora.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from workers.trainer.sft import decoder_layers, load_base, sft_setup
from workers.trainer.training import MethodSetup, TrainingSpec

PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


class LoRALinear(torch.nn.Module):
    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_A = torch.nn.Parameter(torch.empty(rank, base.in_features))  # [r, in]
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank))  # [out, r]
        torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] → [..., out]
        return self.base(x) + (x @ self.lora_A.T) @ self.lora_B.T * self.scale


def inject(model, rank: int, alpha: float, targets: list[str]) -> dict[str, torch.nn.Parameter]:
    """Wraps every target linear of every layer; returns the new parameters under their PEFT key names."""
    params = {}
    for layer_index, layer in enumerate(decoder_layers(model)):
        for target in targets:
            parent = getattr(layer, PARENT[target])
            wrapped = LoRALinear(getattr(parent, target), rank, alpha)
            setattr(parent, target, wrapped)
            prefix = f"base_model.model.model.layers.{layer_index}.{PARENT[target]}.{target}"
            params[f"{prefix}.lora_A.weight"] = wrapped.lora_A
            params[f"{prefix}.lora_B.weight"] = wrapped.lora_B
    return params


def load_into(model, folder: str | Path) -> None:
    """Applies a saved PEFT LoRA folder to the HF model (frozen), e.g. to distil an adapter's continuations."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    rank = int(cfg["r"])
    alpha = float(cfg.get("lora_alpha", rank))
    if cfg.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)  # rsLoRA scale α/√r, written as α'/r
    targets = sorted({k.split(".")[-3] for k in tensors})
    params = inject(model, rank, alpha, targets)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name]) if name in tensors else p.zero_()
            p.requires_grad_(False)


def write_peft(folder: Path, params: dict[str, torch.nn.Parameter], method: dict, base_model_path: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().contiguous() for name, p in params.items()}
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": method["rank"], "lora_alpha": method["alpha"],
              "target_modules": list(method["targets"]), "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "base_model_name_or_path": base_model_path}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def setup(spec: TrainingSpec) -> MethodSetup:
    model, tokenizer = load_base(spec.base_model_path)
    m = spec.method
    params = inject(model, m["rank"], m["alpha"], m["targets"])
    return sft_setup(spec, model, tokenizer, "lora", params,
                     save=lambda folder: write_peft(folder, params, m, spec.base_model_path))
