import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import make_tiny_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tiny_with_tokenizer(tmp_path, smollm2_path) -> Path:
    """A tiny random llama with SmolLM2's vocabulary and tokenizer: what the benchmarks need of a model."""
    folder, _ = make_tiny_model(tmp_path / "m", "llama", vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((smollm2_path / name).read_bytes())
    return folder


@pytest.fixture
def run_bench(tmp_path):
    """Runs bench/NAME.py with the given flags in a fresh process; returns the path of its JSON report."""

    def run(name: str, *flags: str, timeout: int = 600) -> Path:
        out = tmp_path / f"{name}.json"
        subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), *flags, "--out", str(out)],
                       check=True, timeout=timeout)
        return out

    return run
