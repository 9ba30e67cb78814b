"""The engine benchmark runs end to end (tiny model, few tokens) and writes every figure it reports."""

import json


def test_engine_bench_smoke(tiny_with_tokenizer, run_bench):
    out = run_bench("engine_bench", "--model", str(tiny_with_tokenizer), "--batch", "3", "--new-tokens", "4",
                    "--prompt-tokens", "8", "--rank", "2", "--runs", "1")
    report = json.loads(out.read_text())
    assert set(report["tokens_per_s"]) == {"a1_own_base_b1", "a16_own_base_b16", "b_own_16_loras_b16",
                                           "c1_hf_b1", "c16_hf_b16", "d_peft_mixed_b16", "e_peft_sequential"}
    assert all(v > 0 for v in report["tokens_per_s"].values())
    assert len(report["ratios"]) == 6 and report["memory_bandwidth_GBps"] > 0
