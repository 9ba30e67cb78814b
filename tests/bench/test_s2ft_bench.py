"""The S²FT-vs-LoRA and fusion benchmark runs end to end (tiny model, few tokens) and reports equal
parameter counts."""

import json


def test_s2ft_bench_smoke(tiny_with_tokenizer, run_bench):
    out = run_bench("s2ft_bench", "--model", str(tiny_with_tokenizer), "--batch", "3", "--new-tokens", "3",
                    "--prompt-tokens", "6", "--rank", "2", "--runs", "1")
    report = json.loads(out.read_text())
    assert {"base", "lora", "s2ft", "lora_hot_fused", "s2ft_hot_fused", "lora_hot_2base_fused"} <= set(
        report["tokens_per_s"]) and all(report["tokens_per_s"].values())
    assert report["fusion"]["fusions"] >= 6
    lora, s2ft = report["trainable_params"]["lora"], report["trainable_params"]["s2ft"]
    assert abs(s2ft - lora) / lora < 0.35
