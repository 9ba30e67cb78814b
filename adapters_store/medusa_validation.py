"""Validation of Medusa heads (kind `medusa`), torch-free: the store checks uploads with it and the worker
(`workers.adapters.medusa`, format documented there) loads heads through it, on the safetensors header
and numpy arrays.

Files: `config.json` (`medusa_num_heads`, `medusa_num_layers`, optional `version` 1|2,
`base_model_name_or_path`, and optionally `hidden_size`/`vocab_size`, which must match the base) and
`medusa_lm_head.safetensors`: v1 `{i}.{j}.linear.weight|bias` + `{i}.{n}.weight` (a projection per head),
v2 only `{i}.{j}.linear.*` (heads reuse the base lm_head). Shapes `[hidden, hidden]`, `[hidden]`,
`[vocab, hidden]` against the base; floating dtypes; finite values.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from adapters_store import bounded_json, safetensors_file
from adapters_store.adapter_kind import StoreKind
from adapters_store.base_model import BaseModelSpec
from adapters_store.errors import IncompatibleAdapterError, InvalidAdapterError
from adapters_store.validation import ValidatedAdapter

KIND = "medusa"
CONFIG_NAME, WEIGHTS_NAME = "config.json", "medusa_lm_head.safetensors"
MAX_HEADS, MAX_LAYERS = 16, 8
_KEY = re.compile(r"^(\d+)\.(\d+)\.(?:linear\.(weight|bias)|(weight))$")


class HeadsBase(Protocol):
    """What the checks read of a base: `BaseModelSpec` (store) and `DecoderConfig` (worker) both fit."""

    hidden_size: int
    vocab_size: int


@dataclass(frozen=True)
class MedusaInfo:
    num_heads: int
    num_layers: int
    version: int
    base_model_name_or_path: str
    dense_bytes: int  # the heads' float tensors as float32
    adapter: str | None  # the adapter (name or name@version) the heads were trained on; None: the base


def is_medusa_upload(files: dict[str, bytes]) -> bool:
    return WEIGHTS_NAME in files


def parse_config(raw: bytes, base: HeadsBase) -> dict:
    try:
        cfg = bounded_json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidAdapterError(f"{CONFIG_NAME} is not valid JSON: {e}", param="files") from e
    if not isinstance(cfg, dict):
        raise InvalidAdapterError(f"{CONFIG_NAME} must be a JSON object", param="files")
    for key, limit in (("medusa_num_heads", MAX_HEADS), ("medusa_num_layers", MAX_LAYERS)):
        value = cfg.get(key)
        if type(value) is not int or not 1 <= value <= limit:
            raise InvalidAdapterError(f"{CONFIG_NAME}: {key} must be an integer in [1, {limit}], got {value!r}",
                                      param="files")
    version = cfg.get("version")
    if version is not None and (type(version) is not int or version not in (1, 2)):
        raise InvalidAdapterError(f"{CONFIG_NAME}: version {version!r} is not supported (1 or 2)", param="files")
    if not isinstance(cfg.get("base_model_name_or_path", ""), str):
        raise InvalidAdapterError(f"{CONFIG_NAME}: base_model_name_or_path must be a string", param="files")
    if cfg.get("adapter") is not None and not (isinstance(cfg["adapter"], str) and 0 < len(cfg["adapter"]) <= 200):
        raise InvalidAdapterError(f"{CONFIG_NAME}: adapter must be an adapter name or null", param="files")
    for key, expected in (("hidden_size", base.hidden_size), ("vocab_size", base.vocab_size)):
        if key in cfg and cfg[key] != expected:
            raise IncompatibleAdapterError(f"{CONFIG_NAME}: {key} {cfg[key]!r} does not match the base model's "
                                           f"{expected}: these heads were trained for another base")
    return cfg


def validate_medusa(files: dict[str, bytes], base: HeadsBase) -> MedusaInfo:
    """Checks a Medusa folder's files against the base; raises InvalidAdapterError (malformed) or
    IncompatibleAdapterError (does not fit the base) naming the problem."""
    return check_medusa(files, base)[0]


def check_medusa(files: dict[str, bytes], base: HeadsBase) -> tuple[MedusaInfo, dict[str, np.ndarray]]:
    """`validate_medusa`, also returning the checked tensors (float32), for the worker to load."""
    if CONFIG_NAME not in files:
        raise InvalidAdapterError(f"a Medusa upload needs {CONFIG_NAME} next to {WEIGHTS_NAME}", param="files")
    if WEIGHTS_NAME not in files:
        raise InvalidAdapterError(f"a Medusa upload needs {WEIGHTS_NAME}", param="files")
    cfg = parse_config(files[CONFIG_NAME], base)
    k, n = cfg["medusa_num_heads"], cfg["medusa_num_layers"]
    h, v = base.hidden_size, base.vocab_size
    data = files[WEIGHTS_NAME]
    header = safetensors_file.read_header(data)
    has_projection = False
    for key in header.tensors:
        m = _KEY.match(key)
        if m is None:
            raise IncompatibleAdapterError(
                f"unsupported tensor {key!r}: expected {{i}}.{{j}}.linear.weight|bias or {{i}}.{{n}}.weight")
        head, block = int(m.group(1)), int(m.group(2))
        if head >= k:
            raise IncompatibleAdapterError(f"{key}: head {head} but {CONFIG_NAME} declares medusa_num_heads={k}")
        if m.group(4) is not None:
            if block != n:
                raise IncompatibleAdapterError(f"{key}: a projection must follow the last ResBlock ({head}.{n})")
            has_projection = True
        elif block >= n:
            raise IncompatibleAdapterError(f"{key}: ResBlock {block} but {CONFIG_NAME} declares medusa_num_layers={n}")
    version = cfg.get("version") or (1 if has_projection else 2)
    if version == 2 and has_projection:
        raise IncompatibleAdapterError("version 2 heads use the base lm_head; the file must not hold projections")
    expected = {f"{i}.{j}.linear.weight": (h, h) for i in range(k) for j in range(n)}
    expected |= {f"{i}.{j}.linear.bias": (h,) for i in range(k) for j in range(n)}
    if version == 1:
        expected |= {f"{i}.{n}.weight": (v, h) for i in range(k)}
    missing = sorted(set(expected) - set(header.tensors))
    if missing:
        more = " …" if len(missing) > 6 else ""
        raise IncompatibleAdapterError(f"{WEIGHTS_NAME}: missing tensors {missing[:6]}{more}")
    dense, arrays = 0, {}
    for key, shape in expected.items():
        info = header.tensors[key]
        if info.dtype not in safetensors_file.FLOAT_DTYPES:
            raise IncompatibleAdapterError(f"{key}: dtype {info.dtype} is not floating point")
        if tuple(info.shape) != shape:
            raise IncompatibleAdapterError(
                f"{key}: shape {list(info.shape)} does not fit the base (expected {list(shape)}); "
                "were these heads trained for another base model?")
        arrays[key] = safetensors_file.tensor_array(data, header, key)
        if not np.isfinite(arrays[key]).all():
            raise IncompatibleAdapterError(f"{key}: non-finite values")
        dense += 4 * info.numel
    info = MedusaInfo(k, n, version, cfg.get("base_model_name_or_path", ""), dense, cfg.get("adapter"))
    return info, arrays


def validate_upload(files: dict[str, bytes], base: BaseModelSpec) -> ValidatedAdapter:
    """An uploaded Medusa folder as the store keeps it (as uploaded; heads are not compressed)."""
    stray = sorted(set(files) - {CONFIG_NAME, WEIGHTS_NAME})
    if stray:
        raise InvalidAdapterError(f"unexpected files in a Medusa upload: {stray}", param="files")
    info = validate_medusa(files, base)
    return ValidatedAdapter(kind=KIND, files=dict(files), weights_name=WEIGHTS_NAME, rank=0, alpha=0.0,
                            use_rslora=False, targets=(), layers=info.num_heads, dense_bytes=info.dense_bytes,
                            compress=None)


STORE_KIND = StoreKind(names=(KIND,), matches=is_medusa_upload,
                       validate=lambda files, base, limits, kind: validate_upload(dict(files), base), heads=True)
