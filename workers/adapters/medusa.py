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

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from adapters_store.validation import PICKLE_SUFFIXES
from workers.errors import AdapterValidationError
from workers.model.config import DecoderConfig

KIND = "medusa"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "medusa_lm_head.safetensors"
MAX_HEADS, MAX_LAYERS = 16, 8
_KEY = re.compile(r"^(\d+)\.(\d+)\.(?:linear\.(weight|bias)|(weight))$")


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

    def to(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> MedusaWeights:
        proj = None if self.projections is None else self.projections.to(device, dtype)
        return MedusaWeights(self.version, self.weights.to(device, dtype), self.biases.to(device, dtype), proj,
                             self.base_model_name_or_path)


# config --------------------------------------------------------------------------------------------
def is_medusa_folder(folder: str | Path) -> bool:
    return (Path(folder) / WEIGHTS_FILE).is_file()


def check_config(cfg: object, base: DecoderConfig) -> dict:
    """Returns {"num_heads", "num_layers", "version" (None when not given), "base_model_name_or_path"}."""
    if not isinstance(cfg, dict):
        raise AdapterValidationError(f"{CONFIG_FILE} must be a JSON object")
    out: dict = {}
    for key, name, limit in (("medusa_num_heads", "num_heads", MAX_HEADS),
                             ("medusa_num_layers", "num_layers", MAX_LAYERS)):
        value = cfg.get(key)
        if type(value) is not int or not 1 <= value <= limit:
            raise AdapterValidationError(f"{CONFIG_FILE}: {key} must be an integer in [1, {limit}], got {value!r}")
        out[name] = value
    version = cfg.get("version")
    if version is not None and (type(version) is not int or version not in (1, 2)):
        raise AdapterValidationError(f"{CONFIG_FILE}: version {version!r} is not supported (1 or 2)")
    out["version"] = version
    name = cfg.get("base_model_name_or_path", "")
    if not isinstance(name, str):
        raise AdapterValidationError(f"{CONFIG_FILE}: base_model_name_or_path must be a string")
    out["base_model_name_or_path"] = name
    for key, expected in (("hidden_size", base.hidden_size), ("vocab_size", base.vocab_size)):
        if key in cfg and cfg[key] != expected:
            raise AdapterValidationError(
                f"{CONFIG_FILE}: {key} {cfg[key]!r} does not match the base model's {expected}: "
                "these heads were trained for another base")
    return out


def read_config(folder: Path, base: DecoderConfig) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterValidationError(f"{folder.name}: no {CONFIG_FILE}")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterValidationError(f"{CONFIG_FILE} is not valid JSON: {e}") from e
    return check_config(cfg, base)


# tensors -------------------------------------------------------------------------------------------
def _check_tensor(key: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if not tensor.is_floating_point():
        raise AdapterValidationError(f"{key}: dtype {tensor.dtype} is not floating point")
    if tuple(tensor.shape) != shape:
        raise AdapterValidationError(
            f"{key}: shape {list(tensor.shape)} does not fit the base (expected {list(shape)}); "
            "were these heads trained for another base model?")
    if not bool(torch.isfinite(tensor).all()):
        raise AdapterValidationError(f"{key}: non-finite values")
    return tensor.float()


def parse_medusa(cfg: dict, tensors: dict[str, torch.Tensor], base: DecoderConfig) -> MedusaWeights:
    """cfg: the output of `check_config`. Refuses unknown, missing and misshapen tensors."""
    k, n, h, v = cfg["num_heads"], cfg["num_layers"], base.hidden_size, base.vocab_size
    seen: set[str] = set()
    has_projection = False
    for key in tensors:
        m = _KEY.match(key)
        if m is None:
            raise AdapterValidationError(
                f"unsupported tensor {key!r}: expected {{i}}.{{j}}.linear.weight|bias or {{i}}.{{n}}.weight")
        head, block = int(m.group(1)), int(m.group(2))
        if head >= k:
            raise AdapterValidationError(f"{key}: head {head} but {CONFIG_FILE} declares medusa_num_heads={k}")
        if m.group(4) is not None:  # a projection: only at block n
            if block != n:
                raise AdapterValidationError(
                    f"{key}: a projection must follow the last ResBlock ({head}.{n}.weight with medusa_num_layers={n})")
            has_projection = True
        elif block >= n:
            raise AdapterValidationError(f"{key}: ResBlock {block} but {CONFIG_FILE} declares medusa_num_layers={n}")
        seen.add(key)
    version = cfg["version"] if cfg["version"] is not None else (1 if has_projection else 2)
    if version == 2 and has_projection:
        raise AdapterValidationError("version 2 heads use the base lm_head; the file must not hold projections")
    expected = {f"{i}.{j}.linear.{p}" for i in range(k) for j in range(n) for p in ("weight", "bias")}
    if version == 1:
        expected |= {f"{i}.{n}.weight" for i in range(k)}
    missing = sorted(expected - seen)
    if missing:
        more = " …" if len(missing) > 6 else ""
        raise AdapterValidationError(f"{WEIGHTS_FILE}: missing tensors {missing[:6]}{more}")
    weights = torch.stack([torch.stack([_check_tensor(f"{i}.{j}.linear.weight", tensors[f"{i}.{j}.linear.weight"],
                                                      (h, h)) for j in range(n)]) for i in range(k)])  # [K, n, H, H]
    biases = torch.stack([torch.stack([_check_tensor(f"{i}.{j}.linear.bias", tensors[f"{i}.{j}.linear.bias"], (h,))
                                       for j in range(n)]) for i in range(k)])  # [K, n, H]
    projections = None
    if version == 1:
        projections = torch.stack([_check_tensor(f"{i}.{n}.weight", tensors[f"{i}.{n}.weight"], (v, h))
                                   for i in range(k)])  # [K, V, H]
    return MedusaWeights(version, weights, biases, projections, cfg["base_model_name_or_path"])


def read_medusa(folder: str | Path, base: DecoderConfig) -> MedusaWeights:
    """Reads and fully validates a Medusa folder against the base."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterValidationError(f"medusa folder {str(folder)!r} does not exist")
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise AdapterValidationError(f"pickle files are refused ({', '.join(pickles)}); use safetensors")
    cfg = read_config(folder, base)
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise AdapterValidationError(f"{folder.name}: no {WEIGHTS_FILE}")
    try:
        tensors = load_safetensors(path.read_bytes())
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterValidationError(f"{WEIGHTS_FILE} is not a valid safetensors file: {e}") from e
    return parse_medusa(cfg, tensors, base)


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
