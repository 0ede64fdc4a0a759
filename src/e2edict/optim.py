"""The optimizer and its learning-rate schedule (``train.optimizer``, ``train.schedule``).

Three optimizers: Adam (the reference's, the paper presets' default), AdamW, and schedule-free
AdamW (`schedulefree.AdamWScheduleFree`, Defazio et al. 2024). A schedule-free optimizer keeps
two sequences of weights: the parameters hold the point where gradients are taken (``y``), and
the weights to evaluate and save are an average (``x``) recovered from its state. It needs no
decay schedule (the budget need not be known: a run stopped early is as good as one planned
short) and does its own linear warmup. `averaged_weights` puts ``x`` in the parameters for an
evaluation and then restores ``y`` bit for bit, so evaluating during training never changes the
training trajectory, and checkpoints hold ``y`` with the optimizer state, which is what an exact
resume needs.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from e2edict.errors import E2EDictError


def make_optimizer(
    params: list[torch.nn.Parameter] | list[dict[str, Any]],
    lr: float,
    kind: str = "adam",
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    warmup_steps: int = 0,
) -> torch.optim.Optimizer:
    """``kind``: adam, adamw or schedulefree. Adam and AdamW are torch's fused kernels where the
    device has them (one pass over each tensor per step, without the multi-tensor version's
    full-size temporaries). ``warmup_steps`` is used by the schedule-free optimizer only (the
    others warm up through `make_schedule`). ``params`` may be parameter groups (an adapter's, at
    its own learning rate); ``lr`` is then the default of those that give none."""
    betas = (float(betas[0]), float(betas[1]))
    if kind == "schedulefree":
        from schedulefree import AdamWScheduleFree

        opt = AdamWScheduleFree(params, lr=lr, betas=betas, weight_decay=weight_decay, warmup_steps=warmup_steps)
        opt.train()  # the parameters hold y from here on
        return opt
    if kind not in ("adam", "adamw"):
        raise E2EDictError(f"unknown train.optimizer {kind!r}; known: adam, adamw, schedulefree")
    cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
    try:
        return cls(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return cls(params, lr=lr, betas=betas, weight_decay=weight_decay)


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_factor: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine or linear decay to ``min_factor``, or constant."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * frac))
    return 1.0 - (1.0 - min_factor) * frac


def is_schedule_free(opt: torch.optim.Optimizer) -> bool:
    return "train_mode" in opt.param_groups[0]


def make_schedule(opt: torch.optim.Optimizer, train: Any, total_steps: int, warmup_steps: int) -> LambdaLR:
    """The learning-rate factor per step (``train`` is the config's `TrainConfig`). A schedule-free
    optimizer warms up by itself and takes no decay: its factor is 1 throughout."""
    if is_schedule_free(opt):
        return LambdaLR(opt, lambda s: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total_steps, warmup_steps, train.schedule, train.min_lr_factor)
    )


def optimizer_from_config(params: list, train: Any, warmup_steps: int) -> torch.optim.Optimizer:
    return make_optimizer(params, train.lr, train.optimizer, train.weight_decay, tuple(train.betas), warmup_steps)


@contextmanager
def averaged_weights(opt: torch.optim.Optimizer):
    """Inside: the parameters hold the weights to evaluate (a schedule-free optimizer's average
    ``x``; any other optimizer's parameters as they are). On leaving, the training weights ``y``
    are put back exactly as they were (copied, not recomputed: the schedule-free package's own
    ``train()`` recomputes them, which rounds)."""
    if not is_schedule_free(opt):
        yield
        return
    params = [p for g in opt.param_groups for p in g["params"]]
    kept = [p.detach().clone() for p in params]
    opt.eval()
    try:
        yield
    finally:
        with torch.no_grad():
            for p, k in zip(params, kept, strict=True):
                p.copy_(k)
        for g in opt.param_groups:
            g["train_mode"] = True


def finish_training(opt: torch.optim.Optimizer) -> None:
    """After the last step: leave the weights to save and evaluate in the parameters."""
    if is_schedule_free(opt):
        opt.eval()
