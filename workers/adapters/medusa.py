"""Medusa heads (speculative decoding): parse + validate a folder against the base, hold one set of heads,
evaluate them, and write the format (for tests and the trainer).

On-disk format — a folder with two files, in either published layout:

`config.json`::

    {"medusa_num_heads": 3,                # K ≥ 1 heads
     "medusa_num_layers": 1,               # n ≥ 1 ResBlocks per head
     "version": 2,                         # optional: 1 (own projection per head) or 2 (base lm_head);
                                           #   when absent, inferred from the tensor keys
     "base_model_name_or_path": "...",     # optional, informational
     "hidden_size": 576, "vocab_size": 49152}   # optional; checked against the base when present

Other keys are ignored (Medusa's trainer writes a whole Hugging Face config).

`medusa_lm_head.safetensors`, for head i < K and ResBlock j < n:

    {i}.{j}.linear.weight   float [hidden, hidden]
    {i}.{j}.linear.bias     float [hidden]
    {i}.{n}.weight          float [vocab, hidden]     v1 only: the head's own vocabulary projection

A head maps the base's last hidden state h (after the final norm) through x ← x + SiLU(W_j x + b_j) for
each j, then to logits with its projection (v1) or the base's `lm_head` (v2). Head i predicts the token
i+2 positions after h's position (the base's own logits predict the next one). Nothing is loaded unless
every check passes; pickle files are refused outright.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from adapters_store.errors import StoreError
from adapters_store.medusa_validation import CONFIG_NAME as CONFIG_FILE
from adapters_store.medusa_validation import KIND, check_medusa
from adapters_store.medusa_validation import WEIGHTS_NAME as WEIGHTS_FILE
from adapters_store.validation import PICKLE_SUFFIXES
from workers.errors import AdapterValidationError
from workers.model.config import DecoderConfig

__all__ = ["CONFIG_FILE", "KIND", "WEIGHTS_FILE", "MedusaHeads", "MedusaWeights", "init_medusa", "is_medusa_folder",
           "read_medusa", "reference_head_logits", "write_medusa"]


@dataclass(frozen=True)
class MedusaWeights:
    """One set of heads, stacked: head i's ResBlock j is (weights[i, j], biases[i, j])."""

    version: int  # 1: own projections; 2: the base lm_head
    weights: torch.Tensor  # [K, n, hidden, hidden]
    biases: torch.Tensor  # [K, n, hidden]
    projections: torch.Tensor | None  # [K, vocab, hidden] (v1) or None (v2)
    base_model_name_or_path: str = ""

    @property
    def num_heads(self) -> int:
        return int(self.weights.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.weights.shape[1])

    @property
    def nbytes(self) -> int:
        proj = 0 if self.projections is None else self.projections.nbytes
        return self.weights.nbytes + self.biases.nbytes + proj

    def fingerprint(self) -> str:
        """The head set's identity: the same weights detached and attached again keep what was learned."""
        h = hashlib.sha1()
        for t in (self.weights, self.biases, self.projections):
            if t is not None:
                h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def to(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> MedusaWeights:
        proj = None if self.projections is None else self.projections.to(device, dtype)
        return MedusaWeights(self.version, self.weights.to(device, dtype), self.biases.to(device, dtype), proj,
                             self.base_model_name_or_path)


def is_medusa_folder(folder: str | Path) -> bool:
    return (Path(folder) / WEIGHTS_FILE).is_file()


def read_medusa(folder: str | Path, base: DecoderConfig) -> MedusaWeights:
    """Reads and fully validates a Medusa folder against the base (the checks are the store's,
    `adapters_store.medusa_validation`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterValidationError(f"medusa folder {str(folder)!r} does not exist")
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise AdapterValidationError(f"pickle files are refused ({', '.join(pickles)}); use safetensors")
    files = {name: (folder / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE) if (folder / name).is_file()}
    try:
        info, arrays = check_medusa(files, base)
    except StoreError as e:
        raise AdapterValidationError(e.message) from e
    k, n = info.num_heads, info.num_layers
    tensor = lambda key: torch.from_numpy(arrays[key])  # float32
    weights = torch.stack([torch.stack([tensor(f"{i}.{j}.linear.weight") for j in range(n)])
                           for i in range(k)])  # [K, n, H, H]
    biases = torch.stack([torch.stack([tensor(f"{i}.{j}.linear.bias") for j in range(n)])
                          for i in range(k)])  # [K, n, H]
    projections = None
    if info.version == 1:
        projections = torch.stack([tensor(f"{i}.{n}.weight") for i in range(k)])  # [K, V, H]
    return MedusaWeights(info.version, weights, biases, projections, info.base_model_name_or_path)


def init_medusa(base: DecoderConfig, num_heads: int, num_layers: int = 1, version: int = 2, std: float = 0.02,
                generator: torch.Generator | None = None) -> MedusaWeights:
    """Random heads (tests) or a training start (std=0: each head starts as the base's next-token head)."""
    h, v = base.hidden_size, base.vocab_size
    weights = torch.randn(num_heads, num_layers, h, h, generator=generator) * std
    biases = torch.randn(num_heads, num_layers, h, generator=generator) * std
    proj = torch.randn(num_heads, v, h, generator=generator) * 0.08 if version == 1 else None
    return MedusaWeights(version, weights, biases, proj)


def write_medusa(folder: str | Path, heads: MedusaWeights, base_model_name_or_path: str = "") -> Path:
    """Writes the layout of `heads.version`. Not checked against a base: `read_medusa` does that."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for i in range(heads.num_heads):
        for j in range(heads.num_layers):
            tensors[f"{i}.{j}.linear.weight"] = heads.weights[i, j].detach().cpu().contiguous()
            tensors[f"{i}.{j}.linear.bias"] = heads.biases[i, j].detach().cpu().contiguous()
        if heads.projections is not None:
            tensors[f"{i}.{heads.num_layers}.weight"] = heads.projections[i].detach().cpu().contiguous()
    config = {"medusa_num_heads": heads.num_heads, "medusa_num_layers": heads.num_layers,
              "version": heads.version,
              "base_model_name_or_path": base_model_name_or_path or heads.base_model_name_or_path}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": KIND})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


# evaluation ----------------------------------------------------------------------------------------
class MedusaHeads:
    """Heads on the device, ready to evaluate. `lm_head` is the base's (used by v2 heads)."""

    def __init__(self, weights: MedusaWeights, lm_head: Callable[[torch.Tensor], torch.Tensor]):
        self.weights = weights
        self.lm_head = lm_head

    @property
    def num_heads(self) -> int:
        return self.weights.num_heads

    def features(self, h: torch.Tensor) -> torch.Tensor:
        """h: [R, hidden] → each head's features before its projection: [K, R, hidden]."""
        w = self.weights
        x = h.unsqueeze(0).expand(w.num_heads, -1, -1)  # [K, R, H]
        for j in range(w.num_layers):
            y = torch.baddbmm(w.biases[:, j].unsqueeze(1), x, w.weights[:, j].transpose(1, 2))  # [K, R, H]
            x = x + F.silu(y)
        return x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h: [R, hidden] → [R, K, vocab] fp32."""
        x = self.features(h)  # [K, R, H]
        k, r, hidden = x.shape
        if self.weights.projections is None:
            out = self.lm_head(x.reshape(k * r, hidden)).view(k, r, -1)  # [K, R, V]
        else:
            out = torch.bmm(x, self.weights.projections.transpose(1, 2))  # [K, R, V]
        return out.float().transpose(0, 1)

    def topk(self, h: torch.Tensor, k: int) -> torch.Tensor:
        """h: [R, hidden] → the k best tokens of each head: [R, K, k] long."""
        return self.logits(h).topk(k, dim=-1).indices


def reference_head_logits(weights: MedusaWeights, lm_head_weight: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Plain per-head loop with F.linear (the definition): h [R, hidden] → [R, K, vocab]."""
    outs = []
    for i in range(weights.num_heads):
        x = h
        for j in range(weights.num_layers):
            x = x + F.silu(F.linear(x, weights.weights[i, j], weights.biases[i, j]))
        proj = lm_head_weight if weights.projections is None else weights.projections[i]
        outs.append(F.linear(x, proj).float())
    return torch.stack(outs, dim=1)
