import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "serving"))  # serving_cluster, serving_assets


@pytest.fixture
def redis_url(valkey):
    """A clean database on the shared server."""
    import redis

    url = f"{valkey.connection_url}/5"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random Llama with a chat template (hidden 64, 2 layers), built offline."""
    from serving_assets import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("ft-tiny") / "model")
