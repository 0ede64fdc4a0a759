"""What ``train.activation_checkpointing`` saves and costs: one e2e training step (forward, backward)
with and without it, each mode in its own fresh process, on a GPT-2-small-shaped model with random
weights (12 layers, d_model 768, vocabulary 50,257), TopK SAE (k 32, ratio 16) at
``blocks.POSITION.hook_resid_pre``.

Per mode: the bytes autograd keeps for backward (every saved tensor, counted through
``torch.autograd.graph.saved_tensors_hooks``), the peak resident memory the steps add to the process
(the kernel's peak resident set over the steps after a first one, minus the resident set before
them; the allocator keeps freed memory, as the trainer does), the median step time, and a checksum
of the SAE's gradients (the two modes must agree).

    python benchmarks/activation_checkpointing.py --json benchmarks/results/activation_checkpointing.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> None:
    """Start the kernel's peak resident set (VmHWM) again from the current one (Linux)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def peak_bytes() -> int:
    with open("/proc/self/status") as fh:
        line = next(x for x in fh if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def one_mode(checkpointed: bool, position: int, batch: int, n_ctx: int, steps: int) -> dict:
    import torch

    from e2edict.backbones import TLBackbone
    from e2edict.precision import keep_freed_memory
    from e2edict.saes import registry
    from e2edict.splice import LossWeights, training_forward

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_step import build_model

    keep_freed_memory()
    model = build_model("gpt2-shape", n_ctx)
    bb = TLBackbone(model, "gpt2-shape")
    hook = f"blocks.{position}.hook_resid_pre"
    torch.manual_seed(0)
    sae = registry["topk"](768, 16 * 768, hook, k=32)
    tokens = torch.randint(0, 50257, (batch, n_ctx), generator=torch.Generator().manual_seed(0))
    weights = LossWeights(sparsity={hook: 0.0}, kl=1.0)
    bb.checkpoint_blocks = checkpointed
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    times = []
    for i in range(steps + 1):  # the first step builds what every step reuses (the fused head): not measured
        if i == 1:
            times.clear()
            reset_peak()
            base = rss_bytes()
        sae.zero_grad(set_to_none=True)
        saved[0] = 0
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = training_forward(bb, {hook: sae}, tokens, weights)
        out.loss.backward()
        times.append(time.perf_counter() - start)
    peak = peak_bytes()
    return {
        "activation_checkpointing": checkpointed,
        "saved_for_backward_MB": saved[0] / 2**20,
        "peak_added_MB": max(0, peak - base) / 2**20,
        "step_s": sorted(times)[len(times) // 2],
        "grad_checksum": float(sum(p.grad.double().abs().sum() for p in sae.parameters() if p.grad is not None)),
        "loss": out.loss.item(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--position", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--n-ctx", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--one", choices=["plain", "checkpointed"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print("ROW " + json.dumps(one_mode(a.one == "checkpointed", a.position, a.batch, a.n_ctx, a.steps)), flush=True)
        return 0
    rows = []
    for mode in ("plain", "checkpointed"):
        cmd = [sys.executable, __file__, "--one", mode, "--position", str(a.position), "--batch", str(a.batch),
               "--n-ctx", str(a.n_ctx), "--steps", str(a.steps)]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [x for x in res.stdout.splitlines() if x.startswith("ROW ")]
        if res.returncode != 0 or not lines:
            raise SystemExit(f"{mode} failed:\n{res.stderr[-2000:]}")
        rows.append(json.loads(lines[-1][4:]))
    plain, ckpt = rows
    print(f"GPT-2-small shape, TopK SAE at blocks.{a.position}.hook_resid_pre, e2e, batch {a.batch} x {a.n_ctx}, fp32 CPU")
    print(f"{'mode':<14}{'saved for backward MB':>24}{'peak added MB':>16}{'step s':>9}{'loss':>12}")
    for r in rows:
        name = "checkpointed" if r["activation_checkpointing"] else "plain"
        print(f"{name:<14}{r['saved_for_backward_MB']:>24.1f}{r['peak_added_MB']:>16.1f}{r['step_s']:>9.2f}{r['loss']:>12.6f}")
    same = abs(plain["grad_checksum"] - ckpt["grad_checksum"]) <= 1e-6 * abs(plain["grad_checksum"])
    print(f"saved: {ckpt['saved_for_backward_MB'] / plain['saved_for_backward_MB']:.2f}x, peak: "
          f"{ckpt['peak_added_MB'] / max(plain['peak_added_MB'], 1e-9):.2f}x, time: {ckpt['step_s'] / plain['step_s']:.2f}x; "
          f"gradients equal: {same}")  # fmt: skip
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"args": vars(a) | {"json": str(a.json)}, "rows": rows}, indent=1) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
