#!/usr/bin/env python
"""e2edict's training step on a GPU at the paper's GPT-2 setting, case by case.

GPT-2-small-shaped model with random weights (no hub needed), SAE at layer 6's residual input,
dictionary ratio 60 (46,080 latents), batch 8 x 1024 tokens: the setting of
``../shared/tools/gpu_check.py``, which measures the reference implementation (run it beside
this, in the same session, for the ratios). Each case runs in its own process and goes through
the trainer's own pieces (`e2edict.step.TrainStep`, the trainer's optimizer, precision settings
and read-back cadence), and reports:

- tokens/s over ``--steps`` steps after warm-up (values read back every 10 steps, as the trainer);
- peak GPU memory during those steps (everything: model, SAE, Adam state and the step), and the
  step's own share above what was allocated before it;
- FLOPs per token (``torch.utils.flop_counter``) and the achieved fraction of this card's
  measured bf16 matmul peak;
- ``compile``: the first step's time (compiling) and the steady rate under ``torch.compile``
  (both backbones), and with ``mode="reduce-overhead"`` (CUDA graphs, ``train.compile_mode``);
- ``eval`` / ``report``: `evaluate_saes` over 65,536 tokens (alive over 500k) and the HTML
  report on 64 sequences, with the host's resident-memory growth (nothing [tokens, d_sae] on it).

    python benchmarks/bench_gpu.py --device cuda --json out/bench_gpu.json
    python benchmarks/bench_gpu.py --device cpu --shape small --cases tl-e2e-relu   # a dry run of the code path
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_step import matmul_peak  # the same peak measurement as the step benchmark

SHAPES = {  # n_layers, d_model, n_heads, d_mlp, vocab, n_ctx, batch, layer
    "gpt2": (12, 768, 12, 3072, 50257, 1024, 8, 6),
    "small": (4, 64, 4, 256, 1000, 64, 4, 2),
}
# name: (backend, architecture, preset, k, precision, batch multiplier, compile: False or a torch.compile mode)
CASES = {
    "tl-e2e-relu": ("tl", "relu", "e2e", None, "bf16", 1, False),
    "tl-e2e-relu-tf32": ("tl", "relu", "e2e", None, "fp32", 1, False),
    "tl-e2e+ds-relu": ("tl", "relu", "e2e+ds", None, "bf16", 1, False),
    "tl-e2e-topk": ("tl", "topk", "e2e", 32, "bf16", 1, False),
    "tl-local-relu": ("tl", "relu", "local", None, "bf16", 1, False),
    "tl-local-topk": ("tl", "topk", "local", 32, "bf16", 1, False),
    "hf-e2e-relu": ("hf", "relu", "e2e", None, "bf16", 1, False),
    "hf-e2e+ds-relu": ("hf", "relu", "e2e+ds", None, "bf16", 1, False),
    "hf-e2e-topk": ("hf", "topk", "e2e", 32, "bf16", 1, False),
    "hf-local-relu": ("hf", "relu", "local", None, "bf16", 1, False),
    "tl-e2e-relu-b32": ("tl", "relu", "e2e", None, "bf16", 4, False),
    "eval-report": ("tl", "relu", "e2e", None, "fp32", 1, False),
    # the compiled cases last, so that a session cut short by its time box still has every case above
    "tl-e2e-relu-compile": ("tl", "relu", "e2e", None, "bf16", 1, "default"),
    "hf-e2e-relu-compile": ("hf", "relu", "e2e", None, "bf16", 1, "default"),
    "tl-e2e-relu-cudagraphs": ("tl", "relu", "e2e", None, "bf16", 1, "reduce-overhead"),
}
TARGET_L0 = 50  # a ReLU SAE at the L0 a trained one has, not the ~50% of a fresh one


def build_backbone(backend: str, shape: tuple, device: str):
    n_layers, d_model, n_heads, d_mlp, vocab, n_ctx, _, layer = shape
    torch.manual_seed(0)
    if backend == "tl":
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        from e2edict.backbones import TLBackbone

        cfg = HookedTransformerConfig(
            n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_model // n_heads, d_mlp=d_mlp,
            d_vocab=vocab, n_ctx=n_ctx, act_fn="gelu_new", normalization_type="LN", seed=0, device=device,
        )  # fmt: skip
        model = HookedTransformer(cfg)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return TLBackbone(model, "gpt2-shape"), f"blocks.{layer}.hook_resid_pre"
    from transformers import GPT2Config, GPT2LMHeadModel

    from e2edict.backbones import HFBackbone

    cfg = GPT2Config(vocab_size=vocab, n_positions=n_ctx, n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_inner=d_mlp)
    model = GPT2LMHeadModel(cfg).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return HFBackbone(model, None, "gpt2-shape"), f"transformer.h.{layer}:input"


def make_sae(bb, hook: str, arch: str, k: int | None, tokens: torch.Tensor, device: str):
    from e2edict.saes import registry

    d_in = bb.hook_shapes()[hook][0]
    torch.manual_seed(0)
    sae = registry[arch](d_in, 60 * d_in, hook, **({"k": k} if k else {})).to(device)
    if arch == "relu":
        with torch.no_grad():
            layer = bb.block_of(hook)
            got = {}
            bb.run_from(bb.embed_to(tokens[:2], layer), layer, {hook: lambda a: got.setdefault("a", a)}, logits=False)
            pre = got["a"].float() @ sae.W_enc + sae.b_enc
            q = torch.quantile(pre.flatten()[:: max(1, pre.numel() // 2_000_000)].float(), 1 - TARGET_L0 / sae.d_sae)
            sae.b_enc -= q
    return sae


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_case(name: str, shape: tuple, device: str, steps: int) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from e2edict.distributed import DistContext
    from e2edict.optim import make_optimizer
    from e2edict.presets import PRESETS
    from e2edict.splice import LossWeights
    from e2edict.step import StepLog, TrainStep

    backend, arch, preset, k, precision, mult, compile_ = CASES[name]
    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True  # train.tf32's default
        torch.backends.cudnn.allow_tf32 = True
    bb, hook = build_backbone(backend, shape, device)
    batch, n_ctx = shape[6] * mult, shape[5]
    vocab = shape[4]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (batch, n_ctx), generator=gen).to(device) for _ in range(4)]
    sae = make_sae(bb, hook, arch, k, batches[0], device)
    if precision == "bf16":
        bb.cast(torch.bfloat16)  # what the trainer does under train.precision: bf16
    step_saes = {hook: sae}
    if compile_:  # the whole forward compiled, as under train.compile
        sae.sparse_decode = False
    t = PRESETS[preset]
    ds = bb.resid_hooks_after(hook) if preset == "e2e+ds" else []
    w = LossWeights({hook: 1.0}, local=t.local, kl=t.kl, downstream=t.downstream, downstream_positions=ds)
    opt = make_optimizer(list(sae.parameters()), 5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    step = TrainStep(bb, {hook: sae}, step_saes, w, opt, sched, DistContext(device=device), 1.0, compile=compile_)
    log = StepLog()
    t0 = time.perf_counter()
    log.push(0, step([batches[0]]))
    sync(device)
    first = time.perf_counter() - t0
    for i in range(2):
        log.push(0, step([batches[i % 4]]))
    values = log.read(step.names)
    if on_gpu:
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    for i in range(steps):
        log.push(i, step([batches[i % 4]]))
        if i % 10 == 0:
            values = log.read(step.names)
    values = log.read(step.names) or values
    sync(device)
    elapsed = time.perf_counter() - t0
    out = {"case": name, "tokens_per_s": steps * batch * n_ctx / elapsed, "step_s": elapsed / steps, "first_step_s": first}
    out["l0"] = values[f"l0/{hook}"]
    out["loss"] = values["loss"]
    if on_gpu:
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["step_peak_gib"] = (torch.cuda.max_memory_allocated() - before) / 2**30
    # FLOPs of the same step run eagerly: under FlopCounterMode a compiled graph is counted twice
    # (once as traced, once as run), which doubled the compiled case's figure
    eager = TrainStep(bb, {hook: sae}, {hook: sae}, w, opt, sched, DistContext(device=device), 1.0)
    counter = FlopCounterMode(display=False)
    with counter:
        eager([batches[0]])
    out["flops_per_token"] = counter.get_total_flops() / (batch * n_ctx)
    return out


def rss_kb() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


def eval_report_case(shape: tuple, device: str) -> dict:
    from e2edict.analysis.report import write_report
    from e2edict.evaluation import evaluate_saes

    bb, hook = build_backbone("tl", shape, device)
    n_ctx, vocab = shape[5], shape[4]
    n_seq = -(-500_000 // n_ctx)
    seqs = torch.randint(0, vocab, (n_seq, n_ctx), generator=torch.Generator().manual_seed(1))
    sae = make_sae(bb, hook, "relu", None, seqs[:2].to(device), device)
    densities: dict = {}
    rss0 = rss_kb()
    sync(device)
    t0 = time.perf_counter()
    result = evaluate_saes(bb, {hook: sae}, seqs, tokens=65_536, alive_tokens=500_000, batch_size=8, densities=densities)
    sync(device)
    out = {"case": "eval-report", "eval_s": time.perf_counter() - t0, "eval_rss_growth_mb": (rss_kb() - rss0) / 1024}
    out["eval_l0"] = result["saes"][hook]["l0"]
    with tempfile.TemporaryDirectory() as tmp:
        rss0 = rss_kb()
        t0 = time.perf_counter()
        write_report(Path(tmp), bb, {hook: sae}, seqs[:64], result, "", densities, batch_size=8)
        out["report_s"] = time.perf_counter() - t0
        out["report_rss_growth_mb"] = (rss_kb() - rss0) / 1024
    out["dense_codes_host_mb"] = 65_536 * sae.d_sae * 4 / 2**20  # what holding them on the host would take
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="gpt2", choices=list(SHAPES))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = SHAPES[args.shape]
    if args.worker:
        res = eval_report_case(shape, args.device) if args.worker == "eval-report" else None
        res = res or train_case(args.worker, shape, args.device, args.steps)
        print(json.dumps(res))
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device here")
    peak = matmul_peak(os.cpu_count() or 1, args.device, torch.bfloat16)  # bench_step's measurement
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(f"device: {where}, torch {torch.__version__}, measured bf16 matmul peak {peak / 1e12:.1f} TFLOP/s", flush=True)
    rows = []
    for case in args.cases:
        cmd = [sys.executable, __file__, "--worker", case, "--device", args.device, "--shape", args.shape]
        r = subprocess.run([*cmd, "--steps", str(args.steps)], capture_output=True, text=True, env=os.environ)
        if r.returncode != 0:
            print(f"{case}: failed\n{r.stderr[-3000:]}", flush=True)
            continue
        row = json.loads(r.stdout.strip().splitlines()[-1])
        if "flops_per_token" in row:
            row["fraction_of_bf16_peak"] = row["flops_per_token"] * row["tokens_per_s"] / peak
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:  # after every case: a time box that cuts the run keeps what finished
            Path(args.json).write_text(json.dumps({"device": where, "bf16_peak_flops": peak, "rows": rows}, indent=2))
    by = {r["case"]: r for r in rows}
    print(f"\n{'case':<22} {'tok/s':>9} {'peak GiB':>9} {'step GiB':>9} {'GFLOP/tok':>9} {'of peak':>8} {'L0':>6}")
    for r in rows:
        if "tokens_per_s" in r:
            print(
                f"{r['case']:<22} {r['tokens_per_s']:>9.0f} {r.get('peak_gib', float('nan')):>9.2f} "
                f"{r.get('step_peak_gib', float('nan')):>9.2f} {r['flops_per_token'] / 1e9:>9.3f} "
                f"{r['fraction_of_bf16_peak']:>8.1%} {r['l0']:>6.1f}"
            )
    ratios = [
        ("e2e+ds / e2e", "tl-e2e+ds-relu", "tl-e2e-relu"),
        ("topk / relu (e2e)", "tl-e2e-topk", "tl-e2e-relu"),
        ("local / e2e", "tl-local-relu", "tl-e2e-relu"),
        ("hf / tl (e2e)", "hf-e2e-relu", "tl-e2e-relu"),
        ("compiled / eager", "tl-e2e-relu-compile", "tl-e2e-relu"),
        ("hf compiled / eager", "hf-e2e-relu-compile", "hf-e2e-relu"),
        ("cuda graphs / compiled", "tl-e2e-relu-cudagraphs", "tl-e2e-relu-compile"),
    ]
    for label, a, b in ratios:
        if a in by and b in by:
            print(f"{label:<22} {by[a]['tokens_per_s'] / by[b]['tokens_per_s']:.2f}x")
    for case in ("tl-e2e-relu-compile", "hf-e2e-relu-compile", "tl-e2e-relu-cudagraphs"):
        if case in by:
            print(f"{case}: first step (compiling) {by[case]['first_step_s']:.1f} s")
    if "eval-report" in by:
        e = by["eval-report"]
        print(
            f"eval {e['eval_s']:.1f} s (host RSS +{e['eval_rss_growth_mb']:.0f} MB), report {e['report_s']:.1f} s "
            f"(+{e['report_rss_growth_mb']:.0f} MB); dense codes would be {e['dense_codes_host_mb']:.0f} MB"
        )


if __name__ == "__main__":
    main()
