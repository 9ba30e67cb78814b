"""Combined adapters: a LoRA part and an S²FT part served together (what a per-request merge of LoRA and
S²FT adapters gives, see `adapters_store.merge`). On disk, a folder with `lora/` (a PEFT LoRA folder) and
`s2ft/` (an S²FT folder); each part is read and validated by its own kind. A row of a combined adapter
adds both: its LoRA rows and its S²FT id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from workers.adapters.kind import AdapterKind, ReadContext
from workers.adapters.lora import LoRASource, LoRAWeights, read_lora
from workers.adapters.lora_kind import check_lora_targets
from workers.adapters.s2ft import S2FTSource, S2FTWeights, read_s2ft
from workers.model.config import DecoderConfig

LORA_PART, S2FT_PART = "lora", "s2ft"


@dataclass(frozen=True)
class CombinedWeights:
    lora: LoRAWeights
    s2ft: S2FTWeights

    @property
    def parts(self) -> tuple[LoRAWeights, S2FTWeights]:
        return self.lora, self.s2ft

    @property
    def nbytes(self) -> int:
        return self.lora.nbytes + self.s2ft.nbytes


@dataclass(frozen=True)
class CombinedSource:
    lora: LoRASource
    s2ft: S2FTSource
    kind = "combined"
    fusable = False  # a per-request merge: short-lived, not worth fusing

    @property
    def rank(self) -> int:
        return self.lora.rank

    @property
    def targets(self) -> frozenset[str]:
        return self.lora.targets | self.s2ft.targets

    @property
    def nbytes(self) -> int:
        return self.lora.nbytes + self.s2ft.nbytes

    def decode(self, base: DecoderConfig) -> CombinedWeights:
        return CombinedWeights(self.lora.decode(base), self.s2ft.decode(base))


def is_combined_folder(folder: str | Path) -> bool:
    return (Path(folder) / LORA_PART).is_dir() and (Path(folder) / S2FT_PART).is_dir()


def read_combined(folder: str | Path, base: DecoderConfig, max_rank: int) -> tuple[CombinedSource, CombinedWeights]:
    lora_source, lora = read_lora(Path(folder) / LORA_PART, base, max_rank)
    s2ft_source, s2ft = read_s2ft(Path(folder) / S2FT_PART, base)
    return CombinedSource(lora_source, s2ft_source), CombinedWeights(lora, s2ft)


class CombinedKind(AdapterKind):
    """Decodes into a LoRA part and an S²FT part, each held by its own kind's device."""

    name = "combined"

    def matches(self, folder: Path) -> bool:
        return is_combined_folder(folder)

    def read(self, folder: Path, ctx: ReadContext) -> tuple[CombinedSource, CombinedWeights]:
        source, weights = read_combined(folder, ctx.base, ctx.max_rank)
        check_lora_targets(source.lora.targets, ctx)
        return source, weights


COMBINED = CombinedKind()
