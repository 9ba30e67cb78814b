"""S²FT adapters (structured-sparse fine-tuning), the format and its checks against the base. Torch-free:
the gateway validates uploads with it, the worker parses folders with it (`workers.adapters.s2ft`).

Per layer, a few attention heads and FFN channels are fine-tuned as dense submatrices of the base weights.

On-disk format, version 1 — a folder with two files:

`s2ft_config.json`::

    {"format": "s2ft", "version": 1,
     "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M",   # optional, informational
     "modules": ["o_proj", "down_proj", "v_proj"],              # the modules this adapter updates
     "metadata": {...}}                                         # optional, free-form, ignored

`adapter_model.safetensors`, per updated (layer L, module) two tensors, under the base's parameter path:

    model.layers.{L}.self_attn.o_proj.index   int [k]   selected query heads, in [0, num_heads)
    model.layers.{L}.self_attn.o_proj.delta   float [hidden, k · head_dim]    column update
    model.layers.{L}.mlp.down_proj.index      int [k]   selected FFN channels, in [0, intermediate)
    model.layers.{L}.mlp.down_proj.delta      float [hidden, k]               column update
    model.layers.{L}.self_attn.v_proj.index   int [k]   selected KV heads, in [0, num_kv_heads)
    model.layers.{L}.self_attn.v_proj.delta   float [k · head_dim, hidden]    row update
    model.layers.{L}.mlp.up_proj.index        int [k]   selected FFN channels, in [0, intermediate)
    model.layers.{L}.mlp.up_proj.delta        float [k, hidden]               row update

Indices are in the base's original (un-permuted) order, unique, in any order; the delta's columns (rows)
follow the index order, a head expanding to its head_dim consecutive columns (rows). Served unfused as
`y += x[..., cols] @ Cᵀ` (column updates) and `y[..., rows] += x @ Cᵀ` (row updates); fused, the same
update is `W[:, cols] += C` / `W[rows, :] += C`.

ComPEFT-compressed (uploaded with `compression`): the `.delta` tensors go into `adapter_model.compeft`
(`adapters_store.compeft`, per-tensor top-k + ternary) and the `.index` tensors, which must stay exact, into
`s2ft_index.safetensors`; the config is unchanged. Decoding the two gives the folder above.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import numpy as np

from adapters_store import bounded_json, compeft, safetensors_file
from adapters_store.adapter_kind import StoreKind
from adapters_store.errors import IncompatibleAdapterError, InvalidAdapterError
from adapters_store.validation import ValidatedAdapter

FORMAT, VERSION = "s2ft", 1
CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE = "s2ft_config.json", "adapter_model.safetensors", "s2ft_index.safetensors"
# module → (parent, update kind, index unit)
MODULES: dict[str, tuple[str, str, str]] = {
    "o_proj": ("self_attn", "col", "head"),
    "down_proj": ("mlp", "col", "channel"),
    "v_proj": ("self_attn", "row", "kv_head"),
    "up_proj": ("mlp", "row", "channel"),
}
_CONFIG_KEYS = {"format", "version", "base_model_name_or_path", "modules", "metadata"}
_KEY = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(index|delta)$")


class BaseShape(Protocol):
    """What the checks read of a base: `BaseModelSpec` (store) and `DecoderConfig` (worker) both fit."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class S2FTArrays:
    """One checked (layer, module) update of the base weight W [out, in]."""

    kind: str  # "col": W[:, index] += delta; "row": W[index, :] += delta
    index: np.ndarray  # [k] int64: columns (col) or rows (row) of W, heads expanded to head_dim each
    delta: np.ndarray  # col: [out, k]; row: [k, in]; float32


def unit_counts(base: BaseShape) -> dict[str, tuple[int, int]]:
    """module → (number of selectable units, weight rows/columns per unit)."""
    d = base.head_dim
    return {"o_proj": (base.num_heads, d), "down_proj": (base.intermediate_size, 1),
            "v_proj": (base.num_kv_heads, d), "up_proj": (base.intermediate_size, 1)}


def weight_shapes(base: BaseShape) -> dict[str, tuple[int, int]]:
    """module → (out, in) of the base weight."""
    h, i = base.hidden_size, base.intermediate_size
    return {"o_proj": (h, base.num_heads * base.head_dim), "down_proj": (h, i),
            "v_proj": (base.num_kv_heads * base.head_dim, h), "up_proj": (i, h)}


def tensor_key(layer: int, module: str, which: str) -> str:
    return f"model.layers.{layer}.{MODULES[module][0]}.{module}.{which}"


# config --------------------------------------------------------------------------------------------
def parse_config(raw: bytes) -> dict:
    try:
        cfg = bounded_json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidAdapterError(f"{CONFIG_FILE} is not valid JSON: {e}") from e
    check_config(cfg)
    return cfg


def check_config(cfg: object) -> None:
    if not isinstance(cfg, dict):
        raise InvalidAdapterError(f"{CONFIG_FILE} must be a JSON object")
    if cfg.get("format") != FORMAT:
        raise InvalidAdapterError(f"{CONFIG_FILE}: format {cfg.get('format')!r} is not {FORMAT!r}")
    version = cfg.get("version")
    if type(version) is not int or version != VERSION:
        raise InvalidAdapterError(f"{CONFIG_FILE}: version {version!r} is not supported (only {VERSION})")
    unknown = sorted(set(cfg) - _CONFIG_KEYS)
    if unknown:
        raise InvalidAdapterError(f"{CONFIG_FILE}: unknown keys {unknown}")
    modules = cfg.get("modules")
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
        raise InvalidAdapterError(f"{CONFIG_FILE}: 'modules' must be a non-empty list of module names")
    bad = sorted(set(modules) - set(MODULES))
    if bad:
        raise InvalidAdapterError(f"{CONFIG_FILE}: unknown modules {bad}; S²FT updates {', '.join(MODULES)}")
    if len(set(modules)) != len(modules):
        raise InvalidAdapterError(f"{CONFIG_FILE}: 'modules' lists a module twice")
    if not isinstance(cfg.get("base_model_name_or_path", ""), str):
        raise InvalidAdapterError(f"{CONFIG_FILE}: base_model_name_or_path must be a string")
    if not isinstance(cfg.get("metadata", {}), dict):
        raise InvalidAdapterError(f"{CONFIG_FILE}: metadata must be a JSON object")


# tensors -------------------------------------------------------------------------------------------
def group_tensors(tensors: Mapping[str, np.ndarray], declared: Sequence[str],
                  base: BaseShape) -> dict[tuple[int, str], dict[str, np.ndarray]]:
    """{(layer, module): {"index": ..., "delta": ...}}; refuses unknown keys, modules and layers."""
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise IncompatibleAdapterError(
                f"unsupported tensor {key!r}: expected model.layers.{{L}}.<self_attn|mlp>.<module>.<index|delta>")
        layer, parent, module, which = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if module not in MODULES or MODULES[module][0] != parent:
            raise IncompatibleAdapterError(f"{key}: unknown module {parent}.{module}; S²FT updates "
                                           + ", ".join(f"{p}.{n}" for n, (p, _, _) in MODULES.items()))
        if module not in declared:
            raise IncompatibleAdapterError(f"{key}: module {module} is not listed in {CONFIG_FILE} 'modules'")
        if layer >= base.num_layers:
            raise IncompatibleAdapterError(f"{key}: layer {layer} but the base has {base.num_layers} layers")
        pairs.setdefault((layer, module), {})[which] = tensor
    missing = sorted(set(declared) - {m for _, m in pairs})
    if missing:
        raise IncompatibleAdapterError(f"{CONFIG_FILE} lists {missing} but the weights hold no tensors for them")
    return pairs


def check_index(name: str, index: np.ndarray, units: int, unit: str) -> np.ndarray:
    """index: [k] integer → int64, unique, in [0, units)."""
    if index.dtype.kind not in "iu":
        raise IncompatibleAdapterError(f"{name}.index: dtype {index.dtype} is not an integer type")
    if index.ndim != 1 or index.size == 0:
        raise IncompatibleAdapterError(f"{name}.index: must be a non-empty 1-D list, got shape {index.shape}")
    index = index.astype(np.int64)
    bad = index[(index < 0) | (index >= units)]
    if bad.size:
        raise IncompatibleAdapterError(f"{name}.index: {unit} {bad[0]} out of range [0, {units})")
    if np.unique(index).size != index.size:
        raise IncompatibleAdapterError(f"{name}.index: duplicate {unit} indices")
    return index


def expand(index: np.ndarray, width: int) -> np.ndarray:
    """Unit indices [k] → weight rows/columns [k · width], each unit its `width` consecutive ones, in order."""
    return (index[:, None] * width + np.arange(width)).reshape(-1)


def check_delta(name: str, delta: np.ndarray, expected: tuple[int, int]) -> np.ndarray:
    if delta.dtype.kind != "f":
        raise IncompatibleAdapterError(f"{name}.delta: dtype {delta.dtype} is not floating point")
    if tuple(delta.shape) != expected:
        raise IncompatibleAdapterError(
            f"{name}.delta: shape {tuple(delta.shape)} does not fit the base and index (expected {list(expected)})")
    if not np.isfinite(delta).all():
        raise IncompatibleAdapterError(f"{name}.delta: non-finite values")
    return delta.astype(np.float32)


def parse_update(layer: int, module: str, pair: dict[str, np.ndarray], base: BaseShape) -> S2FTArrays:
    parent, kind, unit = MODULES[module]
    name = f"model.layers.{layer}.{parent}.{module}"
    if set(pair) != {"index", "delta"}:
        raise IncompatibleAdapterError(f"{name}: index and delta must both be present")
    units, width = unit_counts(base)[module]
    index = expand(check_index(name, pair["index"], units, unit), width)  # [k]
    out, fan_in = weight_shapes(base)[module]
    expected = (out, index.size) if kind == "col" else (index.size, fan_in)
    return S2FTArrays(kind, index, check_delta(name, pair["delta"], expected))


def parse_s2ft(cfg: dict, tensors: Mapping[str, np.ndarray], base: BaseShape) -> dict[tuple[int, str], S2FTArrays]:
    """Every check of the format against the base; (layer, module) → its update, in key order."""
    check_config(cfg)
    pairs = group_tensors(tensors, cfg["modules"], base)
    return {key: parse_update(*key, pair, base) for key, pair in sorted(pairs.items())}


# the stored files --------------------------------------------------------------------------------
def read_arrays(files: Mapping[str, bytes]) -> dict[str, np.ndarray]:
    """The folder's tensors from its stored files: one safetensors file, or a ComPEFT file of the deltas
    plus the index file."""
    if compeft.FILENAME in files:
        if INDEX_FILE not in files:
            raise InvalidAdapterError(f"a ComPEFT-compressed S²FT adapter needs {INDEX_FILE} beside {compeft.FILENAME}")
        deltas = compeft.decode(files[compeft.FILENAME]).to_dense()
        indices = safetensors_file.read_tensors(files[INDEX_FILE])
        if set(deltas) & set(indices):
            raise InvalidAdapterError(f"{INDEX_FILE} and {compeft.FILENAME} name the same tensors")
        return {**indices, **deltas}
    if WEIGHTS_FILE not in files:
        raise InvalidAdapterError(f"an S²FT adapter needs {WEIGHTS_FILE} (or {compeft.FILENAME} + {INDEX_FILE})")
    return safetensors_file.read_tensors(files[WEIGHTS_FILE])


def dense_files(config_bytes: bytes, tensors: Mapping[str, np.ndarray]) -> dict[str, bytes]:
    """The version-1 folder (config + one safetensors file) holding `tensors`."""
    return {CONFIG_FILE: config_bytes, WEIGHTS_FILE: safetensors_file.write_tensors(dict(tensors))}


def compressed_files(config_bytes: bytes, tensors: Mapping[str, np.ndarray], density: float,
                     alpha: float) -> dict[str, bytes]:
    """The deltas ComPEFT-compressed, the indices kept exactly."""
    deltas = {k: v for k, v in tensors.items() if k.endswith(".delta")}
    indices = {k: v for k, v in tensors.items() if k.endswith(".index")}
    return {CONFIG_FILE: config_bytes, compeft.FILENAME: compeft.compress(deltas, density, alpha).encode(),
            INDEX_FILE: safetensors_file.write_tensors(indices)}


def trainable_params(updates: Mapping[tuple[int, str], S2FTArrays]) -> int:
    return sum(math.prod(u.delta.shape) for u in updates.values())


# uploads -------------------------------------------------------------------------------------------
def validate_upload(files: Mapping[str, bytes], base: BaseShape) -> ValidatedAdapter:
    """An uploaded S²FT folder (plain, or with ComPEFT-compressed deltas) checked against the base."""
    stray = sorted(set(files) - {CONFIG_FILE, WEIGHTS_FILE, compeft.FILENAME, INDEX_FILE})
    if stray:
        raise InvalidAdapterError(f"unexpected files in an S²FT upload: {stray}", param="files")
    if WEIGHTS_FILE in files and compeft.FILENAME in files:
        raise InvalidAdapterError(f"send {WEIGHTS_FILE} or {compeft.FILENAME}, not both", param="files")
    config_bytes = files[CONFIG_FILE]
    tensors = read_arrays(files)
    updates = parse_s2ft(parse_config(config_bytes), tensors, base)
    packed = compeft.FILENAME in files
    return ValidatedAdapter(
        kind="s2ft",
        files=dict(files),
        weights_name=compeft.FILENAME if packed else WEIGHTS_FILE,
        rank=0,
        alpha=0.0,
        use_rslora=False,
        targets=tuple(m for m in MODULES if any(m == module for _, module in updates)),
        layers=len({layer for layer, _ in updates}),
        dense_bytes=4 * trainable_params(updates),
        compress=None if packed else partial(compressed_files, config_bytes, tensors),
    )


STORE_KIND = StoreKind(names=("s2ft",), matches=lambda files: CONFIG_FILE in files,
                       validate=lambda files, base, limits, kind: validate_upload(files, base),
                       dense_files=lambda files: dense_files(files[CONFIG_FILE], read_arrays(files)))
