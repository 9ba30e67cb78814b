"""Every input is bounded before it is expensive: bodies are counted on the stream (chunked or not) at the
gateway and at the worker, prompts are measured in characters before encoding, and JSON in user files has
depth and number-size limits that end in a clean 400."""

import json

import httpx
import pytest
from cluster_signing import ClusterAuth, cluster_secret
from serving_fakes import FakeEngine
from test_gateway import cluster

from adapters_store import bounded_json
from adapters_store.cluster_auth import ClusterSigner
from adapters_store.errors import InvalidAdapterError
from adapters_store.validation import parse_config
from workers.service.app import create_app
from workers.service.config import WorkerServiceConfig

MIB = 1024 * 1024


class Body:
    """A chunked body (no Content-Length) of `total` bytes that counts how much of it was pulled."""

    def __init__(self, total: int, chunk: int = 64 * 1024):
        self.total, self.chunk, self.pulled = total, chunk, 0

    async def __aiter__(self):
        head = b'{"prompt": "'
        self.pulled += len(head)
        yield head
        while self.pulled < self.total:
            self.pulled += self.chunk
            yield b"x" * self.chunk


@pytest.fixture
def engine():
    return FakeEngine(max_seq=64)


@pytest.fixture
async def worker(engine):
    config = WorkerServiceConfig(worker_id="w1", max_request_bytes=MIB, cluster_secret=cluster_secret())
    app = create_app(engine, config)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://w1", auth=ClusterAuth()) as c:
        yield c


async def test_a_chunked_body_over_the_worker_limit_is_refused_on_the_stream(worker):
    body = Body(200 * MIB)
    # a cluster member's headers, signed over another body: the worker reads the body to check the signature,
    # and the stream limit stops it first (signing the 200 MB itself would read it all on the client side)
    member = ClusterSigner(cluster_secret()).request_headers("POST", "/generate", b"{}")
    r = await worker.post("/generate", content=body, headers={"content-type": "application/json", **member},
                          auth=None)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    assert body.pulled <= MIB + 2 * body.chunk  # stopped at the limit, not at 200 MB


async def test_a_declared_length_over_the_worker_limit_is_refused_unread(worker):
    r = await worker.post("/generate", content=b"x" * (MIB + 1), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


async def test_prompts_over_the_character_bound_are_refused_before_encoding(worker, engine):
    calls = []
    real = engine.tokenizer.encode
    engine.tokenizer.encode = lambda text, **kw: calls.append(len(text)) or real(text, **kw)
    r = await worker.post("/generate", json={"prompt": "a" * (64 * 16 + 1), "params": {"max_tokens": 1}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = await worker.post("/generate", json={"messages": [{"role": "user", "content": "a" * 2000}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = await worker.post("/generate", json={"prompt_ids": [5] * 65})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert calls == []  # nothing was encoded
    r = await worker.post("/generate", json={"prompt": "hello", "params": {"max_tokens": 2}})
    assert r.status_code == 200


async def test_a_chunked_body_over_the_gateway_limit_is_refused_on_the_stream(redis_url, tmp_path):
    async with cluster(redis_url, tmp_path, n_workers=1, max_request_bytes=MIB) as gw:
        body = Body(200 * MIB)
        r = await gw.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
        assert body.pulled <= MIB + 2 * body.chunk
        r = await gw.post("/v1/completions", json={"model": "fake-model", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200  # and the gateway goes on


@pytest.mark.parametrize("line", [
    b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b', "completion": "x"}',
    b'{"prompt": "a", "completion": "b", "n": ' + b"9" * 100_000 + b"}",
])
async def test_deep_or_huge_json_in_a_training_file_is_a_400(redis_url, tmp_path, line):
    async with cluster(redis_url, tmp_path, n_workers=0) as gw:
        r = await gw.post("/v1/files", files={"file": ("t.jsonl", line + b"\n")}, data={"purpose": "fine-tune"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "invalid_training_file"


async def test_deep_or_huge_request_bodies_are_a_400_not_a_500(redis_url, tmp_path):
    async with cluster(redis_url, tmp_path, n_workers=1) as gw:
        for raw in (b'{"model": "fake-model", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                    b'{"model": "fake-model", "prompt": "hi", "seed": ' + b"1" * 100_000 + b"}"):
            r = await gw.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500, r.text
            assert r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("raw", [b"[" * 100_000 + b"]" * 100_000, b'{"r": ' + b"1" * 100_000 + b"}",
                                 b'{"r": 8, "x": ' + b"[" * 65 + b"]" * 65 + b"}"])
def test_deep_or_huge_adapter_configs_are_invalid_adapters(raw):
    with pytest.raises(InvalidAdapterError):
        parse_config(raw)


def test_bounded_json_keeps_ordinary_documents():
    doc = {"a": [1, 2.5, {"b": None}], "c": "d" * 1000, "n": -12345678901234567890}
    assert bounded_json.loads(json.dumps(doc)) == doc
    assert bounded_json.loads(json.dumps(doc).encode()) == doc


# ---- adapter uploads: spooled to disk under the byte cap, validated and stored from there -------------

BIG_BASE = {"model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 11008,
            "num_attention_heads": 32, "vocab_size": 32000}
BOUNDARY = "adapterd-upload-test"


def _lora_header(rank: int) -> bytes:
    """A safetensors header for a rank-`rank` LoRA of q/k/v/o on BIG_BASE (F32; the data: zeros)."""
    header, offset, hidden = {}, 0, BIG_BASE["hidden_size"]
    for layer in range(BIG_BASE["num_hidden_layers"]):
        for target in ("q_proj", "k_proj", "v_proj", "o_proj"):
            for which, shape in (("A", [rank, hidden]), ("B", [hidden, rank])):
                size = 4 * shape[0] * shape[1]
                header[f"base_model.model.model.layers.{layer}.self_attn.{target}.lora_{which}.weight"] = {
                    "dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
                offset += size
    head = json.dumps(header).encode()
    return len(head).to_bytes(8, "little") + head, offset


class MultipartUpload:
    """A multipart adapter upload (chunked, no Content-Length): the config and a safetensors file whose
    `data_bytes` of zeros are generated piece by piece, so the test itself never holds the file."""

    def __init__(self, name: str, header: bytes, data_bytes: int, chunk: int = MIB):
        self.name, self.header, self.data_bytes, self.chunk, self.pulled = name, header, data_bytes, chunk, 0
        self.headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}", "authorization": "Bearer k"}

    def _part(self, disposition: str) -> bytes:
        return f'--{BOUNDARY}\r\nContent-Disposition: form-data; {disposition}\r\n\r\n'.encode()

    async def __aiter__(self):
        config = json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}).encode()
        for piece in (self._part('name="name"'), self.name.encode(), b"\r\n",
                      self._part('name="files"; filename="adapter_config.json"'), config, b"\r\n",
                      self._part('name="files"; filename="adapter_model.safetensors"'), self.header):
            self.pulled += len(piece)
            yield piece
        left = self.data_bytes
        while left > 0:
            piece = b"\0" * min(self.chunk, left)
            left -= len(piece)
            self.pulled += len(piece)
            yield piece
        yield f"\r\n--{BOUNDARY}--\r\n".encode()


def _store_keys(data_dir) -> set[str]:
    root = data_dir / "store"
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and ".tmp" not in p.parts}


@pytest.fixture
def big_base(tmp_path):
    folder = tmp_path / "big-base"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(BIG_BASE))
    return folder


async def test_a_200_mb_adapter_upload_is_stored_with_bounded_memory(redis_url, tmp_path, big_base):
    import tracemalloc

    header, data_bytes = _lora_header(rank=50)  # 32 layers × 4 modules × 1.6 MB = 210 MB
    async with cluster(redis_url, tmp_path, n_workers=0, api_keys="k:alice", base_model_path=big_base,
                       max_upload_bytes=256 * MIB) as gw:
        upload = MultipartUpload("big", header, data_bytes)
        tracemalloc.start()
        try:
            r = await gw.post("/v1/adapters", content=upload, headers=upload.headers)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert r.status_code == 201, r.text
        (version,) = r.json()["versions"]
        assert version["rank"] == 50 and version["original_bytes"] == len(header) + data_bytes > 200 * MIB
        assert peak < 50 * MIB, f"the upload peaked at {peak / MIB:.0f} MiB of Python/numpy memory"
        blobs = [p.stat().st_size for p in (tmp_path / "store" / "blobs").rglob("*") if p.is_file()]
        assert len(header) + data_bytes in blobs  # the weights stored whole


async def test_an_adapter_upload_over_the_cap_is_a_413_on_the_stream_and_stores_nothing(redis_url, tmp_path,
                                                                                     big_base):
    header, data_bytes = _lora_header(rank=8)  # 33 MB, over an 8 MiB cap
    async with cluster(redis_url, tmp_path, n_workers=0, api_keys="k:alice", base_model_path=big_base,
                       max_upload_bytes=8 * MIB) as gw:
        before = _store_keys(tmp_path)
        upload = MultipartUpload("over", header, data_bytes)
        r = await gw.post("/v1/adapters", content=upload, headers=upload.headers)
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
        assert upload.pulled <= 8 * MIB + 2 * upload.chunk  # stopped at the cap, not at 33 MB
        assert _store_keys(tmp_path) == before
        r = await gw.get("/v1/adapters", headers={"authorization": "Bearer k"})
        assert r.status_code == 200 and r.json()["data"] == []
