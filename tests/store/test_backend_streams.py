"""Backends store a file object from its position, streamed (local: copied in pieces; S3: multipart)."""

import io


def test_write_file_stores_a_file_object_from_its_position(backend):
    body = bytes(range(256)) * 40_000  # ~10 MB: several S3 parts / copy pieces
    f = io.BytesIO(b"header" + body)
    f.seek(6)
    backend.write_file("files/file-abc/data.jsonl", f)
    assert backend.read("files/file-abc/data.jsonl") == body
    backend.write_file("files/file-abc/data.jsonl", io.BytesIO(b"replaced"))
    assert backend.read("files/file-abc/data.jsonl") == b"replaced"
