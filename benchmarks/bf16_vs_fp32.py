#!/usr/bin/env python
"""Numerics of bf16 training against fp32: the same 200-step run (configs/tiny/e2e.yaml, 409,600
tokens) at ``train.precision: fp32`` and ``bf16``; prints the final evaluation's KL, CE-loss
increase and L0 of each and their relative differences (target: KL and L0 within 3%).

    python benchmarks/bf16_vs_fp32.py [--device cuda] [--out out/bf16-vs-fp32]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import e2edict
from e2edict.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=409_600)
    ap.add_argument("--out", default="out/bf16-vs-fp32")
    args = ap.parse_args()
    results = {}
    for precision in ("fp32", "bf16"):
        overrides = [f"train.precision={precision}", f"train.tokens={args.tokens}", f"model.device={args.device}"]
        cfg = load_config(ROOT / "configs/tiny/e2e.yaml", overrides)
        t0 = time.perf_counter()
        run = e2edict.train(cfg, out=Path(args.out) / precision, overwrite=True, progress=False)
        ev = json.loads((run / "eval.json").read_text())
        ((hook, m),) = ev["saes"].items()
        results[precision] = {
            "kl": ev["kl"],
            "ce_loss_increase": ev["ce_loss_increase"],
            "l0": m["l0"],
            "s": time.perf_counter() - t0,
        }
        print(precision, json.dumps(results[precision]), flush=True)
    for k in ("kl", "l0", "ce_loss_increase"):
        a, b = results["fp32"][k], results["bf16"][k]
        print(f"{k:18s} fp32 {a:.5f}  bf16 {b:.5f}  relative difference {abs(b - a) / abs(a):.2%}")


if __name__ == "__main__":
    main()
