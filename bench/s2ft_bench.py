"""S²FT vs LoRA decode throughput at equal trainable parameters, and one dominant adapter fused vs
unfused vs the base alone (issue 5).

    .venv/bin/python bench/s2ft_bench.py      # SmolLM2-135M, 16 requests per batch, 2 threads

(base) 16 requests on the base model; (lora) 16 requests on 16 distinct r=16 LoRAs on all seven targets;
(s2ft) 16 requests on 16 distinct S²FT adapters (attention heads of o_proj + FFN channels of down_proj)
sized to the LoRA's parameter count. One dominant adapter: all 16 requests on lora0 (or s2ft0), unfused
(its rows add their LoRA / S²FT delta) and fused into the base weights; and 14 on lora0 + 2 base rows,
which add the fused adapter's correction. Fusion is driven by hand here (the policy is off), outside the
timed runs. Greedy, 32-token prompts, 64 new tokens, all modes interleaved in each of --runs rounds;
tokens/s are medians, ratios are medians of the per-round ratios (same-round pairs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.adapters.fusion import FusionConfig  # noqa: E402
from workers.adapters.s2ft import write_s2ft  # noqa: E402
from workers.engine.config import EngineConfig  # noqa: E402
from workers.engine.core import EngineCore  # noqa: E402
from workers.engine.types import GenerationRequest, SamplingParams  # noqa: E402
from workers.model.config import DecoderConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from engine_bench import make_adapters  # noqa: E402


def s2ft_layout(cfg: DecoderConfig, params_per_layer: int) -> tuple[int, int]:
    """(heads, channels) per layer whose column updates hold about `params_per_layer` parameters:
    half in o_proj head blocks ([hidden, heads·head_dim]), the rest in down_proj channels ([hidden, 1])."""
    per_head = cfg.hidden_size * cfg.head_dim
    heads = max(1, round(params_per_layer / 2 / per_head))
    channels = max(1, round((params_per_layer - heads * per_head) / cfg.hidden_size))
    return heads, channels


def make_s2ft(out: Path, cfg: DecoderConfig, n: int, heads: int, channels: int) -> list[Path]:
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        updates = {}
        for layer in range(cfg.num_layers):
            h = torch.randperm(cfg.num_heads, generator=g)[:heads].tolist()
            c = torch.randperm(cfg.intermediate_size, generator=g)[:channels].tolist()
            updates[(layer, "o_proj")] = (h, torch.randn(cfg.hidden_size, heads * cfg.head_dim, generator=g) * 0.01)
            updates[(layer, "down_proj")] = (c, torch.randn(cfg.hidden_size, channels, generator=g) * 0.01)
        paths.append(write_s2ft(out / f"s2ft{i}", updates))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "s2ft_bench.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from workers.model.default_model import ensure_default_model

    model_path = Path(args.model) if args.model else ensure_default_model()
    cfg = DecoderConfig.from_folder(model_path)
    tmp = Path(tempfile.mkdtemp(prefix="s2ft-bench-"))
    B, T, N = args.batch, args.prompt_tokens, args.new_tokens
    loras = make_adapters(model_path, tmp, B, args.rank)
    core = EngineCore(EngineConfig(model_path=str(model_path), max_batch=B, max_seq=T + N + 8, max_loras=B + 1,
                                   max_rank=args.rank, fusion=FusionConfig(enabled=False)),
                      tokenizer=AutoTokenizer.from_pretrained(model_path))
    for i, path in enumerate(loras):
        core.load_adapter(f"lora{i}", path)
    lora_params = sum(a.numel() + b.numel() for a, b in core.read_adapter(loras[0])[1].modules.values())
    heads, channels = s2ft_layout(cfg, lora_params // cfg.num_layers)
    for i, path in enumerate(make_s2ft(tmp, cfg, B, heads, channels)):
        core.load_adapter(f"s2ft{i}", path)
    s2ft_params = core.read_adapter(tmp / "s2ft0")[1].num_params
    gen = torch.Generator().manual_seed(0)
    prompts = [tuple(torch.randint(100, 40000, (T,), generator=gen).tolist()) for _ in range(B)]
    params = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)

    def run(adapters: list[str | None], fused: str | None) -> float:
        if core.adapters.fused != fused:
            if core.adapters.fused is not None:
                core.fusion.unfuse()
            if fused is not None:
                assert core.fusion.fuse(fused)
        t = time.perf_counter()
        core.generate([GenerationRequest(p, params, a) for p, a in zip(prompts, adapters, strict=True)])
        return B * N / (time.perf_counter() - t)

    hot_mix = ["lora0"] * (B - 2) + [None, None]
    modes = {  # name → (the adapter of each request, the adapter fused during the run)
        "base": ([None] * B, None),
        "lora": ([f"lora{i}" for i in range(B)], None),
        "s2ft": ([f"s2ft{i}" for i in range(B)], None),
        "lora_hot_unfused": (["lora0"] * B, None),
        "lora_hot_fused": (["lora0"] * B, "lora0"),
        "s2ft_hot_unfused": (["s2ft0"] * B, None),
        "s2ft_hot_fused": (["s2ft0"] * B, "s2ft0"),
        "lora_hot_2base_unfused": (hot_mix, None),
        "lora_hot_2base_fused": (hot_mix, "lora0"),
    }
    for adapters, fused in modes.values():
        run(adapters, fused)  # warm-up: every adapter on the device
    samples: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(args.runs):  # interleaved
        for name, (adapters, fused) in modes.items():
            samples[name].append(run(adapters, fused))
    tps = {k: statistics.median(v) for k, v in samples.items()}

    def paired(a: str, b: str) -> float:
        """Median over rounds of a/b measured in the same round: drifts of this shared machine cancel."""
        return statistics.median(x / y for x, y in zip(samples[a], samples[b], strict=True))

    ratios = {"s2ft/lora (target >= 1)": paired("s2ft", "lora"), "s2ft/base": paired("s2ft", "base"),
              "lora/base": paired("lora", "base"),
              "lora_hot_fused/base (target >= 0.97)": paired("lora_hot_fused", "base"),
              "lora_hot_unfused/base": paired("lora_hot_unfused", "base"),
              "s2ft_hot_fused/base (target >= 0.97)": paired("s2ft_hot_fused", "base"),
              "s2ft_hot_unfused/base": paired("s2ft_hot_unfused", "base"),
              "lora_hot_2base: fused/unfused": paired("lora_hot_2base_fused", "lora_hot_2base_unfused")}
    fusion = core.fusion.stats()
    report = {"config": {**vars(args), "model": str(model_path)}, "trainable_params": {
        "lora": lora_params, "s2ft": s2ft_params, "s2ft_heads_per_layer": heads,
        "s2ft_channels_per_layer": channels}, "tokens_per_s": tps, "ratios": ratios, "samples": samples,
        "fusion": {"fusions": fusion["fusions"],
                   "mean_fuse_plus_unfuse_s": fusion["fusion_seconds"] / max(1, fusion["fusions"])}}
    print(f"params per adapter: LoRA {lora_params:,}, S²FT {s2ft_params:,} ({heads} heads + {channels} channels/layer)")
    for k, v in tps.items():
        print(f"{k:24s} {v:8.1f} tok/s")
    for k, v in ratios.items():
        print(f"{k:38s} {v:6.2f}")
    print(f"fuse + unfuse: {report['fusion']['mean_fuse_plus_unfuse_s'] * 1e3:.0f} ms on average")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
