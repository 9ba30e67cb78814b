"""The engine's typed config (a dataclass: built by the entry point, passed in)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from workers.adapters.fusion import FusionConfig
from workers.adapters.lora import TARGETS

# Medusa's tree as paths of top-k ranks ((0, 1): the 2nd best of head 1 under the best of head 0). Sized
# for a 2-core CPU, where a forward's cost grows with its tokens beyond ~4 (SmolLM2-135M: 7 tokens ≈ 1.2×,
# 15 ≈ 2.6× a one-token decode step): 7 tokens per verification, 3 heads. GPUs afford Medusa's 64 nodes.
DEFAULT_MEDUSA_TREE: tuple[tuple[int, ...], ...] = ((0,), (1,), (2,), (0, 0), (1, 0), (0, 0, 0))


@dataclass(frozen=True)
class EngineConfig:
    model_path: str
    model_id: str | None = None  # name reported to clients; default: the folder's name
    device: str = "cpu"
    dtype: str | None = None  # "auto" (measured) | "float32" | "bfloat16"; None → bf16 on CUDA, fp32 on CPU
    quantize: str | None = None  # None | "int8" | "w8a8" | "int4" | "fp16": quantized base, adapters in `dtype`
    linear_kernel: str | None = None  # force one base-linear kernel candidate (tests); None → measured
    max_batch: int = 16  # sequences decoding at once (KV-cache slots)
    max_seq: int = 2048  # tokens per sequence, prompt included
    max_tokens_per_step: int = 512  # decode rows + prefill tokens in one forward
    prefill_chunk: int = 256  # the longest run of one prompt in one step
    max_loras: int = 8  # device LoRA memory, in adapters of max_rank: max_loras × max_rank rank rows
    max_rank: int = 16  # the largest rank an adapter may have
    host_cache_bytes: int = 1 << 30  # host tier: adapters as stored (compressed stays compressed)
    lora_targets: tuple[str, ...] = TARGETS
    lora_kernel: str = "auto"  # "auto" (measured) or a name in workers.adapters.layers.KERNELS
    num_threads: int | None = None  # torch intra-op threads; None → leave as is
    fusion: FusionConfig = FusionConfig()  # when a dominant adapter is merged into the base weights
    medusa_max_batch: int = 4  # decoding rows up to which rows with Medusa heads verify trees; 0 → never
    medusa_policy: str = "measured"  # "measured": a cost model decides when and how big (speculation_policy.py);
    #                                  "always": the full tree on every eligible step
    medusa_tree: tuple[tuple[int, ...], ...] = DEFAULT_MEDUSA_TREE
    medusa_epsilon: float = 0.09  # typical acceptance (sampling): p(x) > min(ε, δ·exp(−H(p)))
    medusa_delta: float = 0.3

    def __post_init__(self) -> None:
        if self.quantize and self.fusion.enabled:  # a quantized base cannot hold a merged adapter
            object.__setattr__(self, "fusion", replace(self.fusion, enabled=False))
