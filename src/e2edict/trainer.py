"""The training loop: Adam, warmup + decay schedule, gradient clipping (pre-clip norm logged),
gradient accumulation, a token budget, periodic evaluation, metrics.jsonl, the final SAEs."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import signal
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from e2edict.checkpoint import latest_checkpoint, restore, save_checkpoint
from e2edict.config import Config, dump_config
from e2edict.data import Prefetcher, make_batches
from e2edict.distributed import DistContext, close_distributed, init_distributed
from e2edict.errors import E2EDictError
from e2edict.evaluation import evaluate_backbone, log10_density
from e2edict.run import RunSetup, lr_factor, prepare_run_dir, setup_run
from e2edict.saes import SAE, save_sae
from e2edict.splice import LossWeights, splice_forward


def keep_freed_memory() -> bool:
    """Have glibc's malloc serve large allocations from the heap and keep what is freed.

    By default every allocation above 32 MB (an SAE's gradient: 141 MB for GPT-2 small at
    dictionary ratio 60) is a fresh mapping that the kernel zero-fills page by page on first touch
    and unmaps when it is freed, every step; on CPU that was ~18% of a local step. This is the
    effect PyTorch's CPU tuning guide gets by swapping in jemalloc or tcmalloc, applied in process
    (process-wide: the resident set stays at its peak). Returns False, changing nothing, where
    the C library is not glibc (macOS, musl)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return mallopt(m_mmap_max, 0) == 1 and mallopt(m_trim_threshold, 2**31 - 1) == 1


def make_optimizer(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """Adam, fused: one pass over each tensor per step, without the full-size temporaries of the
    multi-tensor version (which stays where a device has no fused kernel)."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.Adam(params, lr=lr)


def sae_folder(run_dir: Path, hook: str) -> Path:
    """``RUN_DIR/saes/<hook>``, refusing any name that would leave the run directory."""
    base = (run_dir / "saes").resolve()
    folder = (base / hook).resolve()
    if folder.parent != base or hook in ("", ".", ".."):
        raise E2EDictError(f"hook name {hook!r} cannot name a folder inside the run directory")
    return folder


def sae_metadata(cfg: Config, hook: str, tokens: int) -> dict[str, Any]:
    return {
        "model_name": cfg.model.name,
        "hook_name": hook,
        "context_size": cfg.data.n_ctx,
        "prepend_bos": True,
        "dataset_path": cfg.data.train if isinstance(cfg.data.train, str) else cfg.data.train.path,
        "e2edict_loss_preset": cfg.loss.preset,
        "e2edict_coefficients": {
            "sparsity": cfg.loss.sparsity_coeff(hook),
            "sparsity_p": cfg.loss.sparsity.p,
            "local": cfg.loss.local.coeff,
            "kl": cfg.loss.kl.coeff,
            "downstream": cfg.loss.downstream.coeff,
        },
        "e2edict_tokens_trained": tokens,
        "e2edict_run_name": cfg.name,
    }


def save_saes(run_dir: Path, cfg: Config, saes: dict[str, SAE], tokens: int) -> None:
    for h, sae in saes.items():
        save_sae(sae, sae_folder(run_dir, h), sae_metadata(cfg, h, tokens))


class MetricsLog:
    """Append-only JSON lines; each line flushed so a crash loses at most the line being written."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")


def _eval_row(setup: RunSetup, saes: dict[str, SAE], tokens: int, eval_tokens: int, step: int) -> dict[str, Any]:
    res = evaluate_backbone(
        setup.backbone,
        saes,
        setup.eval_seqs,
        tokens=eval_tokens,
        alive_tokens=eval_tokens,
        batch_size=setup.cfg.eval.batch_size,
        ce_score=False,
    )
    row: dict[str, Any] = {"step": step, "tokens": tokens, "split": "eval"}
    for k in ("ce_loss_clean", "ce_loss_spliced", "ce_loss_increase", "kl"):
        row[k] = res[k]
    for h, m in res["saes"].items():
        for k in ("l0", "alive", "explained_variance", "mse"):
            row[f"{k}/{h}"] = m[k]
    return row


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived; a checkpoint was written and the run can be resumed."""


def _crossed(tokens: int, step_tokens: int, every: int | None) -> bool:
    return every is not None and tokens // every > (tokens - step_tokens) // every


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the rows up to ``step`` (those a checkpoint at ``step`` had written); drop a torn last line."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("step", 0) <= step and row.get("split") != "final_eval":
            keep.append(line)
    tmp = path.with_name(".metrics.jsonl.tmp")
    tmp.write_text("".join(x + "\n" for x in keep), encoding="utf-8")
    tmp.replace(path)


def train(
    cfg: Config, out: str | Path | None = None, overwrite: bool = False, progress: bool = True, resume: bool = False
) -> Path:
    """Train the SAEs of ``cfg``; return the run directory (``out`` or ``out/runs/<name>``).

    With ``resume``, ``out`` is an existing run directory: training continues from its newest
    intact checkpoint (or from the start if it has none) and ends exactly as an uninterrupted run.
    Under torchrun every rank calls this; see `e2edict.distributed`."""
    ctx = init_distributed(cfg.model.device, cfg.train.dist_backend, cfg.train.dist_timeout_s)
    try:
        return _train(cfg, ctx, out, overwrite, progress, resume)
    finally:
        close_distributed(ctx)


def _on_main(ctx: DistContext, fn) -> None:
    """Run ``fn`` on rank 0; if it fails there, every rank fails (nobody waits forever)."""
    error: Exception | None = None
    if ctx.is_main:
        try:
            fn()
        except Exception as e:  # re-raised below, on rank 0 as itself
            error = e
    if ctx.broadcast_flag(error is not None):
        raise error if error is not None else E2EDictError("rank 0 failed to prepare the run; see its message")


def _train(cfg: Config, ctx: DistContext, out, overwrite: bool, progress: bool, resume: bool) -> Path:
    config_text = dump_config(cfg)
    if ctx.enabled and ctx.device != cfg.model.device:
        cfg = cfg.model_copy(deep=True)
        cfg.model.device = ctx.device  # cuda:LOCAL_RANK
    setup = setup_run(cfg)  # every check before anything is written (the same on every rank)
    if cfg.wandb.project:
        _import_wandb()
    run_dir = Path(out) if out is not None else Path("out") / "runs" / cfg.name
    if not resume:

        def prepare() -> None:
            prepare_run_dir(run_dir, overwrite)
            (run_dir / "config.yaml").write_text(config_text)

        _on_main(ctx, prepare)
    metrics = MetricsLog(run_dir / "metrics.jsonl")

    saes = setup.build_saes()
    weights = LossWeights.from_config(cfg.loss, cfg.saes.positions, setup.downstream)
    params = [p for s in saes.values() for p in s.parameters()]
    opt = make_optimizer(params, cfg.train.lr)
    t = cfg.train
    tokens_per_step = t.batch_size * t.grad_accum * cfg.data.n_ctx * ctx.world
    total_steps = t.tokens // tokens_per_step
    if total_steps == 0:
        raise E2EDictError(f"train.tokens={t.tokens} is less than one step of {tokens_per_step} tokens over {ctx.world} ranks")
    warmup = t.warmup_tokens // tokens_per_step
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, warmup, t.schedule, t.min_lr_factor))
    autocast, step_saes = _speed_settings(cfg, saes, ctx)
    # one global batch per micro-step, sliced by rank: 2 ranks x b sequences see what 1 rank x 2b does
    batches = make_batches(setup.train_data, t.batch_size * ctx.world, cfg.seed, cfg.data.shuffle_buffer)
    mine = slice(ctx.rank * t.batch_size, (ctx.rank + 1) * t.batch_size)
    first_step = 0
    if resume:
        found = latest_checkpoint(run_dir, warn=lambda m: print(m, file=sys.stderr) if ctx.is_main else None)
        if found is not None:
            world = found[1][0].get("world_size", 1)
            if world != ctx.world:
                raise E2EDictError(f"the checkpoint was written by {world} ranks; resume it with {world}, not {ctx.world}")
            doc = restore(found[1], saes, opt, sched)
            batches.load_state(doc["data"])
            first_step = doc["step"]
            if ctx.is_main:
                print(f"e2edict: resuming {run_dir} from step {first_step} ({doc['tokens']} tokens)", file=sys.stderr)
        if ctx.is_main:
            _truncate_metrics(run_dir / "metrics.jsonl", first_step)
        ctx.barrier()
    on_gpu = str(cfg.model.device).startswith("cuda")
    batches = Prefetcher(batches, pin_memory=on_gpu)  # the next batches are built while the step runs
    wandb_run = _wandb(cfg, run_dir) if ctx.is_main else None

    stop_signal: list[int] = []
    old_handlers = _install_signal_handlers(stop_signal)
    bar = tqdm(
        total=total_steps * tokens_per_step,
        initial=first_step * tokens_per_step,
        unit="tok",
        unit_scale=True,
        disable=not progress or not ctx.is_main,
        desc=cfg.name,
        dynamic_ncols=True,
    )
    start = time.perf_counter()
    try:
        for step in range(first_step, total_steps):
            acc: dict[str, torch.Tensor] = {}  # detached, read back once per step (one device sync)
            for micro in range(t.grad_accum):
                x = batches.next()[mine].to(cfg.model.device, non_blocking=on_gpu)
                with ExitStack() as no_sync:
                    if ctx.enabled and micro < t.grad_accum - 1:  # DDP averages once, after the last micro-batch
                        for m in step_saes.values():
                            no_sync.enter_context(m.no_sync())
                    with autocast():
                        out = splice_forward(setup.backbone, step_saes, x, weights)
                    (out.loss / t.grad_accum).backward()
                terms = {**out.terms, "loss": out.loss}
                # mean active latents per token; one count over the whole tensor is ~7x cheaper than per token
                terms.update({f"l0/{h}": torch.count_nonzero(c) / max(1, c.numel() // c.shape[-1]) for h, c in out.codes.items()})
                for k, v in terms.items():
                    acc[k] = acc.get(k, 0.0) + v.detach().float() / t.grad_accum
            values = ctx.mean(torch.stack(list(acc.values())))  # logged values: the mean over ranks
            sums = dict(zip(acc, values.tolist(), strict=True))
            for k, v in sums.items():
                if not math.isfinite(v):
                    _non_finite(run_dir, f"loss term {k!r}", step + 1)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or float("inf")).item()
            if not math.isfinite(grad_norm):
                bad = [
                    f"{h}.{n}"
                    for h, s_ in saes.items()
                    for n, p in s_.named_parameters()
                    if p.grad is not None and not torch.isfinite(p.grad).all()
                ]
                _non_finite(run_dir, f"gradient of {', '.join(bad) or 'the SAE parameters'}", step + 1)
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if not torch.stack([torch.isfinite(p).all() for p in params]).all().item():
                _non_finite(run_dir, "SAE weights after the optimizer step", step + 1)
            tokens = (step + 1) * tokens_per_step
            bar.update(tokens_per_step)
            if ctx.is_main and (step % t.log_every == 0 or step == total_steps - 1):
                rate = (tokens - first_step * tokens_per_step) / (time.perf_counter() - start)
                row = {
                    "step": step + 1,
                    "tokens": tokens,
                    "split": "train",
                    **sums,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": rate,
                }
                metrics.write(row)
                if wandb_run is not None:
                    wandb_run.log(row, step=step + 1)
                l0 = sum(v for k, v in sums.items() if k.startswith("l0/")) / len(saes)
                post = {"loss": f"{sums['loss']:.4g}", "L0": f"{l0:.1f}"}
                if "kl" in sums:
                    post["KL"] = f"{sums['kl']:.4f}"
                bar.set_postfix(post, refresh=False)
            if ctx.is_main and _crossed(tokens, tokens_per_step, t.eval_every_tokens) and step < total_steps - 1:
                row = _eval_row(setup, saes, tokens, cfg.eval.during_training_tokens, step + 1)
                metrics.write(row)
                if wandb_run is not None:
                    wandb_run.log(row, step=step + 1)
            stopping = ctx.broadcast_flag(bool(stop_signal))
            if ctx.is_main and (
                stopping or (_crossed(tokens, tokens_per_step, t.checkpoint_every_tokens) and step < total_steps - 1)
            ):
                state = {"tokens": tokens, "data": batches.state(), "world_size": ctx.world}
                save_checkpoint(run_dir, step + 1, saes, opt, sched, state, keep=t.keep_checkpoints)
            if stopping:
                ctx.barrier()  # the checkpoint is on disk before any rank leaves
                raise Interrupted(f"stopped by a signal at step {step + 1}; resume with: e2edict train --resume {run_dir}")
    finally:
        batches.close()
        bar.close()
        _restore_signal_handlers(old_handlers)
    if not ctx.is_main:
        return run_dir
    final_tokens = total_steps * tokens_per_step
    save_saes(run_dir, cfg, saes, final_tokens)
    densities: dict[str, torch.Tensor] = {}
    result = evaluate_backbone(
        setup.backbone,
        saes,
        setup.eval_seqs,
        tokens=cfg.eval.tokens,
        alive_tokens=cfg.eval.alive_tokens,
        batch_size=cfg.eval.batch_size,
        densities=densities,
    )
    write_eval(run_dir, result)
    write_sparsity(run_dir, densities)
    metrics.write(
        {
            "step": total_steps,
            "tokens": final_tokens,
            "split": "final_eval",
            **{k: result[k] for k in ("ce_loss_clean", "ce_loss_spliced", "ce_loss_increase", "kl")},
        }
    )
    if wandb_run is not None:
        wandb_run.summary.update({k: v for k, v in result.items() if k != "saes"})
        wandb_run.finish()
    return run_dir


def _speed_settings(cfg: Config, saes: dict[str, SAE], ctx: DistContext):
    """bf16 autocast (weights, optimizer state and losses stay fp32), TF32 on CUDA, DDP under
    torchrun, optional compile. Returns the autocast factory and the SAEs the step calls."""
    device_type = torch.device(cfg.model.device).type
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    if device_type == "cpu" and cfg.train.reuse_cpu_memory:
        keep_freed_memory()

    def autocast():
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")

    step_saes: dict = dict(saes)
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ids = [ctx.local_rank] if device_type == "cuda" else None
        step_saes = {h: DistributedDataParallel(s, device_ids=ids) for h, s in step_saes.items()}
    if cfg.train.compile:
        step_saes = {h: torch.compile(s) for h, s in step_saes.items()}
    return autocast, step_saes


def _non_finite(run_dir: Path, what: str, step: int) -> None:
    found = latest_checkpoint(run_dir, warn=lambda m: None) if (run_dir / "checkpoints").is_dir() else None
    kept = f"the last good checkpoint is {found[0]}" if found else "no checkpoint was written yet"
    raise E2EDictError(f"NaN or Inf in the {what} at step {step}; training stopped ({kept})")


def _install_signal_handlers(flag: list[int]):
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        flag.append(signum)

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}


def _restore_signal_handlers(old) -> None:
    for sig, h in (old or {}).items():
        signal.signal(sig, h)


def write_sparsity(run_dir: Path, densities: dict[str, torch.Tensor]) -> None:
    """Each latent's log10 firing density, as SAELens stores it (``sparsity.safetensors``, key ``sparsity``)."""
    for h, d in densities.items():
        path = sae_folder(run_dir, h) / "sparsity.safetensors"
        tmp = path.with_name(".sparsity.safetensors.tmp")
        save_file({"sparsity": log10_density(d)}, str(tmp))
        tmp.replace(path)


def write_eval(run_dir: Path, result: dict[str, Any]) -> None:
    tmp = run_dir / ".eval.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(run_dir / "eval.json")


def _wandb(cfg: Config, run_dir: Path):
    if not cfg.wandb.project:
        return None
    return _import_wandb().init(
        project=cfg.wandb.project, entity=cfg.wandb.entity, name=cfg.name, dir=str(run_dir), config=cfg.to_dict()
    )


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise E2EDictError("wandb.project is set but wandb is not installed (pip install 'e2edict[wandb]')") from None
    return wandb
