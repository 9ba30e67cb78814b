"""What the store needs to know about the base model, read from its Hugging Face `config.json` without
torch: the number of layers, the (in, out) features of every LoRA-able linear (the same table as
`workers.adapters.lora.target_shapes`, kept in step by a test) and a fingerprint of both."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from adapters_store.errors import StoreError

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_target_shapes(hidden: int, intermediate: int, num_heads: int, num_kv_heads: int,
                       head_dim: int) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each LoRA-able linear of a Llama-family decoder (also the engine's)."""
    q, kv = num_heads * head_dim, num_kv_heads * head_dim
    return {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
            "gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate), "down_proj": (intermediate, hidden)}


class BaseModelConfigError(StoreError):
    """The base model's config.json is missing or lacks the fields the store needs."""


@dataclass(frozen=True)
class BaseModelSpec:
    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def from_config(cls, cfg: dict) -> BaseModelSpec:
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            return cls(
                model_type=str(cfg.get("model_type", "")),
                num_layers=int(cfg["num_hidden_layers"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                vocab_size=int(cfg.get("vocab_size", 0)),
            )
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            raise BaseModelConfigError(f"the base model config lacks a usable field: {e}") from e

    def to_config(self) -> dict:
        """The config.json fields `from_config` reads (what workers publish in Redis, so that a gateway checks
        uploads without the model's files)."""
        return {"model_type": self.model_type, "num_hidden_layers": self.num_layers, "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size, "num_attention_heads": self.num_heads,
                "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim, "vocab_size": self.vocab_size}

    @classmethod
    def from_folder(cls, folder: str | Path) -> BaseModelSpec:
        path = Path(folder) / "config.json"
        try:
            return cls.from_config(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise BaseModelConfigError(f"cannot read the base model config {str(path)!r}: {e}") from e

    def target_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each LoRA-able linear."""
        return lora_target_shapes(self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads,
                                  self.head_dim)

    @property
    def fingerprint(self) -> str:
        """sha256 over the architecture fields and target shapes: equal for checkpoints an adapter fits."""
        payload = {"model_type": self.model_type, "num_layers": self.num_layers, "vocab_size": self.vocab_size,
                   "targets": {t: list(s) for t, s in self.target_shapes().items()}}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
