"""The training step as one unit: micro-batches in, one vector of device tensors out.

Nothing inside the step reads a value back to the host. Everything the loop logs or guards (each
loss term, L0, the gradient norm before clipping, every parameter's gradient norm, the weights'
norms after the update) comes back as one fp32 vector on the device, and the loop reads the
vectors of several steps at once, at its log steps (`StepLog`). On a GPU the host thus queues
steps ahead of the device instead of waiting on it three times per step, and a compiler sees a
step with static shapes. A NaN or Inf still names its first step and term: the vectors of every
step are kept until they are read, and they are read before anything is written to disk.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch

from e2edict.backbones.base import Backbone
from e2edict.distributed import DistContext
from e2edict.errors import E2EDictError
from e2edict.losses import mean_l0
from e2edict.saes import SAE
from e2edict.splice import LossWeights, Prefix, hooked_positions, shared_prefix, training_forward_from

_GRAD_PREFIX, _WEIGHT_PREFIX = "grad_norm/", "weight_norm/"


class NonFinite(E2EDictError):
    """A NaN or Inf in a logged quantity; ``what`` names it, ``step`` is the first step it appeared."""

    def __init__(self, what: str, step: int):
        super().__init__(f"NaN or Inf in the {what} at step {step}")
        self.what, self.step = what, step


@dataclass
class TrainStep:
    """Forward, backward, clipping and the optimizer update of one step (all micro-batches)."""

    backbone: Backbone
    saes: dict[str, SAE]  # the SAEs themselves (names of parameters)
    step_saes: dict[str, torch.nn.Module]  # what the forward calls: the SAEs, or DDP / compiled wrappers
    weights: LossWeights
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    ctx: DistContext
    max_grad_norm: float | None = None
    # torch.compile the forward after the shared prefix (model, SAEs, losses, fused head; backward
    # follows): False, True, or a torch.compile mode ("reduce-overhead": CUDA graphs on a GPU)
    compile: bool | str = False
    project_decoders: bool = False  # saes.decoder_norm=project: rows kept unit by gradient projection + renormalisation
    adapter: Any = None  # an `e2edict.adapters.Adapter` trained in the same step, or None
    sharded: Any = None  # the model's `e2edict.distributed.ShardedModel` under train.shard_model, or None
    names: list[str] = field(default_factory=list)  # the entries of the returned vector, after the first call

    def __post_init__(self) -> None:
        self.named = [(f"{h}.{n}", p) for h, s in self.saes.items() for n, p in s.named_parameters() if p.requires_grad]
        if self.adapter is not None:
            self.named += [(f"adapter.{n}", p) for n, p in self.adapter.named_parameters()]
        self.params = [p for _, p in self.named]
        # the positions inside blocks get lasting hooks before the first (compiled) run
        self.backbone.keep_hooks(hooked_positions(self.saes, self.weights))
        mode = self.compile if isinstance(self.compile, str) and self.compile != "default" else None
        self.forward = torch.compile(self._forward, dynamic=False, mode=mode) if self.compile else self._forward
        # CUDA graphs replay into the same output memory: each micro-batch starts a new "step" for
        # them, as its terms are copied (`forward_backward`) and its backward has run by the next one
        self._graph_steps = mode == "reduce-overhead"

    def prefix(self, x: torch.Tensor) -> Prefix:
        """The micro-batch's shared prefix (no graph), computed before the compiled region."""
        return shared_prefix(self.backbone, self.step_saes, x, self.weights.needs_output)

    def _forward(self, start: Prefix) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one micro-batch from its shared prefix, and the logged terms: each loss
        term, the loss, and L0 (`mean_l0`). One graph under compile: the backbones call their
        blocks in turn (`TLBackbone._run_plain`, `HFBackbone._run_plain`), with the hooks inside
        blocks kept registered (`Backbone.keep_hooks`, above)."""
        out = training_forward_from(self.backbone, self.step_saes, start, self.weights)
        terms = {**out.terms, "loss": out.loss}
        for h, c in out.codes.items():
            terms[f"l0/{h}"] = mean_l0(c)
        return out.loss, terms

    def __call__(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        terms = self.forward_backward(micro_batches)
        if self.adapter is not None:  # DDP averages the SAEs' gradients; the adapter's are averaged here
            self.ctx.average_grads(self.adapter.parameters())
        values = self.ctx.mean(torch.stack(list(terms.values())))  # logged values: the mean over ranks
        if self.project_decoders:  # before clipping, so the clip sees the gradient that is applied
            for s in self.saes.values():
                s.project_decoder_grad()
        grad_norms, total = self.clip_gradients()
        self.opt.step()
        if self.project_decoders:
            for s in self.saes.values():
                s.renormalize_decoder()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        if self.sharded is not None:  # the model's gathered weights freed until the next step
            self.sharded.release()
        with torch.no_grad():
            weight_norms = torch.stack(torch._foreach_norm(self.params)).float()
        if not self.names:  # the same entries every step
            params = [p for p, _ in self.named]
            self.names = [*terms, "grad_norm", *(_GRAD_PREFIX + n for n in params), *(_WEIGHT_PREFIX + n for n in params)]
        return torch.cat([values, total.float()[None], grad_norms, weight_norms])

    def forward_backward(self, micro_batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Mean over micro-batches of each loss term and L0 (detached, on the device); gradients accumulate."""
        n = len(micro_batches)
        acc: dict[str, torch.Tensor] = {}
        for i, x in enumerate(micro_batches):
            with ExitStack() as no_sync:
                if self.ctx.enabled and i < n - 1:  # DDP averages once, after the last micro-batch
                    for m in self.step_saes.values():
                        no_sync.enter_context(m.no_sync())
                start = self.prefix(x)
                if self._graph_steps:
                    torch.compiler.cudagraph_mark_step_begin()
                loss, terms = self.forward(start)
                (loss / n).backward()
            for k, v in terms.items():
                acc[k] = acc.get(k, 0.0) + v.detach().float() / n
        return acc

    def clip_gradients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each parameter's gradient norm and the total (before clipping); clip to ``max_grad_norm``
        on the device (what `torch.nn.utils.clip_grad_norm_` does, keeping the per-parameter norms)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        with torch.no_grad():
            norms = torch.stack(torch._foreach_norm(grads)).float()
            total = torch.linalg.vector_norm(norms)
            if self.max_grad_norm:
                coef = (self.max_grad_norm / (total + 1e-6)).clamp(max=1.0)
                torch._foreach_mul_(grads, coef)
        return norms, total


class StepLog:
    """The vectors of the steps not yet read, read back in one transfer."""

    def __init__(self) -> None:
        self.pending: list[tuple[int, torch.Tensor]] = []

    def push(self, step: int, vector: torch.Tensor) -> None:
        self.pending.append((step, vector.detach()))

    def read(self, names: list[str]) -> dict[str, float] | None:
        """The newest step's values (None if nothing is pending); raises `NonFinite` naming the first
        step and quantity that is not finite among every step pending."""
        if not self.pending:
            return None
        rows = torch.stack([v for _, v in self.pending]).cpu().tolist()
        steps = [s for s, _ in self.pending]
        self.pending.clear()
        for step, row in zip(steps, rows, strict=True):
            bad = [k for k, v in zip(names, row, strict=True) if not math.isfinite(v)]
            if bad:
                raise NonFinite(_describe(bad), step)
        return {k: v for k, v in zip(names, rows[-1], strict=True) if not k.startswith((_GRAD_PREFIX, _WEIGHT_PREFIX))}


def _describe(bad: list[str]) -> str:
    """What the first non-finite entries of a step were: a loss term, else gradients, else weights."""
    terms = [k for k in bad if not k.startswith((_GRAD_PREFIX, _WEIGHT_PREFIX)) and k != "grad_norm"]
    if terms:
        return f"loss term {terms[0]!r}"
    grads = [k.removeprefix(_GRAD_PREFIX) for k in bad if k.startswith(_GRAD_PREFIX)]
    if grads or "grad_norm" in bad:
        return f"gradient of {', '.join(grads) or 'the SAE parameters'}"
    return "SAE weights after the optimizer step"
