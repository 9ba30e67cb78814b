"""The adapter kinds the store accepts, and which module checks an upload of each. An upload says what it
is by its files (each kind has its own config file); a `kind` given with it must agree."""

from __future__ import annotations

from adapters_store import medusa_validation, s2ft_format
from adapters_store.base_model import BaseModelSpec
from adapters_store.errors import InvalidAdapterError
from adapters_store.mapped_files import Buffer
from adapters_store.validation import UploadLimits, ValidatedAdapter, validate_lora

LORA_KINDS = ("lora", "compeft")  # a PEFT LoRA folder; "compeft": its weights ComPEFT-compressed
KINDS = (*LORA_KINDS, "s2ft", "medusa")


def detect_kind(files: dict[str, Buffer]) -> str:
    """"s2ft" for an S²FT folder, "medusa" for Medusa heads, else "lora" (the LoRA validator tells lora
    from compeft)."""
    if s2ft_format.CONFIG_FILE in files:
        return "s2ft"
    return "medusa" if medusa_validation.is_medusa_upload(files) else "lora"


def validate_upload(files: dict[str, Buffer], base: BaseModelSpec, limits: UploadLimits,
                    kind: str | None = None) -> ValidatedAdapter:
    if kind is not None and kind not in KINDS:
        raise InvalidAdapterError(f"kind {kind!r} is not one of {', '.join(KINDS)}", param="kind")
    found = detect_kind(files)
    if kind is not None and kind != found and not (kind in LORA_KINDS and found in LORA_KINDS):
        raise InvalidAdapterError(f"kind {kind!r} but the files are a {found} adapter", param="kind")
    if found == "s2ft":
        return s2ft_format.validate_upload(files, base)
    if found == "medusa":
        return medusa_validation.validate_upload(files, base)
    return validate_lora(files, base, limits, kind)
