"""Data-parallel training with torchrun: PyTorch's own process group and DistributedDataParallel.

Under ``torchrun`` (which sets RANK, WORLD_SIZE, LOCAL_RANK), every rank holds a replica of the
frozen model and of the SAEs, reads its own slice of each global batch, and DDP averages the SAE
gradients. Rank 0 alone logs, evaluates and writes to the run directory. Without torchrun nothing
here does anything.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from e2edict.errors import E2EDictError


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The average of ``t`` over ranks (a copy; ``t`` itself is left alone)."""
        if not self.enabled:
            return t
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t / self.world

    def average_grads(self, params: list[torch.Tensor]) -> None:
        """Each gradient replaced by its mean over ranks (what DDP does for the modules it wraps)."""
        if not self.enabled:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= self.world

    def broadcast_flag(self, flag: bool) -> bool:
        """True on every rank if it is true on any (a signal that reached one process, say)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)


def init_distributed(device: str, backend: str = "auto", timeout_s: int = 600) -> DistContext:
    """Join torchrun's process group if this process was started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise E2EDictError("model.device is cuda but no GPU is visible to this rank")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if backend == "auto":
        backend = "nccl" if device.startswith("cuda") else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext(rank=rank, world=world, local_rank=local_rank, device=device)


def close_distributed(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
