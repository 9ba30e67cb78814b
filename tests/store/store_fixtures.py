"""Torch-free test material for the store: a tiny base config and LoRA folders built with numpy."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile

import numpy as np

from adapters_store.safetensors_file import write_tensors

BASE_CONFIG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}
SHAPES = {"q_proj": (64, 64), "v_proj": (64, 32)}  # (in, out) for BASE_CONFIG


def lora_tensors(rank: int = 4, seed: int = 0, layers: int = 2, shapes=SHAPES) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for layer in range(layers):
        for target, (fan_in, fan_out) in shapes.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            out[f"{prefix}.lora_A.weight"] = rng.normal(0, 0.1, (rank, fan_in)).astype(np.float32)
            out[f"{prefix}.lora_B.weight"] = rng.normal(0, 0.1, (fan_out, rank)).astype(np.float32)
    return out


def lora_config(rank: int = 4, **extra) -> dict:
    return {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj"],
            "bias": "none", **extra}


def lora_folder(rank: int = 4, seed: int = 0, **extra) -> dict[str, bytes]:
    return {"adapter_config.json": json.dumps(lora_config(rank, **extra)).encode(),
            "adapter_model.safetensors": write_tensors(lora_tensors(rank, seed))}


def zip_bytes(entries: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)
            z.writestr(info, target)
    return buf.getvalue()


def tar_gz_bytes(entries: dict[str, bytes], links: dict[str, tuple[bytes, str]] | None = None) -> bytes:
    """`links`: name → (tarfile.SYMTYPE or LNKTYPE, target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            t.addfile(info)
    return buf.getvalue()
