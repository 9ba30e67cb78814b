"""JSON with bounds: nesting depth and number length are limited before anything uses the value, and every
way of going past them (RecursionError, int-conversion ValueError) leaves as `json.JSONDecodeError`, which
the callers already turn into a clean 400. For user-supplied files: adapter configs, JSONL lines."""

from __future__ import annotations

import json
from typing import Any

from adapters_store.mapped_files import Buffer

MAX_DEPTH = 64  # arrays/objects inside each other
MAX_NUMBER_CHARS = 64  # digits (and sign, point, exponent) of one number


def _number(kind: type) -> Any:
    def parse(text: str):
        if len(text) > MAX_NUMBER_CHARS:
            raise ValueError(f"a number is longer than {MAX_NUMBER_CHARS} characters")
        return kind(text)

    return parse


_DECODER = json.JSONDecoder(parse_int=_number(int), parse_float=_number(float))


def depth(value: Any) -> int:
    """Nesting depth of a parsed value (scalars 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if level > MAX_DEPTH:
            break
        stack.extend((child, level + 1) for child in children)
    return deepest


def loads(raw: Buffer | bytearray | str) -> Any:
    """`json.loads` within MAX_DEPTH and MAX_NUMBER_CHARS; raises json.JSONDecodeError (or
    UnicodeDecodeError for bytes that are not UTF-8) on anything else."""
    text = raw if isinstance(raw, str) else str(raw, "utf-8")  # bytes, or a mapped upload
    try:
        value = _DECODER.decode(text)
    except RecursionError:
        raise json.JSONDecodeError(f"nested deeper than {MAX_DEPTH} levels", text, 0) from None
    except json.JSONDecodeError:
        raise
    except ValueError as e:  # a number over the limit
        raise json.JSONDecodeError(str(e), text, 0) from None
    if depth(value) > MAX_DEPTH:
        raise json.JSONDecodeError(f"nested deeper than {MAX_DEPTH} levels", text, 0)
    return value
