"""The engine benchmark runs end to end (tiny model, few tokens) and writes every figure it reports."""

import json


def test_engine_bench_smoke(tiny_with_tokenizer, run_bench):
    out = run_bench("engine_bench", "--model", str(tiny_with_tokenizer), "--batch", "3", "--new-tokens", "4",
                    "--prompt-tokens", "8", "--rank", "2", "--runs", "1")
    report = json.loads(out.read_text())
    assert set(report["tokens_per_s"]) == {"a1_own_base_b1", "a16_own_base_b16", "b_own_16_loras_b16",
                                           "c1_hf_b1", "c16_hf_b16", "d_peft_mixed_b16", "e_peft_sequential",
                                           *(f"f{n}_own_{m}_b{n}" for m in ("bf16", "int8", "w8a8", "int4", "fp16",
                                                                         "auto") for n in (1, 16)),
                                           "c1_hf_bf16_b1", "c16_hf_bf16_b16"}
    assert all(v > 0 for v in report["tokens_per_s"].values())
    assert {"bf16", "int8", "w8a8", "int4", "fp16", "auto"} == set(report["precision"])
    assert all(0 <= p["greedy_agreement_with_fp32"] <= 1 for p in report["precision"].values())
    assert len(report["ratios"]) == 6 + 6 * 3 + 2 and report["memory_bandwidth_GBps"] > 0
    step = report["fp32_b1_decode_step"]
    assert step["without_gemms_ms"] > 0 and step["forward_ms"] > 0 and step["framework_share"] > 0
