"""The synchronous engine: requests in, one step at a time, token events out.

`step()` = schedule → forward → sample → append tokens and check stops → free finished sequences.
The async `Engine` drives it from a thread; tests and benchmarks may drive it directly.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path

import torch

from workers.adapters.compeft import is_compeft_folder, read_compeft
from workers.adapters.fusion import FusionController
from workers.adapters.lora import LoRAWeights, read_lora
from workers.adapters.manager import AdapterManager, AdapterSource
from workers.adapters.s2ft import S2FTWeights, is_s2ft_folder, read_s2ft
from workers.engine.config import EngineConfig
from workers.engine.detokenizer import IncrementalText
from workers.engine.runner import ModelRunner
from workers.engine.sampler import sample
from workers.engine.scheduler import Scheduler, StepPlan
from workers.engine.sequence import Sequence
from workers.engine.types import GenerationRequest, TokenEvent
from workers.errors import AdapterValidationError, InvalidRequestError, PromptTooLongError


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class EngineCore:
    def __init__(self, cfg: EngineConfig, tokenizer=None):
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.cfg = cfg
        self.runner = ModelRunner(cfg)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model_path)
        self.model_id = cfg.model_id or Path(cfg.model_path).name
        self.adapters = AdapterManager(self.runner.config, self.runner.bank, self.runner.s2ft, cfg.max_loras,
                                       cfg.host_cache_bytes)
        self.scheduler = Scheduler(cfg, self.runner.kv, self.adapters)
        self.fusion = FusionController(self.runner.model, self.adapters, cfg.fusion, lambda: self.scheduler.running)
        self.eos_ids = frozenset(self.runner.config.eos_token_ids) | frozenset(
            [self.tokenizer.eos_token_id] if getattr(self.tokenizer, "eos_token_id", None) is not None else [])
        self.lock = threading.RLock()  # guards adapters + scheduler against the service's threads
        self.by_id: dict[str, Sequence] = {}

    def read_adapter(self, folder: str | Path) -> tuple[AdapterSource, LoRAWeights | S2FTWeights]:
        """Reads and validates an adapter folder (PEFT LoRA, ComPEFT-compressed LoRA, or S²FT) against the
        base (thread-safe; touches no state). Returns what the host cache keeps and the decoded weights."""
        folder = Path(folder)
        if folder.is_dir() and is_s2ft_folder(folder):
            return read_s2ft(folder, self.runner.config)
        read = read_compeft if folder.is_dir() and is_compeft_folder(folder) else read_lora
        source, weights = read(folder, self.runner.config, self.cfg.max_rank)
        missing = source.targets - set(self.cfg.lora_targets)
        if missing:
            raise AdapterValidationError(f"target modules {sorted(missing)} are not enabled on this worker")
        return source, weights

    def load_adapter(self, name: str, folder: str | Path) -> AdapterSource:
        """Registers in the host cache; the decoded weights are staged, since a request usually follows."""
        source, weights = self.read_adapter(folder)
        with self.lock:
            self.adapters.register(name, source)
            self.adapters.stage(name, weights)
        return source

    def stage_adapter(self, name: str) -> None:
        """Decodes an adapter that is not on device yet, so admission only copies it (off the loop)."""
        with self.lock:
            source = self.adapters.needs_decode(name)
        if source is not None:
            weights = source.decode(self.runner.config)
            with self.lock:
                self.adapters.stage(name, weights)

    @property
    def max_seq(self) -> int:
        return self.runner.max_seq

    def validate(self, request: GenerationRequest) -> None:
        """Raises the error a request would meet, before anything about it is stored."""
        p = request.params
        if not request.prompt_ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if p.max_tokens < 1:
            raise InvalidRequestError("max_tokens must be at least 1", param="max_tokens")
        if p.temperature < 0 or not 0 < p.top_p <= 1 or p.top_k < 0:
            raise InvalidRequestError("temperature ≥ 0, 0 < top_p ≤ 1 and top_k ≥ 0 are required")
        vocab = self.runner.config.vocab_size
        if any(t < 0 or t >= vocab for t in request.prompt_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        total = len(request.prompt_ids) + p.max_tokens
        if total > self.max_seq:
            raise PromptTooLongError(
                f"this model's maximum context length is {self.max_seq} tokens; the request needs "
                f"{len(request.prompt_ids)} prompt + {p.max_tokens} completion tokens", param="max_tokens")
        if request.adapter is not None:
            self.adapters.require(request.adapter)

    def add_request(self, request: GenerationRequest) -> Sequence:
        with self.lock:
            self.validate(request)
            p = request.params
            generator = None
            if p.temperature > 0:
                generator = torch.Generator().manual_seed(p.seed if p.seed is not None else random.getrandbits(63))
            stop_ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.eos_ids)
            seq = Sequence(request, IncrementalText(self.tokenizer, p.stop), generator, stop_ids)
            self.scheduler.add(seq)
            if request.request_id:
                self.by_id[request.request_id] = seq
            return seq

    def abort(self, request_id: str) -> None:
        with self.lock:
            seq = self.by_id.pop(request_id, None)
            if seq is not None:
                seq.finish_reason = "cancelled"
                self.scheduler.finish(seq)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[tuple[Sequence, TokenEvent]]:
        with self.lock:
            self.fusion.update()  # between steps: fuse a dominant adapter, or unfuse
            plan = self.scheduler.schedule()
        if plan.empty:
            return []
        logits = self._forward(plan)
        sampled = plan.decode + [seq for seq, n in plan.prefill if seq.num_cached + n == len(seq.prompt)]
        for seq, n in plan.prefill:
            seq.num_cached += n
        for seq in plan.decode:
            seq.num_cached += 1
        tokens, logprobs = sample(logits, sampled)
        events = [(seq, self._append(seq, tok, lp)) for seq, tok, lp in zip(sampled, tokens, logprobs, strict=True)]
        with self.lock:
            for seq, event in events:
                if event.finish_reason is not None:
                    self.scheduler.finish(seq)
                    self.by_id.pop(seq.request.request_id, None)
        return events

    def _forward(self, plan: StepPlan) -> torch.Tensor:
        decode = [(s.kv_slot, s.num_cached, s.last_token, s.placement) for s in plan.decode]
        prefill = [(s.kv_slot, s.num_cached, list(s.prompt[s.num_cached:s.num_cached + n]),
                    s.num_cached + n == len(s.prompt), s.placement) for s, n in plan.prefill]
        return self.runner.forward(decode, prefill)

    def _append(self, seq: Sequence, token: int, logprob: float | None) -> TokenEvent:
        seq.output.append(token)
        p = seq.request.params
        if token in seq.stop_ids:
            seq.finish_reason = "stop"
        elif seq.text.add(token):
            seq.finish_reason = "stop"
        elif len(seq.output) >= p.max_tokens or len(seq.prompt) + len(seq.output) >= self.max_seq:
            seq.finish_reason = "length"
        text = seq.text.release(final=seq.finish_reason is not None)
        return TokenEvent(token_id=token, text=text, logprob=logprob, index=len(seq.output) - 1,
                          prompt_tokens=len(seq.prompt), finish_reason=seq.finish_reason)

    def generate(self, requests: list[GenerationRequest]) -> list[list[TokenEvent]]:
        """Runs requests to completion together (for tests and benchmarks)."""
        seqs = [self.add_request(r) for r in requests]
        out: dict[int, list[TokenEvent]] = {id(s): [] for s in seqs}
        while self.has_work():
            for seq, event in self.step():
                out[id(seq)].append(event)
        return [out[id(s)] for s in seqs]
