"""Data-parallel training with torchrun: PyTorch's own process group and DistributedDataParallel,
and the frozen model sharded over the ranks with FSDP2 (`shard_model`).

Under ``torchrun`` (which sets RANK, WORLD_SIZE, LOCAL_RANK), every rank holds a replica of the
SAEs, reads its own slice of each global batch, and DDP averages the SAE gradients. The frozen
model is replicated too, or, under ``train.shard_model``, split over the ranks: each rank keeps
1/N of every weight and gathers a block's weights only while that block runs. Rank 0 alone logs
and writes to the run directory. Without torchrun nothing here does anything.
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


class ShardedModel:
    """A backbone's frozen weights sharded over the ranks with FSDP2 (`torch.distributed.fsdp.fully_shard`).

    The model comes loaded on the CPU (and cast, under bf16); `fully_shard` moves each unit to the
    rank's device and keeps its share there. Each transformer block is one unit: its weights are
    gathered when it runs (forward, and again for the backward of the blocks after an SAE) and
    freed after. The rest (embeddings, final norm, output head) is the root unit: gathered at the
    first forward of a step and kept for the step, because the fused KL and the final norm read
    those weights outside a module's forward; `release` frees it after each optimizer step and
    each evaluation. Trainable parameters (an adapter's) are left out of the sharding: they stay
    whole on every rank and their gradients are averaged like the SAEs'. Frozen weights get no
    gradient, so nothing is reduced; only gathers."""

    def __init__(self, backbone, ctx: DistContext):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        check_sharding(True, ctx.world, backbone.n_layers)
        self.backbone, self.ctx = backbone, ctx
        mesh = init_device_mesh(torch.device(ctx.device).type, (ctx.world,))
        trainable = {p for p in backbone.model.parameters() if p.requires_grad}
        for block in backbone.blocks:
            fully_shard(block, mesh=mesh, reshard_after_forward=True, ignored_params=trainable & set(block.parameters()))
        self.root = fully_shard(backbone.model, mesh=mesh, reshard_after_forward=False, ignored_params=trainable)
        backbone.move_head(torch.device(ctx.device))  # a head pinned before the split (bf16) goes with the model
        backbone.warm_up()  # the first forward goes through the root: FSDP's root is decided there
        self.release()
        if backbone.adapter is not None:  # the adapter's check of the frozen weights: now this rank's shards
            backbone.adapter.watch_frozen([p for p in backbone.model.parameters() if not p.requires_grad])

    def release(self) -> None:
        """Every unit's weights back to their shards (also after a run that a hook stopped early)."""
        self.root.reset_iter_state()
        self.backbone.drop_head_cache()


def check_sharding(shard: bool, world: int, n_layers: int | None) -> None:
    """``train.shard_model`` needs torchrun with at least two ranks and no more ranks than blocks."""
    if not shard:
        return
    if world < 2:
        raise E2EDictError("train.shard_model splits the model over torchrun's processes: start the run with torchrun "
                           "and at least 2 of them (torchrun --nproc-per-node N -m e2edict train ...)")  # fmt: skip
    if n_layers is not None and world > n_layers:
        raise E2EDictError(f"train.shard_model: {world} ranks but the model has {n_layers} blocks; use at most {n_layers}")
