"""The worker's default context length: the model's `max_position_embeddings`, capped so that the KV cache
of `max_batch` full-length sequences fits the KV-cache memory budget (`--kv-cache-gib`, default 2 GiB).

KV bytes per token = 2 (K and V) × layers × kv_heads × head_dim × bytes per element; the cache holds
max_batch × max_seq tokens. SmolLM2-135M in float32 at max_batch 16: 46,080 B per token, so 2 GiB fits
2,912 positions of its 8,192."""

from __future__ import annotations

from pathlib import Path

from workers.model.config import DecoderConfig

DEFAULT_KV_CACHE_GIB = 2.0
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def kv_bytes_per_token(mc: DecoderConfig, dtype: str) -> int:
    return 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * DTYPE_BYTES.get(dtype, 4)


def default_max_seq(model_path: str | Path, max_batch: int, dtype: str, kv_cache_gib: float) -> int:
    mc = DecoderConfig.from_folder(model_path)
    fits = int(kv_cache_gib * (1 << 30)) // (kv_bytes_per_token(mc, dtype) * max_batch)
    return max(1, min(mc.max_position_embeddings, fits))
