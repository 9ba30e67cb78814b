"""How `adapterd jobs follow` shows a job: on a terminal, its messages above one live progress bar (step,
losses, the trainer's ETA); piped, plain lines (each event's message, no control characters); a job that has
already finished, only its summary. Reads the job's events (`Client.follow_job`)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from adapterd_client.client import Client
from adapterd_client.models import FineTuningJob

BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {postfix}"


def summary(job: FineTuningJob) -> list[str]:
    """A finished (or current) job in a few lines."""
    lines = [f"{job.id}: {job.status}" + (f", {job.fine_tuned_model}" if job.fine_tuned_model else "")]
    facts = []
    if job.total_steps:
        facts.append(f"steps {job.step}/{job.total_steps}")
    if job.train_loss is not None:
        facts.append(f"train loss {job.train_loss:.4f}")
    if job.validation_loss is not None:
        facts.append(f"validation loss {job.validation_loss:.4f}")
    if job.trained_tokens:
        facts.append(f"{job.trained_tokens} tokens trained")
    if job.finished_at and job.created_at:
        facts.append(f"took {job.finished_at - job.created_at} s")
    if facts:
        lines.append(", ".join(facts))
    if job.hyperparameters:
        lines.append("hyperparameters: " + ", ".join(f"{k}={v}" for k, v in job.hyperparameters.items()))
    if job.result_files:
        lines.append("result files: " + ", ".join(job.result_files) + " (adapterd files content ID)")
    if job.error is not None:
        lines.append(f"error {job.error.code}: {job.error.message}")
    return lines


class _Bar:
    """One tqdm bar fed by metrics events; no rate (events replayed on connect would fake one)."""

    def __init__(self, desc: str, out: TextIO):
        self.desc, self.out, self.bar = desc, out, None
        self.postfix: dict[str, str] = {}

    def update(self, data: dict) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=data["total_steps"], unit="step", desc=self.desc, file=self.out,
                            bar_format=BAR_FORMAT, dynamic_ncols=True)
        if "train_loss" in data:
            self.postfix["loss"] = f"{data['train_loss']:.4f}"
        if "valid_loss" in data:
            self.postfix["valid"] = f"{data['valid_loss']:.4f}"
        if data.get("estimated_finish"):
            self.postfix["eta"] = f"{max(0, int(data['estimated_finish'] - time.time()))} s"
        self.bar.n = data["step"]
        self.bar.set_postfix_str(", ".join(f"{k}={v}" for k, v in self.postfix.items()), refresh=False)
        self.bar.refresh()

    def write(self, line: str) -> None:
        if self.bar is None:
            print(line, file=self.out, flush=True)
        else:
            self.bar.write(line, file=self.out)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def follow(client: Client, job_id: str, out: TextIO = sys.stderr, live: bool | None = None) -> FineTuningJob:
    """Shows the job until it finishes (see the module doc); returns its final state. `live`: draw a bar
    (default: when `out` is a terminal)."""
    job = client.get_job(job_id)
    if not job.finished:
        live = out.isatty() if live is None else live
        bar = _Bar(job_id, out) if live else None
        try:
            for event in client.follow_job(job_id):
                data = event.data or {}
                if bar is not None and event.type == "metrics" and "total_steps" in data and "step" in data:
                    bar.update(data)
                elif bar is not None:
                    bar.write(event.message)
                else:
                    print(event.message, file=out, flush=True)
        finally:
            if bar is not None:
                bar.close()
        job = client.get_job(job_id)
    for line in summary(job):
        print(line, file=out, flush=True)
    return job
