"""S²FT adapters (structured-sparse fine-tuning): per layer, a few attention heads and FFN channels are
fine-tuned as dense submatrices of the base weights. Parse + validate a folder against the base, hold one
adapter's tensors, and write the format (for tests and the trainer).

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
update is `W[:, cols] += C` / `W[rows, :] += C`. Nothing is loaded unless every check passes; pickle files
are refused outright.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from workers.adapters.lora import decode_tensors, read_tensor_bytes
from workers.errors import AdapterValidationError
from workers.model.config import DecoderConfig

FORMAT, VERSION = "s2ft", 1
CONFIG_FILE, WEIGHTS_FILE = "s2ft_config.json", "adapter_model.safetensors"
# module → (parent, update kind, index unit)
MODULES: dict[str, tuple[str, str, str]] = {
    "o_proj": ("self_attn", "col", "head"),
    "down_proj": ("mlp", "col", "channel"),
    "v_proj": ("self_attn", "row", "kv_head"),
    "up_proj": ("mlp", "row", "channel"),
}
_CONFIG_KEYS = {"format", "version", "base_model_name_or_path", "modules", "metadata"}
_KEY = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(index|delta)$")


@dataclass(frozen=True)
class S2FTUpdate:
    """One (layer, module) update of the base weight W [out, in]."""

    kind: str  # "col": W[:, index] += delta; "row": W[index, :] += delta
    index: torch.Tensor  # [k] int64: columns (col) or rows (row) of W, heads expanded to head_dim each
    delta: torch.Tensor  # col: [out, k]; row: [k, in]


@dataclass(frozen=True)
class S2FTWeights:
    """One adapter: per (layer, module) its update."""

    modules: dict[tuple[int, str], S2FTUpdate]

    @property
    def targets(self) -> set[str]:
        return {m for _, m in self.modules}

    @property
    def num_params(self) -> int:
        return sum(u.delta.numel() for u in self.modules.values())

    @property
    def nbytes(self) -> int:
        return sum(u.index.nbytes + u.delta.nbytes for u in self.modules.values())


def unit_counts(base: DecoderConfig) -> dict[str, tuple[int, int]]:
    """module → (number of selectable units, weight rows/columns per unit)."""
    d = base.head_dim
    return {"o_proj": (base.num_heads, d), "down_proj": (base.intermediate_size, 1),
            "v_proj": (base.num_kv_heads, d), "up_proj": (base.intermediate_size, 1)}


def weight_shapes(base: DecoderConfig) -> dict[str, tuple[int, int]]:
    """module → (out, in) of the base weight."""
    h, i = base.hidden_size, base.intermediate_size
    return {"o_proj": (h, base.num_heads * base.head_dim), "down_proj": (h, i),
            "v_proj": (base.num_kv_heads * base.head_dim, h), "up_proj": (i, h)}


# config --------------------------------------------------------------------------------------------
def is_s2ft_folder(folder: str | Path) -> bool:
    return (Path(folder) / CONFIG_FILE).is_file()


def read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterValidationError(f"{folder.name}: no {CONFIG_FILE}")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterValidationError(f"{CONFIG_FILE} is not valid JSON: {e}") from e
    check_config(cfg)
    return cfg


def check_config(cfg: object) -> None:
    if not isinstance(cfg, dict):
        raise AdapterValidationError(f"{CONFIG_FILE} must be a JSON object")
    if cfg.get("format") != FORMAT:
        raise AdapterValidationError(f"{CONFIG_FILE}: format {cfg.get('format')!r} is not {FORMAT!r}")
    version = cfg.get("version")
    if type(version) is not int or version != VERSION:
        raise AdapterValidationError(f"{CONFIG_FILE}: version {version!r} is not supported (only {VERSION})")
    unknown = sorted(set(cfg) - _CONFIG_KEYS)
    if unknown:
        raise AdapterValidationError(f"{CONFIG_FILE}: unknown keys {unknown}")
    modules = cfg.get("modules")
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
        raise AdapterValidationError(f"{CONFIG_FILE}: 'modules' must be a non-empty list of module names")
    bad = sorted(set(modules) - set(MODULES))
    if bad:
        raise AdapterValidationError(f"{CONFIG_FILE}: unknown modules {bad}; S²FT updates {', '.join(MODULES)}")
    if len(set(modules)) != len(modules):
        raise AdapterValidationError(f"{CONFIG_FILE}: 'modules' lists a module twice")
    name = cfg.get("base_model_name_or_path", "")
    if not isinstance(name, str):
        raise AdapterValidationError(f"{CONFIG_FILE}: base_model_name_or_path must be a string")
    if not isinstance(cfg.get("metadata", {}), dict):
        raise AdapterValidationError(f"{CONFIG_FILE}: metadata must be a JSON object")


# tensors -------------------------------------------------------------------------------------------
def group_tensors(tensors: Mapping[str, torch.Tensor], declared: Sequence[str],
                  base: DecoderConfig) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """{(layer, module): {"index": ..., "delta": ...}}; refuses unknown keys, modules and layers."""
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterValidationError(
                f"unsupported tensor {key!r}: expected model.layers.{{L}}.<self_attn|mlp>.<module>.<index|delta>")
        layer, parent, module, which = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if module not in MODULES or MODULES[module][0] != parent:
            raise AdapterValidationError(f"{key}: unknown module {parent}.{module}; S²FT updates "
                                         + ", ".join(f"{p}.{n}" for n, (p, _, _) in MODULES.items()))
        if module not in declared:
            raise AdapterValidationError(f"{key}: module {module} is not listed in {CONFIG_FILE} 'modules'")
        if layer >= base.num_layers:
            raise AdapterValidationError(f"{key}: layer {layer} but the base has {base.num_layers} layers")
        pairs.setdefault((layer, module), {})[which] = tensor
    missing = sorted(set(declared) - {m for _, m in pairs})
    if missing:
        raise AdapterValidationError(f"{CONFIG_FILE} lists {missing} but the weights hold no tensors for them")
    return pairs


def check_index(name: str, index: torch.Tensor, units: int, unit: str) -> torch.Tensor:
    """index: [k] integer → int64, unique, in [0, units)."""
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise AdapterValidationError(f"{name}.index: dtype {index.dtype} is not an integer type")
    if index.dim() != 1 or index.numel() == 0:
        raise AdapterValidationError(f"{name}.index: must be a non-empty 1-D list, got shape {tuple(index.shape)}")
    index = index.long()
    bad = index[(index < 0) | (index >= units)]
    if bad.numel():
        raise AdapterValidationError(f"{name}.index: {unit} {bad[0].item()} out of range [0, {units})")
    if index.unique().numel() != index.numel():
        raise AdapterValidationError(f"{name}.index: duplicate {unit} indices")
    return index


def expand(index: torch.Tensor, width: int) -> torch.Tensor:
    """Unit indices [k] → weight rows/columns [k · width], each unit its `width` consecutive ones, in order."""
    return (index[:, None] * width + torch.arange(width)).reshape(-1)


def check_delta(name: str, delta: torch.Tensor, expected: tuple[int, int]) -> torch.Tensor:
    if not delta.is_floating_point():
        raise AdapterValidationError(f"{name}.delta: dtype {delta.dtype} is not floating point")
    if tuple(delta.shape) != expected:
        raise AdapterValidationError(
            f"{name}.delta: shape {tuple(delta.shape)} does not fit the base and index (expected {list(expected)})")
    if not torch.isfinite(delta).all():
        raise AdapterValidationError(f"{name}.delta: non-finite values")
    return delta.float()


def parse_update(layer: int, module: str, pair: dict[str, torch.Tensor], base: DecoderConfig) -> S2FTUpdate:
    parent, kind, unit = MODULES[module]
    name = f"model.layers.{layer}.{parent}.{module}"
    if set(pair) != {"index", "delta"}:
        raise AdapterValidationError(f"{name}: index and delta must both be present")
    units, width = unit_counts(base)[module]
    index = expand(check_index(name, pair["index"], units, unit), width)  # [k]
    out, fan_in = weight_shapes(base)[module]
    expected = (out, index.numel()) if kind == "col" else (index.numel(), fan_in)
    return S2FTUpdate(kind, index, check_delta(name, pair["delta"], expected))


def parse_s2ft(cfg: dict, tensors: Mapping[str, torch.Tensor], base: DecoderConfig) -> S2FTWeights:
    check_config(cfg)
    pairs = group_tensors(tensors, cfg["modules"], base)
    return S2FTWeights({key: parse_update(*key, pair, base) for key, pair in sorted(pairs.items())})


# reading and writing -------------------------------------------------------------------------------
@dataclass(frozen=True)
class S2FTSource:
    """A validated S²FT adapter as the host cache keeps it: config + the safetensors bytes as stored,
    decoded into tensors only when it moves to the device."""

    config: dict
    data: bytes
    targets: frozenset[str]
    num_params: int
    kind = "s2ft"

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def decode(self, base: DecoderConfig) -> S2FTWeights:
        return parse_s2ft(self.config, decode_tensors(self.data), base)


def read_s2ft(folder: str | Path, base: DecoderConfig) -> tuple[S2FTSource, S2FTWeights]:
    """Reads and fully validates an S²FT folder; returns the bytes to keep and the decoded weights."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterValidationError(f"adapter folder {str(folder)!r} does not exist")
    config, data = read_config(folder), read_tensor_bytes(folder)
    weights = parse_s2ft(config, decode_tensors(data), base)
    return S2FTSource(config, data, frozenset(weights.targets), weights.num_params), weights




def write_s2ft(folder: str | Path, updates: Mapping[tuple[int, str], tuple[Sequence[int] | torch.Tensor, torch.Tensor]],
               base_model_name_or_path: str = "", metadata: dict | None = None) -> Path:
    """Writes version-1 files. updates: (layer, module) → (unit indices — heads for o_proj/v_proj,
    channels for down_proj/up_proj — and the delta, shaped as documented above). Not checked against a
    base: read it back with `read_s2ft` for that."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for (layer, module), (index, delta) in sorted(updates.items()):
        prefix = f"model.layers.{layer}.{MODULES[module][0]}.{module}"
        tensors[f"{prefix}.index"] = torch.as_tensor(index, dtype=torch.int64).reshape(-1).contiguous()
        tensors[f"{prefix}.delta"] = delta.detach().cpu().contiguous()
    modules = [m for m in MODULES if any(m == module for _, module in updates)]
    config = {"format": FORMAT, "version": VERSION, "base_model_name_or_path": base_model_name_or_path,
              "modules": modules}
    if metadata:
        config["metadata"] = metadata
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": FORMAT})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder
