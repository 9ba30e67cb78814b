"""The Medusa benchmark runs end to end (tiny model, heads trained by the project's trainer, few tokens):
greedy outputs are identical to plain decoding and the report carries every figure."""

import json


def test_medusa_bench_smoke(tiny_with_tokenizer, run_bench, tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERD_CACHE_DIR", str(tmp_path / "cache"))
    out = run_bench("medusa_bench", "--model", str(tiny_with_tokenizer), "--train-prompts", "4",
                    "--train-new-tokens", "6", "--epochs", "1", "--eval-prompts", "2", "--new-tokens", "6")
    report = json.loads(out.read_text())
    for mode in ("greedy", "sampled", "random_heads_greedy", "random_heads_sampled"):
        r = report[mode]
        assert r["tokens"]["plain"] > 0 and r["speedup"] > 0 and r["tokens_per_step"] >= 1
        assert len(r["acceptance_by_head"]) == 3 and len(r["paired_speedups"]) == 2 and r["median_paired_speedup"] > 0
    assert report["greedy"]["identical_outputs"] == report["random_heads_greedy"]["identical_outputs"] == 2
    assert report["cost_model"][1] == 1.0
    assert list(tmp_path.glob("cache/medusa_bench/*/heads/medusa_lm_head.safetensors"))
