"""The engine benchmark runs end to end (tiny model, few tokens) and writes every figure it reports."""

import json
import subprocess
import sys
from pathlib import Path

from tiny_models import make_tiny_model

ROOT = Path(__file__).resolve().parents[2]


def test_engine_bench_smoke(tmp_path, smollm2_path):
    folder, _ = make_tiny_model(tmp_path / "m", "llama", vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((smollm2_path / name).read_bytes())
    out = tmp_path / "r.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "engine_bench.py"), "--model", str(folder),
                    "--batch", "3", "--new-tokens", "4", "--prompt-tokens", "8", "--rank", "2", "--runs", "1",
                    "--out", str(out)], check=True, timeout=600)
    report = json.loads(out.read_text())
    assert set(report["tokens_per_s"]) == {"a1_own_base_b1", "a16_own_base_b16", "b_own_16_loras_b16",
                                           "c1_hf_b1", "c16_hf_b16", "d_peft_mixed_b16", "e_peft_sequential"}
    assert all(v > 0 for v in report["tokens_per_s"].values())
    assert len(report["ratios"]) == 6 and report["memory_bandwidth_GBps"] > 0
