"""`adapterd trainer` (`python -m workers.trainer.worker`): a trainer process for one base model. It claims
fine-tune jobs from the queue (`workers.trainer.queue`), trains them (`workers.trainer.training.train`,
injectable), reports progress as job events, checkpoints periodically (mirrored to the store, so a trainer
elsewhere resumes from them), and publishes the result to the adapter store as `ft:{base}:{suffix}:{job}` —
the same path uploads take, so it is servable at once.

A heartbeat thread keeps the claim fresh and announces the trainer; a trainer killed mid-job (even by
kill -9) stops heartbeating, and after the claim timeout another trainer takes the job over and resumes it
from its last checkpoint, same job id. Each takeover counts as a delivery; past `max_attempts` the job fails
with the reason. Cancellation is a flag on the job record that the training loop checks every step."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import redis

from adapters_store import kinds as store_kinds
from adapters_store.backends import open_backend
from adapters_store.base_model import BaseModelSpec
from adapters_store.ingest import CompressionRequest, prepare
from adapters_store.materialise import materialise
from adapters_store.training_files import TrainingFileStore
from adapters_store.validation import UploadedFile, UploadLimits
from adapters_store.version_store import VersionStore
from adapters_store.wire import (
    TERMINAL_STATUSES,
    FineTuneJob,
    JobCheckpoint,
    JobEvent,
    TrainerInfo,
    fine_tuned_name,
    owned_name,
)
from workers.trainer.queue import Claim, JobQueue, JobRecords, announce, withdraw
from workers.trainer.results import metrics_csv

log = logging.getLogger("adapterd.trainer")
CHECKPOINTS = "jobs/{job}/checkpoints/"  # backend prefix of a job's mirrored checkpoints
KEEP_MIRRORED = 2
REDIS_RETRY_S = 30.0  # how long state writes wait for Redis to come back


@dataclass
class TrainerConfig:
    redis_url: str
    base_model_path: str
    store_url: str
    work_dir: Path
    model_id: str | None = None  # the base model's id (jobs name it); default: the folder's name
    trainer_id: str = field(default_factory=lambda: f"trainer-{socket.gethostname()}-{os.getpid()}")
    claim_timeout_s: float = 30.0  # a claim silent this long is taken over
    heartbeat_s: float | None = None  # default: a quarter of the claim timeout
    max_attempts: int = 3  # deliveries of one job before it fails
    checkpoint_every: int = 10
    event_interval_s: float = 1.0  # step events at most this often (plus the first and last step)
    poll_s: float = 1.0
    nproc: int = 1  # processes training each job data-parallel (workers/trainer/distributed.py)

    @property
    def base_id(self) -> str:
        return self.model_id or Path(self.base_model_path).name

    @property
    def beat_s(self) -> float:
        return self.heartbeat_s or max(0.05, self.claim_timeout_s / 4)


class ClaimLost(Exception):
    """Another trainer owns the job now: stop without touching it."""


def _retrying(op: Callable, for_s: float = REDIS_RETRY_S):
    """`op()`, retried while Redis is unreachable (a restart) for up to `for_s` seconds."""
    deadline = time.monotonic() + for_s
    while True:
        try:
            return op()
        except (redis.ConnectionError, redis.TimeoutError) as e:
            if time.monotonic() > deadline:
                raise
            log.warning("Redis unreachable (%s); retrying", e)
            time.sleep(0.25)


def _default_train(nproc: int = 1):
    if nproc > 1:  # data-parallel: this process is rank 0, the other ranks are spawned per job
        from functools import partial

        from workers.trainer import distributed

        return partial(distributed.train, nproc=nproc)
    from workers.trainer import training

    return training.train


class _Run:
    """One claimed job, from start to its end state (or to a lost claim)."""

    def __init__(self, trainer: Trainer, claim: Claim, job: FineTuneJob):
        self.t, self.claim, self.job = trainer, claim, job
        self.attempt = claim.deliveries
        self.lost = threading.Event()
        self.last_event = 0.0
        self.started = time.monotonic()
        self.first_step: int | None = None
        # input tokens trained on (steps repeated after a takeover count again: they were trained again)
        self.trained_tokens = job.trained_tokens or 0
        self.last_eval: dict = {}  # the latest validation metrics (on_eval), added to the next checkpoint's
        self.dir = trainer.config.work_dir / "jobs" / job.id

    # -- record helpers ---------------------------------------------------------------------------
    def event(self, message: str, level: str = "info", type_: str = "message", data: dict | None = None) -> None:
        e = JobEvent(message, level=level, type=type_, data=data)
        _retrying(lambda: self.t.records.event(self.job.id, e))

    def update(self, fields: dict, status: tuple[str, ...] = ("running",)) -> None:
        expect = {"status": list(status), "attempt": [self.attempt]}
        if not _retrying(lambda: self.t.records.update(self.job.id, expect, fields)):
            current = _retrying(lambda: self.t.records.load(self.job.id))
            if current is None or current.attempt != self.attempt:
                self.lost.set()
                raise ClaimLost(self.job.id)

    # -- hooks ------------------------------------------------------------------------------------
    def on_step(self, r) -> None:
        if self.lost.is_set():
            raise ClaimLost(self.job.id)
        now = time.monotonic()
        self.trained_tokens += r.tokens
        if self.first_step is None:
            self.first_step, self.started = r.step - 1, now
        if r.step not in (1, r.total_steps) and now - self.last_event < self.t.config.event_interval_s:
            return
        self.last_event = now
        done = r.step - self.first_step
        eta = int(time.time() + (now - self.started) / max(1, done) * (r.total_steps - r.step))
        data = {"step": r.step, "total_steps": r.total_steps, "train_loss": r.loss, "tokens_per_s": r.tokens_per_s,
                "estimated_finish": eta}
        accuracy = ""
        if r.token_accuracy is not None:
            data["train_mean_token_accuracy"] = r.token_accuracy
            accuracy = f", token accuracy={r.token_accuracy:.3f}"
        try:
            self.event(f"Step {r.step}/{r.total_steps}: training loss={r.loss:.4f}{accuracy}, "
                       f"{r.tokens_per_s:.0f} tokens/s", type_="metrics", data=data)
            self.update({"step": r.step, "total_steps": r.total_steps, "train_loss": r.loss, "estimated_finish": eta,
                         "trained_tokens": self.trained_tokens})
        except redis.RedisError as e:  # progress is best effort: training goes on while Redis is away
            log.warning("job %s: step %d not recorded (%s)", self.job.id, r.step, e)

    def on_eval(self, r) -> None:
        """The validation set's loss (and token accuracy) at a checkpoint or at the end."""
        data = {"step": r.step, "total_steps": r.total_steps, "valid_loss": r.loss, "full_valid_loss": r.loss,
                "validation_loss": r.loss}
        accuracy = ""
        if r.token_accuracy is not None:
            data.update(valid_mean_token_accuracy=r.token_accuracy, full_valid_mean_token_accuracy=r.token_accuracy)
            accuracy = f", token accuracy={r.token_accuracy:.3f}"
        self.last_eval = data
        try:
            self.event(f"Step {r.step}/{r.total_steps}: validation loss={r.loss:.4f}{accuracy}", type_="metrics",
                       data=data)
        except redis.RedisError as e:
            log.warning("job %s: validation at step %d not recorded (%s)", self.job.id, r.step, e)

    def on_checkpoint(self, r) -> None:
        location = self.t.mirror_checkpoint(self.job.id, self.dir / "checkpoints", Path(r.path))
        metrics = {"step": r.step, "train_loss": r.train_loss}
        if self.last_eval.get("step") == r.step:
            metrics.update({k: v for k, v in self.last_eval.items() if k.startswith(("valid", "full_valid"))})
        if r.adapter_dir is not None:  # servable by its fine_tuned_model_checkpoint name
            job = self.job
            try:
                self.t.publish(job, Path(r.adapter_dir), fine_tuned_name(job.model, job.suffix, job.id, r.step))
            except Exception as e:  # noqa: BLE001 - the checkpoint still resumes the job; only serving it is lost
                log.warning("job %s: checkpoint at step %d not published (%s)", job.id, r.step, e)
        checkpoint = JobCheckpoint(id=f"ftckpt-{secrets.token_hex(12)}", fine_tuning_job_id=self.job.id,
                                   step_number=r.step, metrics=metrics, location=location)
        try:
            self.t.records.add_checkpoint(checkpoint)
            self.event(f"Checkpoint saved at step {r.step}", data={"step": r.step, "checkpoint": checkpoint.id})
        except redis.RedisError as e:  # the checkpoint is on disk and in the store; only its listing is missed
            log.warning("job %s: checkpoint at step %d not recorded (%s)", self.job.id, r.step, e)

    def draining(self) -> bool:
        """The trainer is stopping (SIGTERM) while it still holds the claim: checkpoint, then hand over."""
        return self.t.stopping.is_set() and not self.lost.is_set()

    def should_stop(self) -> bool:
        if self.lost.is_set() or self.t.stopping.is_set():
            return True
        try:
            return self.t.records.cancel_requested(self.job.id)
        except redis.RedisError:
            return False  # Redis is away for a moment: keep training, the heartbeat notices a lost claim

    # -- the job ----------------------------------------------------------------------------------
    def run(self) -> None:
        t, job = self.t, self.job
        fields = {"status": "running", "attempt": self.attempt, "trainer": t.config.trainer_id,
                  "started_at": job.started_at or int(time.time())}
        if not t.records.update(job.id, {"status": ["queued", "running"]}, fields):
            return self._ack_if_finished()
        if self.claim.taken_over:
            self.event(f"Trainer {t.config.trainer_id} took the job over from {job.trainer} (silent for over "
                       f"{t.config.claim_timeout_s:g} s); attempt {self.attempt} of {t.config.max_attempts}",
                       level="warn")
        else:
            self.event(f"Fine-tuning started on trainer {t.config.trainer_id}")
        name = fine_tuned_name(job.model, job.suffix, job.id)  # in the job owner's namespace
        if t.adapters.latest(owned_name(job.organization_id, name)) is not None:
            # a previous attempt published, then died before recording it
            return self._succeed(name, None)
        from workers.trainer.training import TrainingCancelled, TrainingHooks, TrainingSpec

        resumed = t.restore_checkpoint(job.id, self.dir / "checkpoints")
        if resumed is not None:
            self.event(f"Resuming from the checkpoint at step {resumed}")
        spec = TrainingSpec(
            method=job.method, base_model_path=t.config.base_model_path,
            train_records=t.files.read_records(job.training_file),
            valid_records=t.files.read_records(job.validation_file) if job.validation_file else None,
            seed=job.seed, output_dir=self.dir / f"output-{self.attempt}", checkpoint_dir=self.dir / "checkpoints",
            adapter_path=t.adapter_folder(job.method.get("adapter")))
        hooks = TrainingHooks(on_step=self.on_step, on_checkpoint=self.on_checkpoint, on_eval=self.on_eval,
                              should_stop=self.should_stop, checkpoint_every=t.config.checkpoint_every,
                              checkpoint_on_stop=self.draining)
        try:
            result = t.train_fn(spec, hooks)
        except (TrainingCancelled, ClaimLost) as e:
            if self.lost.is_set():
                raise ClaimLost(job.id) from e
            if t.stopping.is_set() and not t.records.cancel_requested(job.id):
                self.event("The trainer is stopping; the job resumes on another trainer", level="warn")
                try:
                    t.queue.release(self.claim)
                except redis.RedisError as exc:  # then the claim goes stale by itself
                    log.warning("job %s: could not release the claim (%s)", job.id, exc)
                raise ClaimLost(job.id) from e
            self.event(f"Job cancelled ({e})")
            self.update({"status": "cancelled", "finished_at": int(time.time())})
            return self._done()
        if self.lost.is_set():
            raise ClaimLost(job.id)
        t.publish(job, result.adapter_dir, name)
        self._succeed(name, result)

    def _succeed(self, name: str, result) -> None:
        self.event(f"Fine-tuning succeeded: the adapter {name} is ready")
        fields = {"status": "succeeded", "fine_tuned_model": name, "finished_at": int(time.time()),
                  "trained_tokens": self.trained_tokens}
        if result is not None:
            fields.update(step=result.steps, total_steps=result.steps, train_loss=result.train_loss,
                          validation_loss=result.validation_loss, result_files=[self._result_file(result).id])
        self.update(fields)
        self._done()

    def _result_file(self, result):
        rows = result.history
        return self.t.files.put_result(self.job.organization_id, f"{self.job.id}-results.csv", metrics_csv(rows),
                                       len(rows))

    def fail(self, code: str, message: str) -> None:
        self.event(f"Fine-tuning failed: {message}", level="error")
        self.update({"status": "failed", "finished_at": int(time.time()),
                     "error": {"code": code, "message": message, "param": None}})
        self._done()

    def _ack_if_finished(self) -> None:
        current = self.t.records.load(self.job.id)
        if current is None or current.status in TERMINAL_STATUSES:
            self.t.queue.finish(self.claim)

    def _done(self) -> None:
        _retrying(lambda: self.t.queue.finish(self.claim))
        shutil.rmtree(self.dir, ignore_errors=True)
        self.t.forget_checkpoints(self.job.id)


class Trainer:
    def __init__(self, config: TrainerConfig, train_fn: Callable | None = None, client: redis.Redis | None = None):
        self.config = config
        self.train_fn = train_fn or _default_train(config.nproc)
        self.redis = client or redis.Redis.from_url(config.redis_url, socket_timeout=10, socket_connect_timeout=2)
        self.queue = JobQueue(self.redis, config.base_id, config.trainer_id, config.claim_timeout_s)
        self.records = JobRecords(self.redis)
        backend = open_backend(config.store_url)
        self.backend = backend
        self.adapters = VersionStore(backend)
        self.files = TrainingFileStore(backend)
        self.base = BaseModelSpec.from_folder(config.base_model_path)
        self.stopping = threading.Event()
        self.info = TrainerInfo(trainer_id=config.trainer_id, model_id=config.base_id)
        self._current: _Run | None = None
        self._beat: threading.Thread | None = None

    # -- the loop ---------------------------------------------------------------------------------
    def start_heartbeat(self) -> None:
        if self._beat is None:
            self._beat = threading.Thread(target=self._heartbeat, name="trainer-heartbeat", daemon=True)
            self._beat.start()

    def run(self) -> None:
        """Claims and runs jobs until `stop()`."""
        self.start_heartbeat()
        while not self.stopping.is_set():
            try:
                self.run_once()
            except redis.RedisError as e:
                log.warning("Redis error (%s); retrying", e)
                self.stopping.wait(0.5)
        try:
            withdraw(self.redis, self.config.trainer_id)
        except redis.RedisError:
            pass

    def stop(self) -> None:
        self.stopping.set()

    def run_once(self, block_s: float | None = None) -> str | None:
        """Claims one job (waiting up to block_s) and runs it to its end. Returns its id, or None."""
        self.queue.ensure_group()
        claim = self.queue.claim(self.config.poll_s if block_s is None else block_s)
        if claim is None:
            return None
        job = self.records.load(claim.job_id) if claim.job_id else None
        if job is None or job.status in TERMINAL_STATUSES:
            self.queue.finish(claim)
            return claim.job_id
        run = _Run(self, claim, job)
        self._current = run
        self.info.job_id = job.id
        try:
            self._run(run)
        except ClaimLost:
            log.warning("job %s: claim lost to another trainer", job.id)
        finally:
            self._current = None
            self.info.job_id = None
        return job.id

    def _run(self, run: _Run) -> None:
        job = run.job
        if run.attempt > self.config.max_attempts:
            run.attempt = job.attempt  # write as the attempt the record holds
            return self._fail_exhausted(run)
        if job.cancel_requested:
            run.attempt = job.attempt
            run.event("Job cancelled before it started")
            if self.records.update(job.id, {"status": ["queued", "running"]},
                                   {"status": "cancelled", "finished_at": int(time.time())}):
                return run._done()
            return run._ack_if_finished()
        try:
            run.run()
        except ClaimLost:
            raise
        except Exception as e:  # the training or the publishing failed: the job fails with the reason
            if run.lost.is_set():
                raise ClaimLost(job.id) from e
            log.exception("job %s failed", job.id)
            code = getattr(e, "code", None) if isinstance(getattr(e, "code", None), str) else "training_failed"
            message = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
            run.fail(code, message)

    def _fail_exhausted(self, run: _Run) -> None:
        job = run.job
        message = (f"the job was started {run.claim.deliveries - 1} times and its trainer stopped each time "
                   f"(last: {job.trainer}); giving up after {self.config.max_attempts} attempts")
        run.event(f"Fine-tuning failed: {message}", level="error")
        self.records.update(job.id, {"status": ["queued", "running"]},
                            {"status": "failed", "finished_at": int(time.time()),
                             "error": {"code": "too_many_attempts", "message": message, "param": None}})
        run._done()

    def _heartbeat(self) -> None:
        ttl = max(self.config.beat_s * 3, 1.0)
        while True:
            try:
                run = self._current
                if run is not None and not run.lost.is_set() and not self.queue.keep(run.claim):
                    log.warning("job %s: another trainer took the claim", run.job.id)
                    run.lost.set()
                announce(self.redis, self.info, ttl)
            except redis.RedisError as e:
                log.debug("heartbeat: %s", e)
            if self.stopping.wait(self.config.beat_s):
                return

    # -- store ------------------------------------------------------------------------------------
    def publish(self, job: FineTuneJob, adapter_dir: Path, name: str) -> None:
        uploads = [UploadedFile(p.name, p.read_bytes()) for p in sorted(Path(adapter_dir).iterdir()) if p.is_file()]
        compression = CompressionRequest.from_dict(job.compression) if job.compression else None
        limits = UploadLimits(max_rank=4096)
        draft, files = prepare(uploads, self.base, limits, name=owned_name(job.organization_id, name),
                               owner=job.organization_id, public=False,
                               compression=compression)
        if store_kinds.are_heads(draft.kind):  # heads serve the adapter version they were distilled from, or the base
            adapter = job.method.get("adapter")
            draft = replace(draft, attach_to=self.adapters.resolve(adapter).ref if adapter else None)
        published = self.adapters.publish(draft, files)
        if store_kinds.are_heads(published.kind):
            self.adapters.attach_heads(published)

    def adapter_folder(self, ref: str | None) -> str | None:
        """A stored adapter (medusa's `adapter`) as a local folder."""
        if not ref:
            return None
        manifest = self.adapters.resolve(ref)
        if manifest is None:
            raise ValueError(f"method.adapter: no adapter {ref!r} in the store")
        return str(materialise(self.adapters, manifest.ref, self.config.work_dir / "adapters"))

    def mirror_checkpoint(self, job_id: str, root: Path, path: Path) -> str:
        """Copies one checkpoint (a folder or a file under root) to the store; returns its key prefix."""
        rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
        prefix = CHECKPOINTS.format(job=job_id) + rel
        files = [p for p in sorted(path.rglob("*")) if p.is_file()] if path.is_dir() else [path]
        for f in files:
            key = prefix if f == path else f"{prefix}/{f.relative_to(path).as_posix()}"
            self.backend.write(key, f.read_bytes())
        kept = {c.location for c in self.records.checkpoints(job_id)[-(KEEP_MIRRORED - 1):]} | {prefix}
        for key in self.backend.list(CHECKPOINTS.format(job=job_id)):
            if not any(key == k or key.startswith(k + "/") for k in kept):
                self.backend.delete(key)
        return prefix

    def restore_checkpoint(self, job_id: str, root: Path) -> int | None:
        """The last recorded checkpoint's step; its files fetched from the store if not here already."""
        recorded = self.records.checkpoints(job_id)
        if not recorded:
            return None
        last = recorded[-1]
        base = CHECKPOINTS.format(job=job_id)
        rel = last.location[len(base):]
        target = root / rel
        if not target.exists():
            keys = [k for k in self.backend.list(base) if k == last.location or k.startswith(last.location + "/")]
            if not keys:
                return None
            tmp = root / f".restore-{rel}"
            shutil.rmtree(tmp, ignore_errors=True)
            for key in keys:
                dest = tmp if key == last.location else tmp / key[len(last.location) + 1:]
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(self.backend.read(key) or b"")
            os.replace(tmp, target)
        return last.step_number

    def forget_checkpoints(self, job_id: str) -> None:
        for key in self.backend.list(CHECKPOINTS.format(job=job_id)):
            self.backend.delete(key)


# ---- entry point ----------------------------------------------------------------------------------


def warm_up(base_model_path: str) -> None:
    """Imports the training methods and loads the base once (torch, transformers and the model class import
    lazily: seconds) before the trainer announces itself, so that its first job starts training at once."""
    import importlib

    for method in ("lora", "s2ft", "medusa"):
        try:
            importlib.import_module(f"workers.trainer.{method}")
        except ImportError as e:
            log.warning("training method %s unavailable: %s", method, e)
    try:
        from workers.trainer.sft import load_base

        load_base(base_model_path)
    except Exception as e:  # noqa: BLE001 - a warm-up only; the job reports the real error
        log.warning("could not pre-load the base model: %s", e)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="adapterd trainer", description="adapterd fine-tune trainer")
    p.add_argument("--redis-url", default=os.environ.get("ADAPTERD_REDIS_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument("--model", help="the base model folder (HF config.json + safetensors; default: the packaged "
                   "SmolLM2, converted once)")
    p.add_argument("--model-id", help="the base model's id in jobs (default: the folder's name)")
    p.add_argument("--data-dir", default=".adapterd", help="work files under DATA_DIR/trainer")
    p.add_argument("--store-url", help="the adapter store (default: DATA_DIR/store, as the gateway's)")
    p.add_argument("--trainer-id")
    p.add_argument("--claim-timeout", type=float, default=30.0, help="seconds before a silent claim is taken over")
    p.add_argument("--max-attempts", type=int, default=3)
    p.add_argument("--checkpoint-every", type=int, default=10, help="steps between checkpoints")
    p.add_argument("--event-interval", type=float, default=1.0, help="seconds between step events")
    p.add_argument("--nproc", type=int, default=1, help="processes that train each job data-parallel "
                   "(torch.distributed: gloo on CPU, NCCL on GPUs); checkpoints are written once, by this one")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> TrainerConfig:
    data_dir = Path(args.data_dir).resolve()
    if not args.model:
        from workers.model.default_model import ensure_default_model

        args.model = str(ensure_default_model())
    config = TrainerConfig(
        redis_url=args.redis_url, base_model_path=str(Path(args.model).resolve()),
        store_url=args.store_url or (data_dir / "store").as_uri(), work_dir=data_dir / "trainer",
        model_id=args.model_id, claim_timeout_s=args.claim_timeout, max_attempts=args.max_attempts,
        checkpoint_every=args.checkpoint_every, event_interval_s=args.event_interval, nproc=max(1, args.nproc))
    if args.trainer_id:
        config.trainer_id = args.trainer_id
    return config


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    from adapters_store.json_logging import configure

    configure("trainer", logging.getLevelName(args.log_level.upper()))
    trainer = Trainer(config_from_args(args))
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: trainer.stop())
    warm_up(trainer.config.base_model_path)
    log.info("trainer %s ready for %s jobs", trainer.config.trainer_id, trainer.config.base_id)
    trainer.run()


if __name__ == "__main__":
    main()
