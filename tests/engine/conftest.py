import pytest
from transformers import AutoTokenizer

from workers.engine.config import EngineConfig
from workers.engine.core import EngineCore


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture
def make_core(smollm2_tokenizer):
    """An EngineCore on a tiny model, with SmolLM2's tokenizer (ids < 256 decode to real text)."""

    def make(folder, **overrides) -> EngineCore:
        cfg = EngineConfig(model_path=str(folder), **{"max_batch": 4, "max_seq": 128, **overrides})
        return EngineCore(cfg, tokenizer=smollm2_tokenizer)

    return make
