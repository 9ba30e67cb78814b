import socket
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3-compatible server on a free loopback port, for the whole session."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_env(monkeypatch):
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path):
    """Each store test runs on both backends."""
    from adapters_store.backends import LocalBackend, S3Backend

    if request.param == "local":
        return LocalBackend(tmp_path / "store")
    endpoint = request.getfixturevalue("s3_endpoint")
    request.getfixturevalue("s3_env")
    backend = S3Backend(f"adapters-{uuid.uuid4().hex[:12]}", "store", endpoint_url=endpoint, region="us-east-1")
    backend._s3.create_bucket(Bucket=backend.bucket)
    return backend


@pytest.fixture
def store(backend):
    from adapters_store.version_store import VersionStore

    return VersionStore(backend)
