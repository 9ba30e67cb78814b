"""ComPEFT adapters on the worker: a LoRA whose A and B were sparsified and ternarised
(`adapters_store.compeft`, format and math documented there). The host cache keeps the compressed bytes;
they are decoded into a normal LoRA only when the adapter moves into device rows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from adapters_store import compeft
from adapters_store.errors import InvalidAdapterError
from workers.adapters.kind import AdapterKind, ReadContext
from workers.adapters.lora import LoRAWeights, parse_lora, read_config
from workers.adapters.lora_kind import check_lora_targets
from workers.errors import AdapterValidationError
from workers.model.config import DecoderConfig


@dataclass(frozen=True)
class CompeftSource:
    config: dict
    data: bytes  # adapter_model.compeft, as stored
    rank: int
    targets: frozenset[str]
    kind = "compeft"  # decodes to a LoRA
    fusable = True

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def decode(self, base: DecoderConfig) -> LoRAWeights:
        return parse_lora(self.config, decode_tensors(self.data), base, self.rank)


def decode_tensors(data: bytes) -> dict[str, torch.Tensor]:
    try:
        dense = compeft.decode(data).to_dense()
    except InvalidAdapterError as e:
        raise AdapterValidationError(f"{compeft.FILENAME}: {e}") from e
    return {name: torch.from_numpy(array) for name, array in dense.items()}


def is_compeft_folder(folder: Path) -> bool:
    return (folder / compeft.FILENAME).is_file()


def read_compeft(folder: Path, base: DecoderConfig, max_rank: int) -> tuple[CompeftSource, LoRAWeights]:
    """Reads and validates (decoding once); returns the compressed bytes to keep and the decoded weights."""
    config, data = read_config(folder), (folder / compeft.FILENAME).read_bytes()
    weights = parse_lora(config, decode_tensors(data), base, max_rank)
    return CompeftSource(config, data, weights.rank, frozenset(weights.targets)), weights


class CompeftKind(AdapterKind):
    """A ComPEFT-compressed LoRA: read and kept compressed, decoded into a LoRA part (the LoRA kind's device)."""

    name = "compeft"

    def matches(self, folder: Path) -> bool:
        return is_compeft_folder(folder)

    def read(self, folder: Path, ctx: ReadContext) -> tuple[CompeftSource, LoRAWeights]:
        source, weights = read_compeft(folder, ctx.base, ctx.max_rank)
        check_lora_targets(source.targets, ctx)
        return source, weights


COMPEFT = CompeftKind()
