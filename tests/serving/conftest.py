import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """A tiny random Llama with a chat template, and a data dir holding two LoRA adapters for it:
    `alpha` (unversioned) and `beta` with versions v1 and v2."""
    from serving_assets import build_lora, build_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    model = build_tiny_model(root / "model")
    data = root / "data"
    build_lora(model, data / "adapters" / "alpha", seed=1)
    build_lora(model, data / "adapters" / "beta" / "v1", seed=2)
    build_lora(model, data / "adapters" / "beta" / "v2", seed=3)
    return model, data
