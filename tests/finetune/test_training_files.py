"""JSONL training files: every line checked, the first bad one named by number, size and line caps,
storage per owner on a store backend."""

from __future__ import annotations

import json

import pytest

from adapters_store.backends import LocalBackend
from adapters_store.training_files import (
    FileLimits,
    TrainingFileError,
    TrainingFileNotFoundError,
    TrainingFileStore,
    TrainingFileTooLargeError,
    parse_records,
)

PC = {"prompt": "a", "completion": "b"}
CHAT = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                     {"role": "assistant", "content": "x", "weight": 1}]}


def jsonl(*lines) -> bytes:
    return "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines).encode()


def test_both_formats_and_blank_lines():
    assert parse_records(jsonl(PC, "", CHAT, "  ")) == [PC, CHAT]


@pytest.mark.parametrize("line, problem", [
    ("[1, 2]", "a record must be a JSON object"),
    ('{"prompt": "a"}', "either 'prompt' and 'completion', or 'messages'"),
    ('{"prompt": "a", "completion": ""}', "'completion' is empty"),
    ('{"prompt": 1, "completion": "b"}', "must be strings"),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "messages[0].role"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
    ('{"messages": [{"role": "assistant", "content": "x", "weight": 0}]}', "no assistant message"),
    ('{"messages": [{"role": "assistant", "content": "x", "extra": 1}]}', "unknown keys"),
    ('{"prompt": "a", "completion": "b"', "not valid JSON"),
])
def test_a_bad_line_is_named(line, problem):
    with pytest.raises(TrainingFileError) as exc:
        parse_records(jsonl(PC, "", line, PC))
    assert exc.value.message.startswith("line 3: ") and problem in exc.value.message, exc.value.message


def test_caps_and_encoding():
    with pytest.raises(TrainingFileError, match="line 2: not UTF-8"):
        parse_records(jsonl(PC) + b"\n\xff\xfe")
    with pytest.raises(TrainingFileTooLargeError):
        parse_records(jsonl(PC, PC, PC), FileLimits(max_lines=2))
    with pytest.raises(TrainingFileTooLargeError):
        parse_records(jsonl(PC), FileLimits(max_bytes=10))
    with pytest.raises(TrainingFileError, match="line 1: the line is over"):
        parse_records(jsonl(PC), FileLimits(max_line_bytes=10))
    with pytest.raises(TrainingFileError, match="no records"):
        parse_records(b"\n")


def test_store_per_owner(tmp_path):
    store = TrainingFileStore(LocalBackend(tmp_path))
    f = store.put("alice", "t.jsonl", jsonl(PC, CHAT), FileLimits())
    assert f.records == 2 and store.list("alice") == [f] and store.list("bob") == []
    assert store.read_records(f.id) == [PC, CHAT]
    with pytest.raises(TrainingFileNotFoundError):
        store.get(f.id, "bob")
    with pytest.raises(TrainingFileError):
        store.put("alice", "bad.jsonl", b"{", FileLimits())
    assert len(store.list("alice")) == 1  # the refused upload left nothing
    assert store.find("../etc") is None
    store.delete(f.id, "alice")
    assert store.find(f.id) is None and store.list("alice") == []
