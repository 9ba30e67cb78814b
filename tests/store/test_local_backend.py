"""The local backend's atomic writes: a crash before the rename or link leaves nothing visible."""

import os

import pytest

from adapters_store.backends import LocalBackend, open_backend


def test_crash_before_rename_leaves_the_old_bytes(tmp_path, monkeypatch):
    backend = LocalBackend(tmp_path)
    backend.write("a/key", b"old")

    def crash(*args):
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        backend.write("a/key", b"new")
    monkeypatch.setattr(os, "link", crash)
    with pytest.raises(OSError):
        backend.create("a/other", b"x")
    monkeypatch.undo()
    assert backend.read("a/key") == b"old" and backend.read("a/other") is None
    assert backend.list("") == ["a/key"]


def test_create_only_if_absent(tmp_path):
    backend = LocalBackend(tmp_path)
    assert backend.create("k", b"1") and not backend.create("k", b"2")
    assert backend.read("k") == b"1"


def test_open_backend_urls(tmp_path):
    local = open_backend((tmp_path / "with #hash").as_uri())
    assert local.root == (tmp_path / "with #hash").resolve()
    assert open_backend(local.url).root == local.root
    with pytest.raises(ValueError):
        open_backend("ftp://x/y")
