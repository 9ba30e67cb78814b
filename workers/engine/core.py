"""The synchronous engine: requests in, one step at a time, token events out.

`step()` = plan the rows (fusion, schedule, Medusa trees) → forward → sample plain rows and accept trees
(appending tokens checks stops) → free finished sequences.
The async `Engine` drives it from a thread; tests and benchmarks may drive it directly.
"""

from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from workers.adapters import kinds
from workers.adapters.fusion import FusionController
from workers.adapters.kind import DecodedAdapter, HostAdapter, ReadContext
from workers.adapters.medusa import MedusaWeights
from workers.adapters.medusa_kind import MEDUSA
from workers.adapters.residency import AdapterResidency
from workers.engine.config import EngineConfig
from workers.engine.detokenizer import IncrementalText
from workers.engine.logits_processors import decodes_plainly
from workers.engine.runner import DecodeRow, ModelRunner, PromptChunk
from workers.engine.sampler import choose
from workers.engine.scheduler import Scheduler
from workers.engine.sequence import Sequence
from workers.engine.speculative import Draft, Speculator, Verified
from workers.engine.structured import Grammars, advance
from workers.engine.types import GenerationRequest, TokenEvent
from workers.errors import (
    AdapterdError,
    AdapterNotFoundError,
    InvalidRequestError,
    PromptTooLongError,
    RequestFailedError,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowPlan:
    """One step's rows: plain decode rows, prompt chunks (sequence, tokens this step), Medusa trees."""

    plain: list[Sequence]
    prefill: list[tuple[Sequence, int]]
    drafts: list[Draft]


@dataclass(frozen=True)
class ForwardOutput:
    logits: torch.Tensor  # [rows, vocab]: plain decode rows, prompts that end, then every tree node
    hidden: torch.Tensor  # [rows, hidden]


@dataclass(frozen=True)
class SampleRows:
    """The rows that sample one token this step, with their logits [R, vocab] and hidden states [R, hidden]."""

    seqs: list[Sequence]
    logits: torch.Tensor
    hidden: torch.Tensor
    plain: int  # forward rows before the trees' nodes


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
        self.adapters = AdapterResidency(self.runner.config, self.runner.devices, cfg.host_cache_bytes)
        self.scheduler = Scheduler(cfg, self.runner.kv, self.adapters)
        self.fusion = FusionController(self.runner.model, self.adapters, cfg.fusion, lambda: self.scheduler.running)
        self.adapters.after_drop = self._detach_attached  # an adapter's heads leave with it (or its old version)
        self.speculator = Speculator(cfg.medusa_tree, cfg.medusa_max_batch, cfg.medusa_epsilon, cfg.medusa_delta,
                                     self.runner.devices[MEDUSA.name], self.runner.forward, cfg.medusa_policy)
        self.eos_ids = frozenset(self.runner.config.eos_token_ids) | frozenset(
            [self.tokenizer.eos_token_id] if getattr(self.tokenizer, "eos_token_id", None) is not None else [])
        self.grammars = Grammars(self.tokenizer, self.runner.config.vocab_size)
        self.lock = threading.RLock()  # guards adapters + scheduler against the service's threads
        self.step_lock = threading.Lock()  # held for a whole step: adapter (un)loads and fusion wait for it
        self.by_id: dict[str, list[Sequence]] = {}  # request id → its sequences (n completions)
        self.failures: list[tuple[Sequence, Exception]] = []  # see take_failures()

    def _read_context(self) -> ReadContext:
        return ReadContext(self.runner.config, self.cfg.max_rank, self.cfg.lora_targets)

    def read_adapter(self, folder: str | Path) -> tuple[HostAdapter, DecodedAdapter]:
        """Reads and validates an adapter folder of any registered standalone kind (`workers.adapters.kinds`:
        PEFT LoRA, ComPEFT-compressed LoRA, S²FT, a combined LoRA + S²FT merge) against the base (thread-safe;
        touches no state). Returns what the host cache keeps and the decoded weights."""
        folder = Path(folder)
        return kinds.for_folder(folder).read(folder, self._read_context())

    def load_adapter(self, name: str, folder: str | Path) -> HostAdapter:
        """Registers in the host cache; the decoded weights are staged, since a request usually follows.
        What the folder carries of attaching kinds (Medusa heads in `medusa/`) is attached to the adapter; what
        was attached to an adapter of that name before leaves with it (as when it is unloaded or evicted)."""
        source, weights = self.read_adapter(folder)
        attached = [(kind, self._read_attached(kind, sub)) for kind, sub in kinds.attached_in(Path(folder))]
        with self.step_lock, self.lock:  # between steps: replacing a fused adapter unfuses it
            self.adapters.register(name, source)
            self.adapters.stage(name, weights)
            for kind, part in attached:
                self.runner.devices[kind.name].attach(name, part)
        return source

    def _detach_attached(self, name: str) -> None:
        for kind in kinds.attaching():
            self.runner.devices[kind.name].detach(name)

    def _read_attached(self, kind, folder: Path):
        _, part = kind.read(folder, self._read_context())
        self.runner.devices[kind.name].check(part)  # e.g. Medusa heads must fill this worker's tree
        return part

    def read_medusa(self, folder: str | Path) -> MedusaWeights:
        """Reads Medusa heads and validates them against the base and this worker's tree (touches no state)."""
        return self._read_attached(MEDUSA, Path(folder))

    def load_medusa(self, folder: str | Path, attach_to: str | None = None) -> MedusaWeights:
        """Attaches heads to the base (attach_to None: the default heads of base-model requests) or to a
        loaded adapter (its requests use them); replaces heads already there."""
        heads = self.read_medusa(folder)
        with self.step_lock, self.lock:
            if attach_to is not None:
                self.adapters.require(attach_to)
            self.runner.devices[MEDUSA.name].attach(attach_to, heads)
        return heads

    def unload_medusa(self, attach_to: str | None = None) -> None:
        with self.step_lock, self.lock:
            if not self.runner.devices[MEDUSA.name].detach(attach_to):
                raise AdapterNotFoundError(
                    f"no Medusa heads are attached to {'the base' if attach_to is None else repr(attach_to)}")

    def unload_adapter(self, name: str) -> None:
        with self.step_lock, self.lock:  # between steps: dropping the fused adapter unfuses it
            self.adapters.unload(name)

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
        self._validate_sampling(p)
        if request.adapter is not None:
            self.adapters.require(request.adapter)

    def _validate_sampling(self, p) -> None:
        vocab = self.runner.config.vocab_size
        if not 0 <= p.top_logprobs <= 20:
            raise InvalidRequestError("top_logprobs must be in [0, 20]", param="top_logprobs")
        if not 1 <= p.n <= self.cfg.max_batch:
            raise InvalidRequestError(f"n must be in [1, {self.cfg.max_batch}] on this worker", param="n")
        if any(not 0 <= t < vocab for t, _ in p.logit_bias):
            raise InvalidRequestError(f"logit_bias token ids must be in [0, {vocab})", param="logit_bias")
        if any(not 0 <= t < vocab for t in p.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be in [0, {vocab})", param="stop_token_ids")
        if p.repetition_penalty <= 0:
            raise InvalidRequestError("repetition_penalty must be > 0", param="repetition_penalty")
        if not 0 <= p.min_p <= 1:
            raise InvalidRequestError("min_p must be in [0, 1]", param="min_p")
        if not 0 < p.typical_p <= 1:
            raise InvalidRequestError("typical_p must be in (0, 1]", param="typical_p")
        if p.json_schema is not None:
            self.grammars.check(p.json_schema)

    def _generator(self, p, choice: int) -> torch.Generator | None:
        if p.temperature <= 0:
            return None
        return torch.Generator().manual_seed(p.seed + choice if p.seed is not None else random.getrandbits(63))

    def add_request(self, request: GenerationRequest) -> Sequence:
        with self.lock:
            self.validate(request)
            p = request.params
            stop_ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.eos_ids)
            seq, *forks = [Sequence(request, IncrementalText(self.tokenizer, p.stop), self._generator(p, i),
                                    stop_ids, choice=i) for i in range(p.n)]
            seq.forks = forks
            if p.json_schema is not None:
                for s in (seq, *forks):
                    s.matcher = self.grammars.matcher(p.json_schema)
            self.scheduler.add(seq)
            if request.request_id:
                self.by_id[request.request_id] = [seq, *forks]
            return seq

    def abort(self, request_id: str) -> None:
        with self.lock:
            for seq in self.by_id.pop(request_id, []):
                if seq.finish_reason is None:
                    seq.finish_reason = "cancelled"
                self.scheduler.finish(seq)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[tuple[Sequence, TokenEvent]]:
        """One step under `step_lock` (adapter loads, unloads and fusion changes wait for its end): plan the
        rows, run the forward, sample the plain rows and accept the trees, finish what stopped. A failure tied
        to one request (its sampling, stop strings, Medusa tree, or its rows in the forward) fails that request
        alone: it is finished and listed by `take_failures()`, and the other rows go on."""
        with self.step_lock:
            plan = self._plan_step()
            if plan is None:
                return []
            out = self._run_forward(plan)
            if out is None:
                return []
            rows = self._rows_to_sample(plan, out)
            events = self._sample(rows.seqs, rows.logits, rows.hidden)
            events += self._accept(plan.drafts, out.logits[rows.plain:], out.hidden[rows.plain:])
            self._finish_stopped(events)
            return events

    def _plan_step(self) -> RowPlan | None:
        """Between steps: fusion; then the scheduler's rows, split into plain decode rows, prompt chunks and
        Medusa trees (None: nothing to run)."""
        with self.lock:
            self._update_fusion()  # between steps: fuse a dominant adapter, or unfuse
            plan = self.scheduler.schedule()
            plainly = [s for s in plan.decode if decodes_plainly(s.request.params)]
            spec, plain = self.speculator.split([s for s in plan.decode if s not in plainly], self.max_seq)
            plain += plainly  # rows with heads verify a tree, unless they need what verification lacks
        if plan.empty:
            return None
        drafts, plain = self._propose(spec, plain)
        return RowPlan(plain, plan.prefill, drafts)

    def _run_forward(self, plan: RowPlan) -> ForwardOutput | None:
        """The batched forward; when it raises, each request is probed alone (None: nothing to sample)."""
        try:
            return self._forward(plan)
        except Exception as exc:
            self._isolate(plan, exc)
            return None

    def _rows_to_sample(self, plan: RowPlan, out: ForwardOutput) -> SampleRows:
        """Advances the caches past this step's tokens; the rows that sample a token: plain decode rows,
        prompts that ended, and the forks of those prompts (which sample from their parent's last row)."""
        sampled = plan.plain + [seq for seq, n in plan.prefill if seq.num_cached + n == len(seq.prompt)]
        for seq, n in plan.prefill:
            seq.num_cached += n
        for seq in plan.plain:
            seq.num_cached += 1
        plain = len(sampled)
        logits, hidden = out.logits[:plain], out.hidden[:plain]
        forked = self._fork(sampled)
        if forked:  # the other completions of a prompt sample their first token from its last row
            rows_of = torch.tensor([sampled.index(parent) for parent, _ in forked])
            logits = torch.cat([logits, out.logits[rows_of]])
            hidden = torch.cat([hidden, out.hidden[rows_of]])
            sampled = sampled + [child for _, child in forked]
        return SampleRows(sampled, logits, hidden, plain)

    def _finish_stopped(self, events: list[tuple[Sequence, TokenEvent]]) -> None:
        """Frees the sequences whose token ended them (a stop, or the length cap)."""
        with self.lock:
            for seq, event in events:
                if event.finish_reason is not None:
                    self.scheduler.finish(seq)
                    self._forget(seq)

    def _fork(self, sampled: list[Sequence]) -> list[tuple[Sequence, Sequence]]:
        """(parent, child) for every completion forked from a prompt that was cached this step."""
        with self.lock:
            return [(seq, child) for seq in sampled if seq.forks for child in self.scheduler.fork(seq)]

    def _forget(self, seq: Sequence) -> None:
        group = self.by_id.get(seq.request.request_id)
        if group is not None and all(s.finish_reason is not None for s in group):
            del self.by_id[seq.request.request_id]

    def take_failures(self) -> list[tuple[Sequence, Exception]]:
        """Requests failed by their own fault since the last call (already finished), with the error."""
        with self.lock:
            failed, self.failures = self.failures, []
        return failed

    def _fail(self, seq: Sequence, exc: Exception) -> None:
        log.warning("request %s failed alone: %s: %s", seq.request.request_id, type(exc).__name__, exc)
        error = exc if isinstance(exc, AdapterdError) else RequestFailedError(
            f"the request failed on this worker ({type(exc).__name__}); other requests were not affected")
        with self.lock:
            for s in self.by_id.pop(seq.request.request_id, [seq]):  # every completion of the request
                if s.finish_reason is None or s is seq:
                    s.finish_reason = "cancelled"
                    self.scheduler.finish(s)
            self.failures.append((seq, error))

    def _update_fusion(self) -> None:
        try:
            self.fusion.update()
        except Exception:  # not tied to a request: the step goes on unfused (or as fused as before)
            log.exception("fusion update failed")

    def _propose(self, spec: list, plain: list[Sequence]) -> tuple[list[Draft], list[Sequence]]:
        """Medusa candidates; if proposing fails, those rows decode plainly this step."""
        try:
            return self.speculator.propose(spec), plain
        except Exception:
            log.exception("Medusa proposal failed; decoding those rows plainly")
            return [], plain + [seq for seq, *_ in spec]

    def _isolate(self, plan: RowPlan, exc: Exception) -> None:
        """The batched forward raised: runs each request's rows alone (rewriting the same KV positions, so the
        probe changes nothing) and fails the requests whose own forward raises; the others did not advance
        and run again next step. If no request fails alone, the error is the batch's: all of them fail."""
        log.warning("batched forward failed (%s: %s); probing its requests one by one", type(exc).__name__, exc)
        units = ([(s, RowPlan([s], [], [])) for s in plan.plain]
                 + [(s, RowPlan([], [(s, n)], [])) for s, n in plan.prefill]
                 + [(d.seq, RowPlan([], [], [d])) for d in plan.drafts])
        culprits = []
        for seq, alone in units:
            try:
                self._forward(alone)
            except Exception as own:
                culprits.append((seq, own))
        for seq, own in culprits or [(seq, exc) for seq, _ in units]:
            self._fail(seq, own)

    def _forward(self, plan: RowPlan) -> ForwardOutput:
        """Logits and hidden states of the plain decode rows, the prompts that end, then every node of each tree."""
        decode = [DecodeRow(s.kv_slot, s.num_cached, s.last_token, s.placement) for s in plan.plain]
        chunks = [PromptChunk(s.kv_slot, s.num_cached, list(s.prompt[s.num_cached:s.num_cached + n]),
                              s.num_cached + n == len(s.prompt), s.placement) for s, n in plan.prefill]
        chunks += [PromptChunk(d.seq.kv_slot, d.seq.num_cached, d.tokens, True, d.seq.placement, d.tree.layout)
                   for d in plan.drafts]
        return ForwardOutput(*self.runner.forward(decode, chunks, with_hidden=True))

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor,
                hidden: torch.Tensor) -> list[tuple[Sequence, TokenEvent]]:
        """One token per row (logits [R, vocab], hidden [R, hidden]); rows with heads keep the hidden state.
        A row that raises fails its request alone."""
        greedy = logits.argmax(dim=-1).tolist()  # [R]: the token of every greedy row
        events = []
        for row, seq in enumerate(seqs):
            try:
                token, logprob, alts = choose(logits[row], seq, greedy[row])
                advance([seq.matcher], [token], self.grammars.eos)
                if self.speculator.heads_for(seq) is not None:
                    seq.medusa_hidden = hidden[row].clone()
                    if seq.output:  # a plain decode step (a prompt's first token is not one)
                        seq.tokens_per_step.append(1)
                events.append((seq, self._append(seq, token, logprob, alts)))
            except Exception as exc:
                self._fail(seq, exc)
        return events

    def _accept(self, drafts: list[Draft], logits: torch.Tensor,
                hidden: torch.Tensor) -> list[tuple[Sequence, TokenEvent]]:
        """Verifies the trees (logits [ΣT, vocab], hidden [ΣT, hidden]), moves each accepted path's KV
        entries into place and emits its tokens (up to a stop). A tree that raises fails its request alone."""
        events, start = [], 0
        for draft in drafts:
            rows = slice(start, start + draft.tree.size)
            start += draft.tree.size
            try:
                [v] = self.speculator.verify([draft], logits[rows], hidden[rows])
                events += self._emit(v)
            except Exception as exc:
                self._fail(draft.seq, exc)
        return events

    def _emit(self, v: Verified) -> list[tuple[Sequence, TokenEvent]]:
        events = []
        seq, start = v.seq, v.seq.num_cached
        if v.nodes[1:] != list(range(1, len(v.nodes))):
            self.runner.kv.compact(seq.kv_slot, [start + n for n in v.nodes[1:]], start + 1)
        seq.num_cached += len(v.nodes)
        seq.medusa_hidden = v.hidden
        seq.tokens_per_step.append(0)
        for tok, lp in zip(v.tokens, v.logprobs, strict=True):
            seq.tokens_per_step[-1] += 1
            events.append((seq, self._append(seq, tok, lp)))
            if seq.finish_reason is not None:
                break
        return events

    def _append(self, seq: Sequence, token: int, logprob: float | None,
                top_logprobs: tuple[tuple[int, float], ...] | None = None) -> TokenEvent:
        seq.output.append(token)
        p = seq.request.params
        if token in seq.stop_ids:
            seq.finish_reason = "stop"
        elif seq.text.add(token):
            seq.finish_reason = "stop"
        elif seq.matcher is not None and seq.matcher.is_stopped():  # the JSON is complete
            seq.finish_reason = "stop"
        elif len(seq.output) >= p.max_tokens or len(seq.prompt) + len(seq.output) >= self.max_seq:
            seq.finish_reason = "length"
        text = seq.text.release(final=seq.finish_reason is not None)
        details = None
        if seq.finish_reason is not None and seq.tokens_per_step:
            details = seq.speculation.as_details(seq.tokens_per_step)
        return TokenEvent(token_id=token, text=text, logprob=logprob, index=len(seq.output) - 1,
                          prompt_tokens=len(seq.prompt), finish_reason=seq.finish_reason, details=details,
                          top_logprobs=top_logprobs, choice=seq.choice)

    def generate(self, requests: list[GenerationRequest]) -> list[list[TokenEvent]]:
        """Runs requests to completion together (for tests and benchmarks)."""
        seqs = [self.add_request(r) for r in requests]
        out: dict[int, list[TokenEvent]] = {id(s): [] for s in seqs}  # n > 1: every choice's events, in order
        parent = {id(c): s for s in seqs for c in s.forks}
        while self.has_work():
            for seq, event in self.step():
                out[id(parent.get(id(seq), seq))].append(event)
        return [out[id(s)] for s in seqs]
