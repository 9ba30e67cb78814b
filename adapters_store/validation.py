"""Everything an upload must pass before a byte of it is stored. Torch-free.

1. `collect_files`: the uploaded parts (the files of a PEFT folder, or one .zip / .tar.gz of one, or one
   .safetensors + its config JSON) → the adapter folder's files by name; pickles refused, sizes capped,
   archives unpacked safely (see `adapters_store.archives`).
2. `validate_lora`: the config JSON (a LoRA PEFT config, no options the engine lacks) and the weights
   (safetensors or ComPEFT) against the base: tensor names, layers, targets, shapes `[r, in]` / `[out, r]`,
   floating dtypes, finite values, the rank cap. Other kinds have their own module;
   `adapters_store.kinds.validate_upload` picks one.
Each failure is a typed `StoreError` whose message names the problem.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import PurePosixPath

import numpy as np

from adapters_store import bounded_json, compeft, safetensors_file
from adapters_store.adapter_kind import StoreKind
from adapters_store.archives import ArchiveLimits, checked_member_name, is_archive, unpack
from adapters_store.base_model import TARGETS, BaseModelSpec
from adapters_store.errors import AdapterTooLargeError, IncompatibleAdapterError, InvalidAdapterError
from adapters_store.mapped_files import Buffer

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
# a PEFT LoRA tensor name: ...layers.{L}.{self_attn|mlp}.{target}.lora_{A|B}[.{adapter}].weight (the engine's too)
LORA_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")
_UNSUPPORTED_OPTIONS = {"use_dora": True, "fan_in_fan_out": True, "lora_bias": True}
_UNSUPPORTED_LISTS = ("alpha_pattern", "trainable_token_indices", "target_parameters", "modules_to_save")


@dataclass(frozen=True)
class UploadLimits:
    max_rank: int = 256
    max_file_bytes: int = 512 * 1024 * 1024
    max_total_bytes: int = 1024 * 1024 * 1024
    archive: ArchiveLimits = field(default_factory=ArchiveLimits)


@dataclass(frozen=True)
class UploadedFile:
    filename: str
    data: Buffer  # bytes, or the spooled upload mapped from disk (`adapters_store.mapped_files`)


@dataclass(frozen=True)
class ValidatedAdapter:
    """A checked adapter of any kind, ready to store: its files and what the manifest records."""

    kind: str  # "lora" | "compeft" (a ComPEFT-compressed LoRA) | "s2ft"
    files: dict[str, Buffer]  # the folder's files to store, as uploaded
    weights_name: str  # which of them holds the weights
    rank: int  # LoRA rank (0 for kinds without one)
    alpha: float
    use_rslora: bool
    targets: tuple[str, ...]  # the base modules it changes
    layers: int  # how many base layers the adapter touches
    dense_bytes: int  # size of its float tensors as float32
    # (density, alpha) → the files to store instead, ComPEFT-compressed; None when it cannot be (again)
    compress: Callable[[float, float], dict[str, bytes]] | None = None

    @property
    def original_bytes(self) -> int:
        return len(self.files[self.weights_name])


# ---- 1. the uploaded parts → the folder's files ---------------------------------------------------


def collect_files(uploads: list[UploadedFile], limits: UploadLimits) -> dict[str, Buffer]:
    if not uploads:
        raise InvalidAdapterError("no files uploaded", param="files")
    _check_sizes([(u.filename, len(u.data)) for u in uploads], limits)
    archives = [u for u in uploads if is_archive(u.filename, u.data)]
    if archives and len(uploads) > 1:
        raise InvalidAdapterError("send one archive alone, or the folder's files without an archive", param="files")
    if archives:
        entries = unpack(archives[0].filename, archives[0].data, limits.archive)
        _check_sizes([(n, len(b)) for n, b in entries.items()], limits)
    else:
        entries = {checked_member_name(u.filename): u.data for u in uploads}
    return _flatten(entries)


def _check_sizes(sizes: list[tuple[str, int]], limits: UploadLimits) -> None:
    for name, size in sizes:
        if size > limits.max_file_bytes:
            raise AdapterTooLargeError(f"{name} is {size} bytes, over the {limits.max_file_bytes}-byte file limit")
    total = sum(size for _, size in sizes)
    if total > limits.max_total_bytes:
        raise AdapterTooLargeError(f"the upload is {total} bytes, over the {limits.max_total_bytes}-byte limit")


def _flatten(entries: dict[str, Buffer]) -> dict[str, Buffer]:
    """Relative paths → base names (a zipped folder has one directory level); pickles refused."""
    files: dict[str, Buffer] = {}
    for path, data in entries.items():
        name = PurePosixPath(path).name
        if name.lower().endswith(PICKLE_SUFFIXES):
            raise InvalidAdapterError(f"{name}: pickle files are refused; send safetensors", param="files")
        if name in files:
            raise InvalidAdapterError(f"two files named {name!r} in the upload", param="files")
        files[name] = data
    return files


# ---- 2. the folder's files → a validated adapter ---------------------------------------------------


def validate_lora(files: dict[str, Buffer], base: BaseModelSpec, limits: UploadLimits,
                  kind: str | None = None) -> ValidatedAdapter:
    """A PEFT LoRA folder, its weights as safetensors or ComPEFT (kind None, "lora" or "compeft")."""
    config_bytes = _pick_config(files)
    config = parse_config(config_bytes)
    weights_name, weights = _pick_weights(files, kind)
    shapes, modules = _check_weights(weights_name, weights, base, limits.max_rank)
    rank = max(r for r, _ in modules.values())
    packed = weights_name == compeft.FILENAME
    return ValidatedAdapter(
        kind="compeft" if packed else "lora",
        files={CONFIG_NAME: config_bytes, weights_name: weights},
        weights_name=weights_name,
        rank=rank,
        alpha=float(config.get("lora_alpha", config.get("r", rank))),
        use_rslora=bool(config.get("use_rslora", False)),
        targets=tuple(t for t in TARGETS if any(t == tt for _, tt in modules)),
        layers=len({layer for layer, _ in modules}),
        dense_bytes=4 * sum(math.prod(s) for s, _ in shapes.values()),
        compress=None if packed else partial(_compress_lora, config_bytes, weights),
    )


def _compress_lora(config_bytes: Buffer, weights: Buffer, density: float, alpha: float) -> dict[str, Buffer]:
    packed = compeft.compress(safetensors_file.read_tensors(weights), density, alpha)
    return {CONFIG_NAME: config_bytes, compeft.FILENAME: packed.encode()}


def _pick_config(files: dict[str, Buffer]) -> Buffer:
    if CONFIG_NAME in files:
        return files[CONFIG_NAME]
    configs = [n for n in files if n.lower().endswith(".json")]
    if len(configs) != 1:
        raise InvalidAdapterError(f"the upload needs {CONFIG_NAME} (or exactly one config .json file)",
                                  param="files")
    return files[configs[0]]


def _pick_weights(files: dict[str, Buffer], kind: str | None) -> tuple[str, Buffer]:
    tensors = [n for n in files if n.endswith(".safetensors")]
    packed = [n for n in files if n.endswith(".compeft")]
    if len(tensors) + len(packed) != 1:
        raise InvalidAdapterError(
            "the upload needs exactly one weights file: adapter_model.safetensors or adapter_model.compeft",
            param="files")
    if packed:
        if kind == "lora":
            raise InvalidAdapterError("kind 'lora' but the weights are a .compeft file", param="kind")
        return compeft.FILENAME, files[packed[0]]
    if kind == "compeft":
        raise InvalidAdapterError("kind 'compeft' but the weights are a .safetensors file", param="kind")
    return SAFETENSORS_NAME, files[tensors[0]]


def parse_config(raw: Buffer) -> dict:
    try:
        cfg = bounded_json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidAdapterError(f"{CONFIG_NAME} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise InvalidAdapterError(f"{CONFIG_NAME} must be a JSON object")
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise InvalidAdapterError(f"{CONFIG_NAME}: peft_type {peft_type!r} is not a LoRA")
    for option, bad in _UNSUPPORTED_OPTIONS.items():
        if cfg.get(option) == bad:
            raise InvalidAdapterError(f"{CONFIG_NAME}: unsupported option {option}={bad}")
    if cfg.get("bias", "none") != "none":
        raise InvalidAdapterError(f"{CONFIG_NAME}: unsupported option bias != 'none'")
    for option in _UNSUPPORTED_LISTS:
        if cfg.get(option):
            raise InvalidAdapterError(f"{CONFIG_NAME}: unsupported option {option}")
    alpha = cfg.get("lora_alpha", 1)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise InvalidAdapterError(f"{CONFIG_NAME}: lora_alpha must be a finite number")
    return cfg


def _check_weights(weights_name: str, weights: Buffer, base: BaseModelSpec, max_rank: int
                   ) -> tuple[dict[str, tuple[tuple[int, ...], str]], dict[tuple[int, str], tuple[int, str]]]:
    """(name → (shape, dtype), the modules) of weights whose shapes fit the base and whose values are all
    finite; the values are read last, in bounded pieces (`safetensors_file.all_finite`)."""
    if weights_name == compeft.FILENAME:
        packed = compeft.decode(weights)
        shapes = {t.name: (t.shape, "F32") for t in packed.layout}
        modules = _lora_modules(shapes, base, max_rank)
        finite = bool(np.isfinite(packed.scales).all())
    else:
        header = safetensors_file.read_header(weights)
        for info in header.tensors.values():
            if info.dtype not in safetensors_file.FLOAT_DTYPES:
                raise IncompatibleAdapterError(f"{info.name}: dtype {info.dtype} is not floating point")
        shapes = {n: (i.shape, i.dtype) for n, i in header.tensors.items()}
        modules = _lora_modules(shapes, base, max_rank)
        finite = safetensors_file.all_finite(weights, header)
    if not finite:
        raise IncompatibleAdapterError("the adapter's tensors hold non-finite values (NaN or inf)")
    return shapes, modules


def _lora_modules(shapes: dict[str, tuple[tuple[int, ...], str]], base: BaseModelSpec, max_rank: int
                  ) -> dict[tuple[int, str], tuple[int, str]]:
    return check_lora_modules({n: shape for n, (shape, _) in shapes.items()}, base.target_shapes(),
                              base.num_layers, max_rank)


def check_lora_modules(shapes: Mapping[str, tuple[int, ...]], fits: Mapping[str, tuple[int, int]],
                       num_layers: int, max_rank: int) -> dict[tuple[int, str], tuple[int, str]]:
    """The one LoRA key/shape check (the store's uploads and the worker's folders): tensor name → shape in,
    (layer, target) → (rank, target) out for every complete A/B pair that fits the base, whose linears have
    `fits` (in, out) features and `num_layers` layers."""
    pairs: dict[tuple[int, str], dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        m = LORA_KEY.search(key)
        if m is None:
            raise IncompatibleAdapterError(f"unsupported tensor {key!r}: only lora_A/lora_B of {', '.join(TARGETS)}")
        layer, target, which = int(m.group(1)), m.group(2), m.group(3)
        if target not in fits:
            raise IncompatibleAdapterError(f"{key}: unsupported target module {target!r}")
        if layer >= num_layers:
            raise IncompatibleAdapterError(f"{key}: layer {layer} but the base has {num_layers} layers")
        pairs.setdefault((layer, target), {})[which] = tuple(shape)
    if not pairs:
        raise IncompatibleAdapterError("the adapter holds no LoRA tensors")
    modules = {}
    for (layer, target), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise IncompatibleAdapterError(f"layers.{layer}.{target}: lora_A and lora_B must both be present")
        a, b = ab["A"], ab["B"]
        fan_in, fan_out = fits[target]
        r = a[0] if len(a) == 2 else -1
        if a != (r, fan_in) or b != (fan_out, r):
            raise IncompatibleAdapterError(
                f"layers.{layer}.{target}: lora_A {list(a)} / lora_B {list(b)} do not fit the base "
                f"(expected [r, {fan_in}] and [{fan_out}, r]): an adapter for another base model?")
        if not 1 <= r <= max_rank:
            raise IncompatibleAdapterError(
                f"layers.{layer}.{target}: rank {r} is outside 1..{max_rank} (max_rank, the rank cap)")
        modules[(layer, target)] = (r, target)
    return modules


# a PEFT LoRA folder; "compeft": its weights ComPEFT-compressed. The fallback kind: files that say they are
# no other kind are checked as a LoRA (so that a bad upload meets the LoRA checks' messages).
STORE_KIND = StoreKind(names=("lora", "compeft"), matches=lambda files: True,
                       validate=lambda files, base, limits, kind: validate_lora(dict(files), base, limits, kind),
                       dense_files=lambda files: dense_lora_files(files), compressed_name="compeft")


def dense_lora_files(files: Mapping[str, bytes]) -> dict[str, bytes]:
    """A ComPEFT-compressed LoRA's stored files → a PEFT folder with dense float32 safetensors."""
    dense = safetensors_file.write_tensors(compeft.decode(files[compeft.FILENAME]).to_dense())
    return {CONFIG_NAME: files[CONFIG_NAME], SAFETENSORS_NAME: dense}
