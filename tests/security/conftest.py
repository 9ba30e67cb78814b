import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "serving"))  # serving_cluster, serving_assets


@pytest.fixture(scope="session")
def security_assets(tmp_path_factory):
    """A tiny random Llama and an empty data dir for it."""
    from serving_assets import build_tiny_model

    root = tmp_path_factory.mktemp("security")
    return build_tiny_model(root / "model"), root / "data"
