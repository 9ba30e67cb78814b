"""Tiny random Hugging Face checkpoints built from configs at test time (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)

ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": True}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 8}),
}


def make_tiny_model(folder: Path, arch: str = "llama", seed: int = 0, **overrides) -> tuple[Path, torch.nn.Module]:
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    cfg = config_cls(**{**TINY, **extra, **overrides})
    model = model_cls(cfg).eval()
    with torch.no_grad():  # spread the logits so greedy argmax is far from ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(folder)
    return folder, model


def make_lora(base_folder: Path, out: Path, r: int = 4, seed: int = 0, targets=("q_proj", "v_proj"),
              use_rslora: bool = False, alpha: float | None = None) -> Path:
    """A PEFT LoRA saved by `peft` itself, with non-zero B so it changes the output."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_folder)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha if alpha is not None else 2 * r, target_modules=list(targets),
                     use_rslora=use_rslora, lora_dropout=0.0)
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(out)
    return out



def alphabet() -> list[str]:
    """256 distinct printable characters, one per token id: space, ASCII, Latin-1, then Greek and Cyrillic."""
    chars = [" "] + [chr(c) for c in range(33, 127)] + [chr(c) for c in range(161, 256) if c != 173]
    chars += [chr(c) for c in range(0x391, 0x3CA) if c != 0x3A2]
    chars += [chr(c) for c in range(0x410, 0x450)]
    return chars[:256]


def make_tokenizer(vocab_size: int = 256):
    """A character-level tokenizer built at test time (no downloads): id i < 256 is alphabet()[i] (whole
    characters: what incremental detokenizing and stop strings need), larger ids are "‹i›" (for bigger random
    models); no merges; eos is the tiny models' default id (2)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = alphabet()[:vocab_size] + [f"‹{i}›" for i in range(256, vocab_size)]
    assert len(set(chars)) == vocab_size
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(chars)}, merges=[]))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=chars[2])
