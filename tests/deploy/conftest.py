import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "serving"))  # serving_cluster, serving_assets


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random Llama with a tokenizer and chat template, built offline (no hub)."""
    from serving_assets import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("deploy-tiny") / "model")
