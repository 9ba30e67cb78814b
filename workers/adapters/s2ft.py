"""S²FT adapters (structured-sparse fine-tuning) on the worker: the format and every check live in
`adapters_store.s2ft_format` (torch-free, shared with the gateway's upload checks; documented there); this
module reads a folder (plain or ComPEFT-compressed deltas) into torch tensors, holds one adapter's updates,
and writes the format (for tests and the trainer). Nothing is loaded unless every check passes; pickle
files are refused outright.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapters_store import compeft
from adapters_store.errors import StoreError
from adapters_store.s2ft_format import CONFIG_FILE, FORMAT, INDEX_FILE, MODULES, VERSION, WEIGHTS_FILE, read_arrays
from adapters_store.s2ft_format import parse_config as parse_config_bytes
from adapters_store.s2ft_format import parse_s2ft as check_s2ft
from adapters_store.validation import PICKLE_SUFFIXES
from workers.errors import AdapterValidationError
from workers.model.config import DecoderConfig

__all__ = ["CONFIG_FILE", "INDEX_FILE", "MODULES", "WEIGHTS_FILE", "S2FTSource", "S2FTUpdate", "S2FTWeights",
           "is_s2ft_folder", "read_s2ft", "write_s2ft"]
_STORED_FILES = (CONFIG_FILE, WEIGHTS_FILE, compeft.FILENAME, INDEX_FILE)


@dataclass(frozen=True)
class S2FTUpdate:
    """One (layer, module) update of the base weight W [out, in]."""

    kind: str  # "col": W[:, index] += delta; "row": W[index, :] += delta
    index: torch.Tensor  # [k] int64: columns (col) or rows (row) of W, heads expanded to head_dim each
    delta: torch.Tensor  # col: [out, k]; row: [k, in]


@dataclass(frozen=True)
class S2FTWeights:
    """One adapter: per (layer, module) its update."""

    kind = "s2ft"  # held by the S²FT kind's device (workers.adapters.s2ft_kind)
    modules: dict[tuple[int, str], S2FTUpdate]

    @property
    def parts(self) -> tuple[S2FTWeights]:
        return (self,)

    @property
    def targets(self) -> set[str]:
        return {m for _, m in self.modules}

    @property
    def num_params(self) -> int:
        return sum(u.delta.numel() for u in self.modules.values())

    @property
    def nbytes(self) -> int:
        return sum(u.index.nbytes + u.delta.nbytes for u in self.modules.values())


def is_s2ft_folder(folder: str | Path) -> bool:
    return (Path(folder) / CONFIG_FILE).is_file()


def parse_files(files: Mapping[str, bytes], base: DecoderConfig) -> S2FTWeights:
    """The stored files (config + weights) → checked torch updates; any problem → AdapterValidationError."""
    if CONFIG_FILE not in files:
        raise AdapterValidationError(f"no {CONFIG_FILE}")
    try:
        updates = check_s2ft(parse_config_bytes(files[CONFIG_FILE]), read_arrays(files), base)
    except StoreError as e:
        raise AdapterValidationError(e.message) from e
    return S2FTWeights({key: S2FTUpdate(u.kind, torch.from_numpy(u.index), torch.from_numpy(u.delta))
                        for key, u in updates.items()})


# reading and writing -------------------------------------------------------------------------------
@dataclass(frozen=True)
class S2FTSource:
    """A validated S²FT adapter as the host cache keeps it: its files as stored (deltas stay
    ComPEFT-compressed if they were), decoded into tensors only when it moves to the device."""

    files: Mapping[str, bytes]
    targets: frozenset[str]
    num_params: int
    kind = "s2ft"
    fusable = True

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.files.values())

    def decode(self, base: DecoderConfig) -> S2FTWeights:
        return parse_files(self.files, base)


def read_s2ft(folder: str | Path, base: DecoderConfig) -> tuple[S2FTSource, S2FTWeights]:
    """Reads and fully validates an S²FT folder; returns the bytes to keep and the decoded weights."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterValidationError(f"adapter folder {str(folder)!r} does not exist")
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise AdapterValidationError(f"pickle files are refused ({', '.join(pickles)}); use safetensors")
    if not (folder / CONFIG_FILE).is_file():
        raise AdapterValidationError(f"{folder.name}: no {CONFIG_FILE}")
    files = {name: (folder / name).read_bytes() for name in _STORED_FILES if (folder / name).is_file()}
    weights = parse_files(files, base)
    return S2FTSource(files, frozenset(weights.targets), weights.num_params), weights


def write_s2ft(folder: str | Path, updates: Mapping[tuple[int, str], tuple[Sequence[int] | torch.Tensor, torch.Tensor]],
               base_model_name_or_path: str = "", metadata: dict | None = None) -> Path:
    """Writes version-1 files. updates: (layer, module) → (unit indices — heads for o_proj/v_proj,
    channels for down_proj/up_proj — and the delta, shaped as `adapters_store.s2ft_format` documents).
    Not checked against a base: read it back with `read_s2ft` for that."""
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
