"""The fine-tuning benchmark runs end to end (tiny model, a few steps) and reports every method and ratio,
with LoRA and S²FT at about equal trainable parameters and full fine-tuning training far more."""

import json
import math


def test_finetune_bench_smoke(tiny_with_tokenizer, smollm2_path, run_bench):
    chat = "chat_template.jinja"  # the data is chat-formatted
    (tiny_with_tokenizer / chat).write_bytes((smollm2_path / chat).read_bytes())
    out = run_bench("finetune_bench", "--model", str(tiny_with_tokenizer), "--steps", "3", "--batch", "2",
                    "--eval", "3", "--rank", "2", "--threads", "1")
    report = json.loads(out.read_text())
    methods = report["methods"]
    assert set(methods) == {"full", "lora", "s2ft"}
    for r in methods.values():
        assert r["steps"] == 3 and r["step_s"] > 0 and r["peak_rss_mb"] > 0
        assert math.isfinite(r["heldout_loss"]) and math.isfinite(r["train_loss"])
    lora, s2ft = methods["lora"]["trainable_params"], methods["s2ft"]["trainable_params"]
    assert abs(s2ft - lora) / lora < 0.35 and methods["full"]["trainable_params"] > 10 * lora
    assert math.isfinite(report["heldout_loss"]["base (no training)"])
    assert {"lora/full step time", "s2ft/full step time", "lora/full peak memory",
            "s2ft/full peak memory"} <= set(report["ratios"])
