"""Activation smoothing for the w8a8 base (SmoothQuant, Xiao et al. 2023), calibrated at load.

A few input channels of an LLM's linears carry activations 10-100x the others; one int8 scale per token
then leaves the rest of the token a handful of levels. Per input channel j, x_j / s_j and W[:, j] · s_j
keep the product and move part of the range into the weights (which are quantized per output channel):
s_j = max|x_j|^α / max|W[:, j]|^(1-α), α = 0.5. max|x_j| comes from one calibration prefill of random
tokens (seeded; no dataset), measured on the float model before it is quantized.
"""

from __future__ import annotations

import torch

from workers.model.batch import build_step_batch
from workers.model.decoder import Decoder, Linear
from workers.model.kv_cache import KVCache
from workers.model.rope import rope_tables

ALPHA = 0.5
CALIBRATION_PROMPTS, CALIBRATION_TOKENS = 4, 64


def activation_absmax(model: Decoder, prompts: int = CALIBRATION_PROMPTS,
                      tokens: int = CALIBRATION_TOKENS) -> dict[Linear, torch.Tensor]:
    """Each Linear's largest |input| per input channel [in] (fp32) over a prefill of random-token prompts."""
    cfg, device = model.config, model.model.embed_tokens.weight.device
    seen: dict[Linear, torch.Tensor] = {}

    def record(module: Linear, args: tuple[torch.Tensor]) -> None:
        absmax = args[0].reshape(-1, args[0].shape[-1]).abs().amax(0).float()  # [in]
        seen[module] = absmax if module not in seen else torch.maximum(seen[module], absmax)

    linears = [m for m in model.modules() if isinstance(m, Linear)]
    hooks = [m.register_forward_pre_hook(record) for m in linears]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (prompts, tokens), generator=gen).tolist()
    kv = KVCache(cfg.num_layers, prompts, tokens, cfg.num_kv_heads, cfg.head_dim, model.dtype, device)
    cos, sin = (t.to(model.dtype) for t in rope_tables(cfg, tokens))
    chunks = [(slot, 0, prompt, True) for slot, prompt in enumerate(ids)]
    try:
        with torch.inference_mode():
            batch = build_step_batch([], chunks, cos, sin, cfg.sliding_window, device)
            model.lm_head(model.hidden_states(batch, kv))  # every position reaches the lm_head, not the last only
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def smoothing_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """s [in] for W [out, in] and its inputs' per-channel max |x| [in]."""
    w_absmax = weight.detach().float().abs().amax(0).clamp(min=1e-5)  # [in]
    return (act_absmax.clamp(min=1e-5) ** alpha / w_absmax ** (1 - alpha)).clamp(min=1e-5)
