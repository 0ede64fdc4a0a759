#!/usr/bin/env python
"""When does TopK's gather decode (embedding_bag) beat the dense ``c @ D``? Forward + backward of
the decode alone, side by side in one process, for a range of k / d_sae. The crossover sets
`e2edict.saes.topk.SPARSE_DECODE_FRACTION`.

    python benchmarks/sparse_decode.py [--d-in 768] [--d-sae 46080] [--tokens 1024] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch

from e2edict.saes import TopKSAE


def bench(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-in", type=int, default=768)
    ap.add_argument("--d-sae", type=int, default=46080)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"d_in {args.d_in}, d_sae {args.d_sae}, {args.tokens} tokens, {args.device}")
    print(f"{'k':>6} {'k/d_sae':>9} {'dense ms':>9} {'gather ms':>10} {'speed-up':>9} {'max |diff|':>11}")
    for k in (8, 32, 128, 512, 2048):
        if k > args.d_sae:
            continue
        sae = TopKSAE(args.d_in, args.d_sae, k=k).to(args.device)
        x = torch.randn(args.tokens, args.d_in, device=args.device)
        c, vals, idx = sae._topk(x)
        c, vals = c.detach(), vals.detach()

        def dense(sae=sae, c=c):
            sae.zero_grad(set_to_none=True)
            sae.decode(c).square().sum().backward()

        def gather(sae=sae, vals=vals, idx=idx):
            sae.zero_grad(set_to_none=True)
            sae.decode_sparse(vals, idx).square().sum().backward()

        diff = (sae.decode(c) - sae.decode_sparse(vals, idx)).abs().max().item()
        td, tg = bench(dense, args.reps), bench(gather, args.reps)
        print(f"{k:>6} {k / args.d_sae:>9.5f} {td * 1e3:>9.1f} {tg * 1e3:>10.1f} {td / tg:>8.2f}x {diff:>11.2e}")


if __name__ == "__main__":
    main()
