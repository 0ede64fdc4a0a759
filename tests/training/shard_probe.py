"""Run under torchrun by tests/training/test_sharding.py: prepare a sharded run and measure the
share of the frozen model's weights each rank holds at the start, during a step, right after a step's backward
(before the step releases anything), after the whole step, and after an evaluation; every
registered weight counted by the bytes its storage holds (a freed gather holds none)."""

import json
import sys

import torch

from e2edict.config import load_config
from e2edict.distributed import close_distributed, init_distributed
from e2edict.evaluation import brief_evaluation
from e2edict.preparation import prepare


def held_fraction(model: torch.nn.Module) -> float:
    held = total = 0
    for p in model.parameters():
        if p.requires_grad:
            continue
        local = p.to_local() if hasattr(p, "to_local") else p
        total += p.numel() * p.element_size()
        held += local.untyped_storage().nbytes()
    return held / total


def main(config: str, out: str, result: str, *overrides: str) -> None:
    cfg = load_config(config, list(overrides))
    ctx = init_distributed(cfg.model.device, "gloo", 120)
    try:
        run = prepare(cfg, ctx, out)
        model, b = run.setup.backbone.model, cfg.train.batch_size
        figures = {"start": held_fraction(model)}
        x = run.batches.next()[ctx.rank * b : (ctx.rank + 1) * b]
        run.step.prefix(x)  # the root's weights (embeddings, head) are gathered for the step from here
        figures["during_step"] = held_fraction(model)
        run.step.forward_backward([x])
        figures["after_backward"] = held_fraction(model)
        run.step.opt.zero_grad(set_to_none=True)
        run.step([run.batches.next()[ctx.rank * b : (ctx.rank + 1) * b]])
        figures["after_step"] = held_fraction(model)
        brief_evaluation(run.setup.backbone, run.saes, run.setup.eval_seqs, 512, 4)
        run.step.sharded.release()
        figures["after_evaluation"] = held_fraction(model)
        with open(f"{result}.{ctx.rank}.json", "w") as f:
            json.dump(figures, f)
    finally:
        close_distributed(ctx)


if __name__ == "__main__":
    main(*sys.argv[1:])
