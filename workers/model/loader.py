"""Loads a Hugging Face folder (config.json + *.safetensors, sharded or not) into a Decoder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from workers.errors import UnsupportedModelError
from workers.model.config import DecoderConfig
from workers.model.decoder import Decoder


@dataclass(frozen=True)
class ModelSpec:
    path: str
    device: str = "cpu"
    dtype: str | None = None  # None → bfloat16 on CUDA, float32 on CPU


def resolve_dtype(device: torch.device, dtype: str | None) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UnsupportedModelError(f"unsupported dtype {dtype!r}")
    return getattr(torch, dtype)


def checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
            raise UnsupportedModelError(f"{folder} holds only pickle checkpoints; convert them to safetensors")
        raise UnsupportedModelError(f"no *.safetensors in {folder}")
    return files


def load_decoder(spec: ModelSpec) -> Decoder:
    folder = Path(spec.path)
    cfg = DecoderConfig.from_folder(folder)
    device = torch.device(spec.device)
    dtype = resolve_dtype(device, spec.dtype)
    with torch.device("meta"):
        model = Decoder(cfg)
    expected = dict(model.named_parameters())
    state: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(folder):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name in expected:
                    state[name] = f.get_tensor(name).to(device=device, dtype=dtype)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing = [n for n in expected if n not in state and not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    if missing:
        raise UnsupportedModelError(f"checkpoint in {folder} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise UnsupportedModelError(f"{name}: checkpoint shape {tuple(tensor.shape)}, "
                                        f"config expects {tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval().requires_grad_(False)
