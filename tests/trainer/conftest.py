"""Fixtures for the fine-tune trainer tests: a tiny random llama with SmolLM2's vocabulary and tokenizer
(its lm_head scaled up so a 2-layer, 64-wide model can express confident predictions) and a small
deterministic word → colour mapping to learn."""

from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_model
from trainer_data import mapping_records as _mapping_records


@pytest.fixture(scope="session")
def trainer_base(tmp_path_factory, smollm2_path) -> Path:
    folder, model = make_tiny_model(tmp_path_factory.mktemp("trainer") / "base", "llama", vocab_size=49152)
    with torch.no_grad():
        model.lm_head.weight.mul_(6)  # logits up to ~30: the final norm caps the hidden state's size
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((smollm2_path / name).read_bytes())
    return folder


@pytest.fixture
def mapping_records() -> list[dict]:
    return _mapping_records()


@pytest.fixture(autouse=True)
def one_thread():
    """Small matmuls: one thread is as fast and does not spin against the other test processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
