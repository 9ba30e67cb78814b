"""The S²FT-vs-LoRA benchmark runs end to end (tiny model, few tokens) and reports equal parameter counts."""

import json
import subprocess
import sys
from pathlib import Path

from tiny_models import make_tiny_model

ROOT = Path(__file__).resolve().parents[2]


def test_s2ft_bench_smoke(tmp_path, smollm2_path):
    folder, _ = make_tiny_model(tmp_path / "m", "llama", vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((smollm2_path / name).read_bytes())
    out = tmp_path / "r.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "s2ft_bench.py"), "--model", str(folder), "--batch", "3",
                    "--new-tokens", "3", "--prompt-tokens", "6", "--rank", "2", "--runs", "1", "--out", str(out)],
                   check=True, timeout=600)
    report = json.loads(out.read_text())
    assert set(report["tokens_per_s"]) == {"base", "lora", "s2ft"} and all(report["tokens_per_s"].values())
    lora, s2ft = report["trainable_params"]["lora"], report["trainable_params"]["s2ft"]
    assert abs(s2ft - lora) / lora < 0.35
