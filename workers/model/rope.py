"""Rotary position embeddings: inverse frequencies for each supported `rope_type`, and their application."""

from __future__ import annotations

import math

import torch

from workers.model.config import DecoderConfig


def inverse_frequencies(cfg: DecoderConfig) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq [head_dim/2], attention scaling applied to cos/sin)."""
    dim, base, s = cfg.head_dim, cfg.rope_theta, cfg.rope_scaling
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    rope_type = s.get("rope_type", "default")
    if rope_type == "default":
        return inv_freq.float(), 1.0
    if rope_type == "linear":
        return (inv_freq / s["factor"]).float(), 1.0
    if rope_type == "llama3":
        return _llama3(inv_freq, s).float(), 1.0
    if rope_type == "yarn":
        return _yarn(cfg, s)
    raise AssertionError(rope_type)  # the config parser refuses other types


def _llama3(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(cfg: DecoderConfig, s: dict) -> tuple[torch.Tensor, float]:
    dim, base, factor = cfg.head_dim, cfg.rope_theta, s["factor"]
    old_len = s["original_max_position_embeddings"]
    attention_factor = s.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
    beta_fast, beta_slow = s.get("beta_fast", 32), s.get("beta_slow", 1)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1 → extrapolate (high frequencies), 0 → interpolate
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


def rope_tables(cfg: DecoderConfig, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [max_positions, head_dim] in fp32, computed once per model."""
    inv_freq, scale = inverse_frequencies(cfg)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # [P, dim/2]
    angles = torch.cat([angles, angles], dim=-1)  # [P, dim]
    return angles.cos() * scale, angles.sin() * scale


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin [..., head_dim] with its first half negated: rotate_half(x) · sin == roll(x, head_dim/2) · signed_sin,
    which lets `apply_rope` rotate with one roll instead of slicing, negating and concatenating."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim]; cos, sin_signed: [tokens, 1, head_dim] (`signed_sin` of the sin table).
    Three ops where `apply_rope_reference` takes seven: a decode step runs this twice per layer."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotation as transformers writes it (rotate_half), with the plain sin: what the tests compare with."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
