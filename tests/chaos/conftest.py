import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "serving"))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`adapterd serve` with 2 workers on a tiny model; stopped at the end of the module."""
    from chaos_tools import serve
    from serving_assets import build_lora, build_tiny_model

    root = tmp_path_factory.mktemp("chaos")
    model = build_tiny_model(root / "model")
    build_lora(model, root / "data" / "adapters" / "alpha", seed=1)
    logs = root / "logs"
    logs.mkdir()
    s = serve(model, root / "data", logs, workers=2)
    yield s
    s.stop()
