"""A fake engine with the real engine's interface (for unit tests of the worker service and gateway)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from workers.engine.types import GenerationRequest, TokenEvent
from workers.errors import AdapterNotFoundError, AdapterValidationError, PromptTooLongError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "store"))
from store_fixtures import BASE_CONFIG as FAKE_BASE_CONFIG  # noqa: E402
from store_fixtures import lora_folder  # noqa: E402


class FakeTokenizer:
    """One token per character (ids = code points below 256)."""

    chat_template = "fake"
    eos_token_id = 0

    def __len__(self) -> int:
        return 256

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) % 256 for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


class FakeEngine:
    """Generates the letters of `WORD` in a loop (one token each), `max_tokens` of them; a stop string
    ends the output before it, like the real engine."""

    WORD = "abcdefgh"

    def __init__(self, model_id: str = "fake-model", max_batch: int = 4, max_seq: int = 64, delay_s: float = 0.0):
        self.tokenizer = FakeTokenizer()
        self.model_id = model_id
        self.max_batch = max_batch
        self.max_seq = max_seq
        self.delay_s = delay_s
        self.running = 0
        self.resident: list[str] = []
        self.loads: list[str] = []
        self.requests: list[GenerationRequest] = []

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    async def generate(self, req: GenerationRequest):
        if len(req.prompt_ids) + req.params.max_tokens > self.max_seq:
            raise PromptTooLongError(f"prompt + max_tokens over {self.max_seq}", param="prompt")
        if req.adapter is not None and req.adapter not in self.resident:
            raise AdapterNotFoundError(f"adapter {req.adapter!r} is not loaded")
        self.requests.append(req)
        self.running += 1
        try:
            text = ""
            n = req.params.max_tokens
            for i in range(n):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                else:
                    await asyncio.sleep(0)
                ch = self.WORD[i % len(self.WORD)]
                text += ch
                stop = next((s for s in req.params.stop if text.endswith(s)), None)
                last = i == n - 1 or stop is not None
                reason = ("stop" if stop else "length") if last else None
                out = "" if stop else ch
                lp = -0.5 if req.params.logprobs else None
                yield TokenEvent(ord(ch), out, lp, i, len(req.prompt_ids), reason)
                if last:
                    return
        finally:
            self.running -= 1

    async def load_adapter(self, name: str, path: str) -> None:
        await asyncio.sleep(0)
        if not (Path(path) / "adapter_config.json").is_file():
            raise AdapterValidationError(f"{path} is not a PEFT adapter folder")
        self.loads.append(name)
        if name not in self.resident:
            self.resident.append(name)

    def on_adapter_evicted(self, callback) -> None:
        self.evicted_callback = callback

    def unload_adapter(self, name: str) -> None:
        if name not in self.resident:
            raise AdapterNotFoundError(name)
        self.resident.remove(name)

    def resident_adapters(self) -> list[str]:
        return list(self.resident)

    def stats(self) -> dict:
        return {"running": self.running, "waiting": 0, "max_batch": self.max_batch}


def make_adapter_dir(root: Path, name: str, version: str | None = None, seed: int = 0) -> Path:
    """A drop-in LoRA folder for `FAKE_BASE_CONFIG` (the gateway imports it into the store when it is used)."""
    folder = root / "adapters" / name / (version or "")
    folder.mkdir(parents=True, exist_ok=True)
    for filename, data in lora_folder(seed=seed).items():
        (folder / filename).write_bytes(data)
    return folder


def make_base_dir(root: Path) -> Path:
    """A base model folder holding only `FAKE_BASE_CONFIG`'s config.json (what the gateway checks adapters on)."""
    folder = root / "fake-base"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(FAKE_BASE_CONFIG))
    return folder
