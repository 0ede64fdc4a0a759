#!/usr/bin/env python
"""One training step of e2edict against a naive reference, side by side, on this machine.

For each case it reports tokens/s, peak memory of the step, FLOPs counted with
`torch.utils.flop_counter` and the achieved fraction of this machine's measured matmul peak,
for e2edict's step ("ours") and for a naive step that does what the reference implementation
does: two full forward passes (clean, then spliced), a dense SAE, full log-softmax of both
logits, then backward. Both start from the same SAE weights and tokens; their losses are shown
side by side (equal to 1e-5 in fp32). Each case runs both modes in one process for the timing
(their steps interleaved, each mode's best step reported) and again in one process for memory:
the peak resident set during one step of each mode, above the level before it, with large
allocations served by their own mappings so that the resident set follows the live tensors.
On the CPU in fp32, each local/e2e pair of cases (`PAIRS`) is also timed side by side: both of
e2edict's steps in one process, alternating (`pair_worker`), the ratio the local-step target reads.

    python benchmarks/bench_step.py                 # every case
    python benchmarks/bench_step.py --cases gpt2-topk --reps 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

CASES = {
    # name: (model, hook, architecture, preset, dict_ratio, k, batch, n_ctx, target L0)
    "tiny-local": ("tiny", "blocks.2.hook_resid_pre", "relu", "local", 16, None, 16, 128, None),
    "tiny-e2e": ("tiny", "blocks.2.hook_resid_pre", "relu", "e2e", 16, None, 16, 128, None),
    "tiny-e2e+ds": ("tiny", "blocks.2.hook_resid_pre", "relu", "e2e+ds", 16, None, 16, 128, None),
    "gpt2-topk": ("gpt2-shape", "blocks.6.hook_resid_pre", "topk", "e2e", 60, 32, 4, 64, None),
    "gpt2-relu": ("gpt2-shape", "blocks.6.hook_resid_pre", "relu", "e2e", 60, None, 4, 64, 50),
    "gpt2-local-topk": ("gpt2-shape", "blocks.6.hook_resid_pre", "topk", "local", 60, 32, 4, 64, None),
    "gpt2-local-relu": ("gpt2-shape", "blocks.6.hook_resid_pre", "relu", "local", 60, None, 4, 64, 50),
}


def build_model(name: str, n_ctx: int, device: str = "cpu"):
    if name == "tiny":
        import e2edict

        return e2edict.load_model("tiny", device=device)
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=12,
        d_model=768,
        n_heads=12,
        d_head=64,
        d_mlp=3072,
        d_vocab=50257,
        n_ctx=n_ctx,
        act_fn="gelu_new",
        normalization_type="LN",
        seed=0,
        device=device,
    )
    model = HookedTransformer(cfg)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def case_setup(case: str, device: str):
    """What every step of ``case`` shares: the model, its backbone, the SAE's input width and the
    tokens (seed 0)."""
    from e2edict.backbones import TLBackbone

    model_name, hook, _, _, _, _, batch, n_ctx, _ = CASES[case]
    model = build_model(model_name, n_ctx, device)
    bb = TLBackbone(model, model_name)
    d_in = bb.hook_shapes()[hook][0]
    tokens = torch.randint(0, model.cfg.d_vocab, (batch, n_ctx), generator=torch.Generator().manual_seed(0)).to(device)
    return model, bb, d_in, tokens


def loss_weights(case: str, bb):
    """e2edict's loss weights for the case's preset (sparsity coefficient 1, as naive's)."""
    from e2edict.presets import PRESETS
    from e2edict.splice import LossWeights

    _, hook, _, preset, *_ = CASES[case]
    ds = bb.resid_hooks_after(hook) if preset == "e2e+ds" else []
    table = PRESETS[preset]
    return LossWeights(
        sparsity={hook: 1.0}, local=table.local, kl=table.kl, downstream=table.downstream, downstream_positions=ds
    )


def starting_sae(case: str, model, d_in: int, tokens: torch.Tensor, device: str):
    """The case's SAE at its starting weights (seed 0); a ReLU SAE with a target L0 gets its
    encoder bias shifted to the L0 a trained one has, not the ~50% of a fresh one."""
    from e2edict.saes import registry

    _, hook, arch, _, ratio, k, _, _, target_l0 = CASES[case]
    torch.manual_seed(0)
    sae = registry[arch](d_in, ratio * d_in, hook, **({"k": k} if k else {})).to(device)
    if target_l0:
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=hook)
            pre = cache[hook] @ sae.W_enc + sae.b_enc
            sae.b_enc -= torch.quantile(pre.flatten()[:: max(1, pre.numel() // 2_000_000)], 1 - target_l0 / sae.d_sae)
    return sae


def naive_step(model, sae, hook, tokens, lam, preset, ds_hooks):
    """The reference algorithm: full clean pass, full spliced pass, dense SAE, full log-softmax."""
    clean_acts: dict = {}
    with torch.no_grad():
        logits_clean = model.run_with_hooks(
            tokens, fwd_hooks=[(h, lambda a, hook: clean_acts.__setitem__(hook.name, a)) for h in ds_hooks + [hook]]
        )
    store: dict = {}
    spliced_acts: dict = {}

    def splice(act, hook):
        c = torch.relu(act @ sae.W_enc + sae.b_enc) if sae.architecture == "relu" else sae.encode(act)
        out = c @ sae.normalized_decoder() + sae.b_dec  # dense decode
        store.update(a=act, out=out, c=c)
        return out

    if preset == "local":
        splice(clean_acts[hook], None)
        loss = ((store["out"] - store["a"]) ** 2).mean()
    else:
        hooks = [(hook, splice)] + [(h, lambda a, hook: spliced_acts.__setitem__(hook.name, a)) for h in ds_hooks]
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
        lp_clean = F.log_softmax(logits_clean, -1)
        lp_spliced = F.log_softmax(logits, -1)
        kl = (lp_clean.exp() * (lp_clean - lp_spliced)).sum(-1).mean()
        loss = kl if preset == "e2e" else 0.5 * kl
        if preset == "e2e+ds":
            loss = loss + 2.5 / len(ds_hooks) * sum(((spliced_acts[h] - clean_acts[h]) ** 2).mean() for h in ds_hooks)
    c = store["c"]
    return loss + lam * c.norm(p=1, dim=-1).mean() / sae.d_in


def worker(spec: dict) -> dict:
    """Both modes of one case in this process: the same model, tokens and starting SAE weights.

    ``measure == "time"``: steps alternate between the modes (naive, ours, ours, naive, ...), so a
    slow moment of the shared machine falls on both; each mode's best step counts. ``"memory"``:
    one step per mode, each with the peak-RSS mark reset before it."""
    from e2edict.backbones.tl_attention import use_fused_attention, use_unfused_attention
    from e2edict.optim import make_optimizer
    from e2edict.precision import keep_freed_memory
    from e2edict.splice import training_forward

    torch.set_num_threads(spec["threads"])
    device, bf16 = spec["device"], spec["precision"] == "bf16"
    on_gpu = device.startswith("cuda")
    if spec["measure"] == "time" and not on_gpu:  # the trainer's CPU setting (train.reuse_cpu_memory), both modes
        keep_freed_memory()
    _, hook, _, preset, _, _, batch, n_ctx, _ = CASES[spec["case"]]
    model, bb, d_in, tokens = case_setup(spec["case"], device)
    w = loss_weights(spec["case"], bb)
    ds = w.downstream_positions

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    def tf32(on: bool) -> None:  # the trainer's train.tf32 for ours; the reference's fp32 for naive
        if on_gpu:
            torch.backends.cuda.matmul.allow_tf32 = on

    def make_sae():
        return starting_sae(spec["case"], model, d_in, tokens, device)

    modes = {}
    for mode in ("naive", "ours"):
        sae = make_sae()
        if mode == "naive":  # the reference: dense SAE, torch's default (multi-tensor) Adam
            sae.sparse_decode = False
            opt = torch.optim.Adam(sae.parameters(), lr=1e-4)

            def step(sae=sae):
                tf32(False)
                use_unfused_attention(model)  # the reference runs TransformerLens's own attention
                try:
                    loss = naive_step(model, sae, hook, tokens, 1.0, preset, ds)
                    loss.backward()
                finally:
                    use_fused_attention(model)
                return loss
        else:
            opt = make_optimizer(list(sae.parameters()), 1e-4)

            def step(sae=sae):
                tf32(True)
                with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                    out = training_forward(bb, {hook: sae}, tokens, w)
                out.loss.backward()
                return out.loss

        modes[mode] = (sae, opt, step)

    from torch.utils.flop_counter import FlopCounterMode

    results = {}
    for mode, (sae, opt, step) in modes.items():
        with torch.no_grad():
            codes = sae.encode(model.run_with_cache(tokens, names_filter=hook)[1][hook])
            l0 = (codes != 0).sum(-1).float().mean().item()
        # Adam's state (zero gradients leave the weights unchanged), so that it is not counted as the step's
        for p in sae.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss0 = step().item()  # the loss at the starting weights, for the side-by-side check
        opt.zero_grad(set_to_none=True)
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        opt.step()  # the warm-up step
        opt.zero_grad(set_to_none=True)
        results[mode] = {"case": spec["case"], "mode": mode, "loss": loss0, "l0": l0, "flops": counter.get_total_flops()}

    def one_step(mode: str) -> None:
        _, opt, step = modes[mode]
        step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()

    if spec["measure"] == "memory":  # one step each: the high-water mark above the model, SAEs and optimizer state
        for mode in modes:
            if on_gpu:
                sync()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                one_step(mode)
                results[mode] = {"peak_mem_mb": (torch.cuda.max_memory_allocated() - base) / 2**20}
            else:
                base = reset_peak_rss()
                one_step(mode)
                results[mode] = {"peak_mem_mb": (peak_rss() - base) / 1024}
        return results
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for rep in range(spec["reps"]):
        for mode in ("naive", "ours") if rep % 2 == 0 else ("ours", "naive"):
            sync()
            t = time.perf_counter()
            one_step(mode)
            times[mode].append(time.perf_counter() - t)
    for mode, r in results.items():
        r["step_s"] = min(times[mode])
        r["tokens_per_s"] = batch * n_ctx / r["step_s"]
    return results


PAIRS = [("gpt2-local-topk", "gpt2-topk"), ("gpt2-local-relu", "gpt2-relu"), ("tiny-local", "tiny-e2e")]


def pair_worker(spec: dict) -> dict:
    """e2edict's local and e2e steps of one shape (the cases of ``spec["pair"]``: the same model,
    hook, SAE and tokens, only the preset differs) in one process, their steps alternating
    (local, e2e, e2e, local, ...) so that a slow moment of the shared machine falls on both; each
    step's best time counts. Both SAEs start from the same weights."""
    from e2edict.optim import make_optimizer
    from e2edict.precision import keep_freed_memory
    from e2edict.splice import training_forward

    torch.set_num_threads(spec["threads"])
    keep_freed_memory()
    cases = spec["pair"]
    if len({CASES[c][:3] + CASES[c][4:] for c in cases}) != 1:
        raise SystemExit(f"{cases}: a pair must differ in the preset only")
    hook = CASES[cases[0]][1]
    model, bb, d_in, tokens = case_setup(cases[0], "cpu")
    steps = {}
    for case in cases:
        w = loss_weights(case, bb)
        sae = starting_sae(case, model, d_in, tokens, "cpu")
        opt = make_optimizer(list(sae.parameters()), 1e-4)

        def step(sae=sae, w=w, opt=opt) -> None:
            training_forward(bb, {hook: sae}, tokens, w).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # warm-up: the optimizer's state and the allocator's heap
        steps[case] = step
    times: dict[str, list[float]] = {c: [] for c in cases}
    for rep in range(spec["reps"]):
        for case in cases if rep % 2 == 0 else cases[::-1]:
            t = time.perf_counter()
            steps[case]()
            times[case].append(time.perf_counter() - t)
    return {c: min(ts) for c, ts in times.items()}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux) and return the current RSS in kB."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _status_kb("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_rss() -> int:
    try:
        return _status_kb("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# The memory run: every allocation of 64 KiB or more is its own mapping, returned to the system
# when freed, so the resident set follows the live tensors and its peak is the step's tensor
# high-water mark, not the allocator's cached free memory. Timing runs in a separate process
# with the default allocator, because per-allocation mappings slow small tensors down.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def matmul_peak(threads: int, device: str = "cpu", dtype: torch.dtype = torch.float32, rounds: int = 5) -> float:
    """The best of a few rounds of square matmuls (a shared machine's slow moments excluded):
    2048^2 on CPU, 8192^2 on a GPU (fp32 without TF32, or bf16)."""
    torch.set_num_threads(threads)
    on_gpu = device.startswith("cuda")
    n = 8192 if on_gpu else 2048
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = False
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(rounds):
        if on_gpu:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(3):
            a @ b
        if on_gpu:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 3 * 2 * n**3 / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N on a GPU machine")
    ap.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="ours: bf16 = autocast over the fp32 model (bench_gpu.py measures the trainer's bf16-held model); naive stays fp32",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(pair_worker(spec) if "pair" in spec else worker(spec)))
        return
    on_gpu = args.device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device here")
    ours_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    def peaks() -> dict[str, float]:  # naive runs fp32; ours at its precision
        fp32 = matmul_peak(args.threads, args.device)
        return {
            "naive": fp32,
            "ours": fp32 if ours_dtype == torch.float32 else matmul_peak(args.threads, args.device, ours_dtype),
        }

    peak = peaks()
    where = torch.cuda.get_device_name(args.device) if on_gpu else f"{os.cpu_count()} CPUs, {args.threads} threads"
    print(
        f"machine: {where}, torch {torch.__version__}, ours in {args.precision}; matmul peak fp32 "
        f"{peak['naive'] / 1e9:.1f}, ours' precision {peak['ours'] / 1e9:.1f} GFLOP/s"
    )
    results = []
    for case in args.cases:
        out: dict[str, dict] = {"naive": {}, "ours": {}}
        for measure, env in (("time", {}), ("memory", MEMORY_ENV)):
            spec = {"case": case, "reps": args.reps, "threads": args.threads, "measure": measure}
            spec.update(device=args.device, precision=args.precision)
            r = subprocess.run(
                [sys.executable, __file__, "--worker", json.dumps(spec)],
                capture_output=True,
                text=True,
                env={**os.environ, **env},
            )
            if r.returncode != 0:
                raise SystemExit(f"{case} ({measure}) failed:\n{r.stderr[-2000:]}")
            for mode, values in json.loads(r.stdout.strip().splitlines()[-1]).items():
                out[mode].update(values)
        results += [out["naive"], out["ours"]]
    again = peaks()  # again after the cases: the better of the two
    peak = {m: max(peak[m], again[m]) for m in peak}
    print(
        "matmul peaks used for 'of peak' (best before and after the cases): "
        f"{peak['naive'] / 1e9:.1f} / {peak['ours'] / 1e9:.1f} GFLOP/s"
    )
    head = (
        f"{'case':<16} {'mode':<6} {'tok/s':>8} {'speed-up':>8} {'peak MB':>8} {'mem ratio':>9} "
        f"{'GFLOP':>7} {'of peak':>7} {'L0':>6} {'loss':>12}"
    )
    print(head)
    print("-" * len(head))
    by = {(r["case"], r["mode"]): r for r in results}
    for r in results:
        n = by[(r["case"], "naive")]
        r["speedup_vs_naive"] = r["tokens_per_s"] / n["tokens_per_s"]
        r["memory_vs_naive"] = r["peak_mem_mb"] / n["peak_mem_mb"] if n["peak_mem_mb"] > 0 else float("nan")
        r["fraction_of_peak"] = r["flops"] / r["step_s"] / peak[r["mode"]]
        print(
            f"{r['case']:<16} {r['mode']:<6} {r['tokens_per_s']:>8.0f} {r['speedup_vs_naive']:>7.2f}x "
            f"{r['peak_mem_mb']:>8.0f} {r['memory_vs_naive']:>9.2f} {r['flops'] / 1e9:>7.1f} "
            f"{r['fraction_of_peak']:>7.1%} {r['l0']:>6.1f} {r['loss']:>12.7f}"
        )
    tol = 1e-5 if args.precision == "fp32" else 2e-2  # bf16 forward: equal to bf16's precision only
    for case in args.cases:
        a, b = by[(case, "naive")]["loss"], by[(case, "ours")]["loss"]
        flag = "ok" if abs(a - b) <= tol * max(1.0, abs(a)) else "MISMATCH"
        print(f"loss check {case}: naive {a:.7f} ours {b:.7f} ({flag})")
    side_by_side = {}
    for loc, e2e in PAIRS:
        if (loc, "ours") in by and (e2e, "ours") in by:
            print(
                f"local vs e2e step ({loc} / {e2e}, ours, each case's own process): "
                f"{by[(loc, 'ours')]['tokens_per_s'] / by[(e2e, 'ours')]['tokens_per_s']:.2f}x"
            )
            if args.device == "cpu" and args.precision == "fp32":  # the CPU target's measurement
                side_by_side[f"{loc}/{e2e}"] = pair_ratio(loc, e2e, args)
    if args.json:
        with open(args.json, "w") as fh:
            doc = {"device": where, "precision": args.precision, "matmul_peak_flops": peak, "results": results}
            json.dump({**doc, "local_vs_e2e_side_by_side": side_by_side}, fh, indent=2)


def pair_ratio(loc: str, e2e: str, args) -> float:
    """The local step's speed over the e2e step's, both in one process, interleaved (`pair_worker`);
    printed, and returned."""
    spec = {"pair": [loc, e2e], "reps": 2 * args.reps, "threads": args.threads}
    r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{loc} / {e2e} (side by side) failed:\n{r.stderr[-2000:]}")
    best = json.loads(r.stdout.strip().splitlines()[-1])
    ratio = best[e2e] / best[loc]
    print(
        f"local vs e2e step ({loc} / {e2e}, ours, one process, {2 * args.reps} steps each interleaved): "
        f"{ratio:.2f}x ({best[loc] * 1e3:.0f} / {best[e2e] * 1e3:.0f} ms)"
    )
    return ratio


if __name__ == "__main__":
    main()
