"""Loads a Hugging Face folder (config.json + *.safetensors, sharded or not) into a Decoder."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from workers.errors import UnsupportedModelError
from workers.model.attention_kernels import AttentionKernels
from workers.model.config import DecoderConfig
from workers.model.decoder import Attention, Decoder, Linear, QuantizedLinear, RMSNorm
from workers.model.kernel_choice import KernelTable
from workers.model.layer_kernels import LayerKernels
from workers.model.linear_kernels import CANDIDATES as DENSE_KERNELS
from workers.model.linear_kernels import RowKernels, linear_kernels, weight_elements
from workers.model.precision import resolve_dtype
from workers.model.quantized import MODES as QUANTIZE_MODES
from workers.model.quantized import quantize_decoder, quantized_kernels

log = logging.getLogger(__name__)
KERNEL_OVERRIDE_ENV = "ADAPTERD_LINEAR_KERNEL"


@dataclass(frozen=True)
class ModelSpec:
    path: str
    device: str = "cpu"
    dtype: str | None = None  # "auto" | "float32" | "bfloat16" | "float16"; None → bf16 on CUDA, fp32 on CPU
    quantize: str | None = None  # None | "int8" (weight-only, per channel) | "w8a8" (+ int8 tokens) | "int4" | "fp16"
    linear_kernel: str | None = None  # force one kernel candidate; None → $ADAPTERD_LINEAR_KERNEL or measured


def checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
            raise UnsupportedModelError(f"{folder} holds only pickle checkpoints; convert them to safetensors")
        raise UnsupportedModelError(f"no *.safetensors in {folder}")
    return files


def linear_shapes(model: Decoder) -> Counter:
    """(out, in) → how many of the model's linears have that weight shape."""
    return Counter(tuple(m.weight.shape) for m in model.modules() if isinstance(m, Linear))


def load_decoder(spec: ModelSpec) -> Decoder:
    folder = Path(spec.path)
    cfg = DecoderConfig.from_folder(folder)
    device = torch.device(spec.device)
    if spec.quantize not in (None, *QUANTIZE_MODES):
        raise UnsupportedModelError(f"unsupported quantize {spec.quantize!r}; supported: {', '.join(QUANTIZE_MODES)}")
    override = spec.linear_kernel or os.environ.get(KERNEL_OVERRIDE_ENV) or None
    candidates = [*DENSE_KERNELS, *(QUANTIZE_MODES[spec.quantize].candidates if spec.quantize else ())]
    if override is not None and override not in candidates:
        raise UnsupportedModelError(f"unknown kernel {override!r}; candidates: {', '.join(candidates)}")
    with torch.device("meta"):
        model = Decoder(cfg)
    table = KernelTable.for_machine(device)
    shapes = linear_shapes(model)
    if spec.quantize and QUANTIZE_MODES[spec.quantize].fp32_tokens:
        if spec.dtype not in (None, "auto", "float32"):
            raise UnsupportedModelError(f"--quantize {spec.quantize} computes in float32; --dtype {spec.dtype} "
                                        "would round its weights to that dtype first")
        dtype = torch.float32
    else:
        dtype = resolve_dtype(spec.dtype, device, shapes, table)
    expected = dict(model.named_parameters())
    state: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(folder):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name in expected:
                    state[name] = f.get_tensor(name).to(device=device, dtype=dtype)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing = [n for n in expected if n not in state and not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    if missing:
        raise UnsupportedModelError(f"checkpoint in {folder} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise UnsupportedModelError(f"{name}: checkpoint shape {tuple(tensor.shape)}, "
                                        f"config expects {tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model = model.eval().requires_grad_(False)
    attach_kernels(model, spec.quantize, override, table, shapes, dtype, device)
    return model


def attach_kernels(model: Decoder, quantize: str | None, override: str | None, table: KernelTable,
                   shapes: Counter, dtype: torch.dtype, device: torch.device) -> None:
    """Quantizes the linears (if asked), gives every linear its measured kernels and measures them all now.
    A linear the mode keeps dense (int4's lm_head) runs the dense kernels; `override` forces the kernels it is a
    candidate of (a dense name the dense linears, a mode's name its quantized ones) and leaves the others measured.
    Decode attention gets its measured kernels too (measured at first use: they depend on the cached length), and so
    do the norms and RoPE (workers.model.layer_kernels; measured at first use of each row bucket)."""
    attention, layer_ops = AttentionKernels(table), LayerKernels(table)
    for module in model.modules():
        if isinstance(module, Attention):
            module.kernels, module.layer_kernels = attention, layer_ops
        elif isinstance(module, RMSNorm):
            module.kernels = layer_ops
    working_set = weight_elements(shapes)
    kinds: list[tuple[RowKernels, str | None, set]] = []  # (kernels, forced candidate, (out, in) shapes served)
    if quantize is not None:
        forced = override if override in QUANTIZE_MODES[quantize].candidates else None
        kernels = quantized_kernels(table, forced, working_set=working_set, mode=quantize)
        quantize_decoder(model, kernels)
        served = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, QuantizedLinear)}
        kinds.append((kernels, forced, served))
    dense = [m for m in model.modules() if isinstance(m, Linear)]  # every linear, or those a mode keeps dense
    if dense:
        forced = override if override in DENSE_KERNELS else None
        kernels = linear_kernels(table, forced, working_set=working_set)
        for module in dense:
            module.kernels = kernels
        kinds.append((kernels, forced, {tuple(m.weight.shape) for m in dense}))
    for kernels, forced, served in kinds:
        if forced is not None:
            log.info("kernels for %s forced to %s", kernels.op, forced)
            continue
        spent = table.measure_s
        kernels.prepare(served, dtype, device)
        log.info("kernels for %s (%s measured in %.2f s this start; table %s):\n%s", kernels.op,
                 str(dtype).removeprefix("torch."), table.measure_s - spent, table.path, table.format(kernels.op))
