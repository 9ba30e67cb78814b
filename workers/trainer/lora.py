"""LoRA fine-tuning through peft: `get_peft_model` wraps the `targets` linears of the HF model
(`y = W x + (alpha / r) · B (A x)`, A [r, in] Kaiming-uniform, B [out, r] zeros; only A and B train), and
`save_pretrained` writes the PEFT folder (adapter_config.json + adapter_model.safetensors, keys
`base_model.model.model.layers.{L}.{self_attn|mlp}.{module}.lora_{A|B}.weight`) that workers/adapters/lora.py
serves."""

from __future__ import annotations

from pathlib import Path

from workers.trainer.method_contract import MethodSetup, TrainingSpec
from workers.trainer.sft import load_base, sft_setup

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what save_pretrained writes that we keep


def load_into(model, folder: str | Path):
    """Applies a saved PEFT LoRA folder to the HF model, frozen (e.g. to distil an adapter's continuations);
    the model's target linears are wrapped in place. Returns the peft wrapper."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(folder), is_trainable=False)


def save(peft_model, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(folder), safe_serialization=True)
    for extra in folder.iterdir():  # peft adds a model card; the store takes the adapter's files only
        if extra.name not in PEFT_FILES and extra.is_file():
            extra.unlink()
    return folder


def setup(spec: TrainingSpec) -> MethodSetup:
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load_base(spec.base_model_path)
    m = spec.method
    config = LoraConfig(r=m["rank"], lora_alpha=m["alpha"], target_modules=list(m["targets"]), lora_dropout=0.0,
                        bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    params = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    return sft_setup(spec, peft_model, tokenizer, "lora", params, save=lambda folder: save(peft_model, folder))
