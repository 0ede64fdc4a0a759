#!/usr/bin/env python
"""Is `train.compile` worth its compile time? The e2e step of a ReLU SAE on the embedded model,
eager and compiled (`TrainStep(compile=...)`, as the trainer builds it), side by side in one
process: the first compiled step's time (compiling included), then the steady step times of both
in interleaved rounds (medians), and after how many steps compiling has paid for itself.

    python benchmarks/compile_step.py [--backend huggingface|transformer_lens] [--mode reduce-overhead]
        [--batch 8] [--n-ctx 128] [--rounds 16] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from e2edict.distributed import DistContext
from e2edict.optim import make_optimizer
from e2edict.saes.relu import ReLUSAE
from e2edict.splice import LossWeights
from e2edict.step import TrainStep

HOOKS = {"huggingface": "transformer.h.1:input", "transformer_lens": "blocks.1.hook_resid_pre"}


def build_step(bb, hook: str, device: str, compile_: bool | str) -> TrainStep:
    torch.manual_seed(0)
    sae = ReLUSAE(128, 1024, hook_name=hook).to(device)
    sae.sparse_decode = False  # what train.compile sets: static shapes (the same dense path in both)
    w = LossWeights(sparsity={hook: 1.0}, kl=1.0)
    opt = make_optimizer(list(sae.parameters()), 1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return TrainStep(bb, {hook: sae}, {hook: sae}, w, opt, sched, DistContext(device=device), 1.0, compile=compile_)


def timed(step: TrainStep, x: torch.Tensor, device: str) -> float:
    t0 = time.perf_counter()
    step([x]).sum().item()  # one read-back: the step has finished on the device
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="huggingface", choices=list(HOOKS))
    ap.add_argument("--mode", default="default", help="torch.compile mode (train.compile_mode)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--n-ctx", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    from e2edict.run import open_backbone

    bb = open_backbone("tiny", backend=args.backend, device=args.device)
    hook = HOOKS[args.backend]
    steps = {"eager": build_step(bb, hook, args.device, False), "compiled": build_step(bb, hook, args.device, args.mode)}
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randint(1, bb.d_vocab, (args.batch, args.n_ctx), generator=gen).to(args.device) for _ in range(4)]
    first = timed(steps["compiled"], xs[0], args.device)
    timed(steps["eager"], xs[0], args.device)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for r in range(args.rounds):
        for mode in ("eager", "compiled") if r % 2 else ("compiled", "eager"):
            times[mode].append(timed(steps[mode], xs[r % 4], args.device))
    eager, compiled = statistics.median(times["eager"]), statistics.median(times["compiled"])
    gain = eager - compiled
    result = {
        "backend": args.backend,
        "mode": args.mode,
        "device": args.device,
        "tokens_per_step": args.batch * args.n_ctx,
        "first_compiled_step_s": first,
        "eager_step_s": eager,
        "compiled_step_s": compiled,
        "compiled_speedup": eager / compiled,
        "break_even_steps": first / gain if gain > 0 else None,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
