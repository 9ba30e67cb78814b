"""Data-parallel training on torch.distributed (`adapterd trainer --nproc N`): one job, N processes on this
machine, each rank computing its share of every global batch; gloo on CPU, NCCL when the model is on GPUs.

The trainer process that claimed the job is rank 0: it keeps the claim, runs the hooks (events, cancellation,
checkpoints) and writes checkpoints and the result, once. Ranks 1..N-1 are spawned per job
(`torch.multiprocessing`, spawn start method), train silently and exit with it; on a resume every rank reads
the same local checkpoint, so parameters, optimizer and schedule state agree.

Each step, as DDP does, the gradients are all-reduced; the loss is normalised by the global batch's supervised
token count (summed over the ranks first), so N processes compute the gradient one process computes on the
whole batch — the same global batch size and seed give the same run up to float summation order.
(Not the `DistributedDataParallel` wrapper: only the adapter's parameters train, and DDP's per-rank mean
would weight ranks with fewer tokens wrongly.)
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from workers.trainer import training
from workers.trainer.method_contract import BatchLoss, TrainingSpec
from workers.trainer.training import TrainingCancelled, TrainingHooks, TrainingResult

JOIN_S = 60.0


class DataParallel:
    """This process's rank in the group, and the collectives the training loop needs."""

    def __init__(self, rank: int, world: int, port: int):
        self.rank, self.world, self.port = rank, world, port
        self.device = torch.device("cpu")

    def start(self, device: torch.device) -> None:
        """Joins the group (gloo for CPU tensors, NCCL for CUDA ones) once the model is on `device`."""
        self.device = device
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{self.port}", rank=self.rank,
                                world_size=self.world)

    def stop(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, picked: Sequence[int]) -> list[int]:
        """This rank's examples of the global batch (strided, so every rank gets one before any gets two)."""
        return list(picked[self.rank::self.world])

    def any(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def step(self, loss_fn: Callable[[object], BatchLoss], batch, params: list[torch.nn.Parameter]) -> BatchLoss:
        """Forward + backward of this rank's shard, gradients summed over the ranks; returns the global
        batch's loss_sum and token counts (loss_sum detached)."""
        out = loss_fn(batch) if batch is not None else None
        local = torch.tensor([float(out.loss_sum.detach()) if out else 0.0, out.label_tokens if out else 0,
                              out.input_tokens if out else 0, (out.correct_tokens or 0) if out else 0],
                             dtype=torch.float64, device=self.device)
        tokens = local[1:2].clone()
        dist.all_reduce(tokens)  # the global supervised token count normalises every rank's loss
        if out is not None:
            (out.loss_sum / max(1.0, tokens.item())).backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])  # [trainable params]
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(p).clone()
            offset += g.numel()
        dist.all_reduce(local)
        correct = None if out is not None and out.correct_tokens is None else int(local[3].item())
        return BatchLoss(local[0].clone().float().squeeze(), int(local[1].item()), int(local[2].item()), correct)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, spec: TrainingSpec, checkpoint_every: int, threads: int) -> None:
    """Ranks 1..N-1: train in lockstep with rank 0, no hooks, no files written."""
    torch.set_num_threads(threads)
    parallel = DataParallel(rank, world, port)
    try:
        training.train(spec, TrainingHooks(checkpoint_every=checkpoint_every), parallel)
    except TrainingCancelled:
        pass
    finally:
        parallel.stop()


def train(spec: TrainingSpec, hooks: TrainingHooks, nproc: int) -> TrainingResult:
    """`training.train` over `nproc` processes (this one is rank 0)."""
    if nproc <= 1:
        return training.train(spec, hooks)
    port = free_port()
    threads = max(1, torch.get_num_threads() // nproc)
    ctx = mp.get_context("spawn")
    helper_spec = replace(spec, output_dir=spec.output_dir.parent / f"{spec.output_dir.name}-rank-unused")
    ranks = [ctx.Process(target=_rank_main, args=(r, nproc, port, helper_spec, hooks.checkpoint_every, threads),
                         daemon=True, name=f"trainer-rank-{r}") for r in range(1, nproc)]
    for p in ranks:
        p.start()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    parallel = DataParallel(0, nproc, port)
    finished = False
    try:
        result = training.train(spec, hooks, parallel)
        finished = True
        return result
    except TrainingCancelled:
        finished = True  # every rank saw the same stop flag and is leaving too
        raise
    finally:
        parallel.stop()
        torch.set_num_threads(previous_threads)
        for p in ranks:
            p.join(JOIN_S if finished else 1.0)
            if p.is_alive():  # rank 0 failed mid-step: the others would wait on a collective forever
                p.terminate()
                p.join()
