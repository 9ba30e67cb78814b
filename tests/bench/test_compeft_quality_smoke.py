"""The ComPEFT quality benchmark runs end to end (tiny model, 3 steps) and writes every figure it reports."""

import json


def test_compeft_quality_smoke(tiny_with_tokenizer, run_bench):
    out = run_bench("compeft_quality", "--model", str(tiny_with_tokenizer), "--steps", "3", "--batch", "2",
                    "--train-examples", "8", "--val-examples", "4", "--test-examples", "4", "--densities", "0.1,0.3",
                    "--alphas", "1,2", "--log-every", "1", timeout=120)
    report = json.loads(out.read_text())
    assert report["fp16_peft_file_bytes"] > 0
    assert report["base_loss"]["test"] > 0 and report["lora_loss"]["test"] > 0
    assert len(report["rows"]) == 2 * 2 * 2  # variants x densities x alphas
    table = report["table"]
    assert [(r["variant"], r["density"]) for r in table] == [("per_tensor", 0.1), ("per_tensor", 0.3),
                                                            ("global", 0.1), ("global", 0.3)]
    for r in table:
        assert r["size_bytes"] > 0 and r["ratio_vs_fp16_peft"] > 1
        assert r["test_loss"] > 0 and r["delta_vs_lora_pct"] is not None and r["base_loss"] > 0
        assert isinstance(r["meets_target"], bool)
    codec_rows = [r for r in table if r["variant"] == "per_tensor"]
    assert codec_rows[0]["size_bytes"] < codec_rows[1]["size_bytes"]  # denser is bigger
    assert report["codec_format_version"] == 2
    assert report["verdict"].startswith("target ")
