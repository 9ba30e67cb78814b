"""The decoder's typed config, parsed from a Hugging Face `config.json` and checked for what we implement."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from workers.errors import UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class DecoderConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    rope_theta: float
    rope_scaling: dict = field(default_factory=dict)  # {"rope_type": ..., factor, ...}; empty → default
    sliding_window: int | None = None  # keys further back than this many positions are masked
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf_dict(cls, cfg: dict) -> DecoderConfig:
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"unsupported hidden_act {act!r} (only 'silu')")
        if cfg.get("pretraining_tp", 1) != 1:
            raise UnsupportedModelError("unsupported option pretraining_tp != 1")
        if cfg.get("quantization_config"):
            raise UnsupportedModelError("unsupported option quantization_config (load dequantized weights)")
        num_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        rope_theta, rope_scaling = _rope_settings(cfg)
        sliding = _sliding_window(model_type, cfg)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or hidden // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            o_bias=model_type != "qwen2" and bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            sliding_window=sliding,
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> DecoderConfig:
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise UnsupportedModelError(f"no config.json in {folder}")
        return cls.from_hf_dict(json.loads(path.read_text()))


def _rope_settings(cfg: dict) -> tuple[float, dict]:
    """transformers ≥ 5 writes `rope_parameters`; older configs write `rope_theta` + `rope_scaling`."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or cfg.get("rope_theta") or scaling.pop("rope_theta", None) or 10000.0
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"unsupported rope_scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "yarn" and ("mscale" in merged or "mscale_all_dim" in merged):
        raise UnsupportedModelError("unsupported rope_scaling option 'mscale' for yarn")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError("unsupported option partial_rotary_factor != 1")
    merged["rope_type"] = rope_type
    merged.pop("type", None)
    if rope_type != "default" and "original_max_position_embeddings" not in merged:
        merged["original_max_position_embeddings"] = cfg.get("max_position_embeddings", 2048)
    return float(theta), merged


def _sliding_window(model_type: str, cfg: dict) -> int | None:
    if model_type == "llama":
        return None
    if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
        return None
    return cfg.get("sliding_window") or None
