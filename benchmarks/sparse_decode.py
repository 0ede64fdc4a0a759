#!/usr/bin/env python
"""When does the sparse path beat the dense one? One SAE training step (forward, backward) of a
TopK SAE in both modes, side by side in one process, for a range of k / d_sae. TopK's sparse path
gathers k rows per token (`TopKEncode`, `decode_fixed_k`); its crossover sets
`e2edict.saes.base.TOPK_GATHER_FRACTION`. (ReLU's and JumpReLU's ragged path, whose crossover
`SPARSE_DECODE_FRACTION` is, follows the active fraction; the embedded model's ReLU SAEs are far above it.)

    python benchmarks/sparse_decode.py [--d-in 768] [--d-sae 24576] [--tokens 512] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch

from e2edict.saes import TopKSAE


def best_of(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-in", type=int, default=768)
    ap.add_argument("--d-sae", type=int, default=24576)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.d_in, device=args.device)
    print(f"d_in {args.d_in}, d_sae {args.d_sae}, {args.tokens} tokens, {args.device}; SAE forward + backward")
    print(f"{'k':>6} {'k/d_sae':>9} {'dense ms':>9} {'sparse ms':>10} {'speed-up':>9} {'max |diff|':>11}")
    for k in (8, 32, 128, 256, 512, 1024, 2048):
        if k > args.d_sae:
            continue
        sae = TopKSAE(args.d_in, args.d_sae, k=k).to(args.device)
        outputs = {}

        def step(sparse: bool, sae=sae, outputs=outputs) -> None:
            sae.sparse_decode = sparse
            sae.zero_grad(set_to_none=True)
            x_hat, c = sae(x)
            ((x_hat - x).square().mean() + 1e-3 * c.sum()).backward()
            outputs[sparse] = x_hat.detach()
            if args.device != "cpu":
                torch.cuda.synchronize()

        td, ts = best_of(lambda: step(False), args.reps), best_of(lambda: step(True), args.reps)
        diff = (outputs[False] - outputs[True]).abs().max().item()
        print(f"{k:>6} {k / args.d_sae:>9.5f} {td * 1e3:>9.1f} {ts * 1e3:>10.1f} {td / ts:>8.2f}x {diff:>11.2e}")


if __name__ == "__main__":
    main()
