"""The training loop: the optimizer and schedule (`e2edict.optim`), gradient clipping (pre-clip norm logged),
gradient accumulation, a token budget, periodic evaluation, metrics.jsonl, the final SAEs (and adapter)."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from e2edict.checkpoint import latest_checkpoint, restore, save_checkpoint
from e2edict.config import Config, dump_config
from e2edict.data import Prefetcher, make_batches
from e2edict.distributed import DistContext, close_distributed, init_distributed
from e2edict.errors import E2EDictError
from e2edict.evaluation import evaluate_saes
from e2edict.initialization import b_dec_from_data, needs_data
from e2edict.optim import averaged_weights, finish_training, make_schedule, optimizer_from_config
from e2edict.run import RunSetup, check_before_model, evaluate_and_record, resolve_from_source, setup_run
from e2edict.rundir import RunDir
from e2edict.saes import SAE
from e2edict.step import NonFinite, StepLog, TrainStep


def keep_freed_memory() -> bool:
    """Have glibc's malloc serve large allocations from the heap and keep what is freed.

    By default every allocation above 32 MB (an SAE's gradient: 141 MB for GPT-2 small at
    dictionary ratio 60) is a fresh mapping that the kernel zero-fills page by page on first touch
    and unmaps when it is freed, every step; on CPU a large share of a local step (`docs/performance.md`). This is the
    effect PyTorch's CPU tuning guide gets by swapping in jemalloc or tcmalloc, applied in process
    (process-wide: the resident set stays at its peak). Returns False, changing nothing, where
    the C library is not glibc (macOS, musl)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return mallopt(m_mmap_max, 0) == 1 and mallopt(m_trim_threshold, 2**31 - 1) == 1


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


class MetricsLog:
    """Append-only JSON lines; each line flushed so a crash loses at most the line being written."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")


def _brief_evaluation(setup: RunSetup, saes: dict[str, SAE], eval_tokens: int) -> dict[str, Any]:
    """The figures of an evaluation during a run (alive over the same tokens, no CE score)."""
    return evaluate_saes(setup.backbone, saes, setup.eval_seqs, tokens=eval_tokens, alive_tokens=eval_tokens,
                         batch_size=setup.cfg.eval.batch_size, ce_score=False)  # fmt: skip


def _eval_row(setup: RunSetup, saes: dict[str, SAE], tokens: int, eval_tokens: int, step: int) -> dict[str, Any]:
    res = _brief_evaluation(setup, saes, eval_tokens)
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


@dataclass
class _Training:
    """What the loop works with: the run's setup, its step, data, logs and position."""

    cfg: Config
    ctx: DistContext
    setup: RunSetup
    run_dir: Path
    saes: dict[str, SAE]
    step: TrainStep
    batches: Prefetcher
    metrics: MetricsLog
    tokens_per_step: int
    total_steps: int
    first_step: int = 0
    wandb_run: Any = None
    bar: Any = None
    plain_log: bool = False  # stderr is a log, not a terminal: one line per log step instead of a bar
    stop_signal: list[int] = field(default_factory=list)
    log: StepLog = field(default_factory=StepLog)
    start: float = 0.0

    def micro_batches(self) -> list[torch.Tensor]:
        """This rank's slice of each micro-step's global batch (2 ranks x b sequences see what 1 rank x 2b does)."""
        b, dev = self.cfg.train.batch_size, self.cfg.model.device
        mine = slice(self.ctx.rank * b, (self.ctx.rank + 1) * b)
        on_gpu = str(dev).startswith("cuda")
        return [self.batches.next()[mine].to(dev, non_blocking=on_gpu) for _ in range(self.cfg.train.grad_accum)]


def _writes_to_a_log() -> bool:
    """Whether stderr is a log: not a terminal, and not a notebook (where tqdm draws a widget)."""
    return not sys.stderr.isatty() and "ipykernel" not in sys.modules


def _train(cfg: Config, ctx: DistContext, out, overwrite: bool, progress: bool, resume: bool) -> Path:
    run = _open_run(cfg, ctx, out, overwrite, resume)
    old_handlers = _install_signal_handlers(run.stop_signal)
    shown = progress and ctx.is_main
    run.plain_log = shown and _writes_to_a_log()
    run.bar = tqdm(
        total=run.total_steps * run.tokens_per_step,
        initial=run.first_step * run.tokens_per_step,
        unit="tok",
        unit_scale=True,
        disable=not shown or run.plain_log,
        desc=cfg.name,
        dynamic_ncols=True,
    )
    try:
        _loop(run)
    finally:
        run.batches.close()
        run.bar.close()
        _restore_signal_handlers(old_handlers)
    if ctx.is_main:
        _finish(run)
    return run.run_dir


def _open_run(cfg: Config, ctx: DistContext, out, overwrite: bool, resume: bool) -> _Training:
    """Check everything, prepare the run directory, build the SAEs, optimizer and data, and restore
    the newest checkpoint when resuming."""
    cfg = resolve_from_source(cfg)  # architecture, k, kind of saes.init_from where the config leaves them out
    config_text = dump_config(cfg)
    if ctx.enabled and ctx.device != cfg.model.device:
        cfg = cfg.model_copy(deep=True)
        cfg.model.device = ctx.device  # cuda:LOCAL_RANK
    run_dir = Path(out) if out is not None else Path("out") / "runs" / cfg.name
    if not resume:  # the checks that need no model answer before it loads
        RunDir(run_dir).check_free(overwrite)
    check_before_model(cfg)
    if cfg.wandb.project:
        _import_wandb()
    setup = setup_run(cfg)  # every check before anything is written (the same on every rank)
    if not resume:

        def prepare() -> None:
            RunDir(run_dir).prepare(overwrite)
            RunDir(run_dir).write_config(config_text)

        _on_main(ctx, prepare)
    t = cfg.train
    tokens_per_step = t.batch_size * t.grad_accum * cfg.data.n_ctx * ctx.world
    total_steps = t.tokens // tokens_per_step
    if total_steps == 0:
        raise E2EDictError(f"train.tokens={t.tokens} is less than one step of {tokens_per_step} tokens over {ctx.world} ranks")
    saes = setup.build_saes()
    if cfg.saes.init_from and not (resume and RunDir(run_dir).init_eval_file.is_file()):
        _on_main(ctx, lambda: _record_init(RunDir(run_dir), setup, saes))
    # one global batch per micro-step, sliced by rank
    batches = make_batches(setup.train_data, t.batch_size * ctx.world, cfg.seed, cfg.data.shuffle_buffer)
    if needs_data(cfg.saes):  # b_dec from the first step's tokens (every rank alike), then rewind
        start = batches.state()
        first = [batches.next().to(cfg.model.device) for _ in range(t.grad_accum)]
        b_dec_from_data(saes, setup.backbone, first, cfg.saes.b_dec_init)
        batches.load_state(start)
    warmup = t.warmup_tokens // tokens_per_step
    opt = optimizer_from_config(_trainable(saes, setup.adapter, cfg.adapter and cfg.adapter.lr), t, warmup)
    sched = make_schedule(opt, t, total_steps, warmup)
    step_saes = _speed_settings(cfg, setup, saes, ctx)
    weights = setup.loss_weights()
    step = TrainStep(
        setup.backbone, saes, step_saes, weights, opt, sched, ctx, t.max_grad_norm,
        compile=t.compile and t.compile_mode,
        project_decoders=cfg.saes.decoder_norm == "project" and cfg.saes.trainable, adapter=setup.adapter,
    )  # fmt: skip
    if setup.adapter is not None:
        setup.adapter.train(True)
    first_step = _resume(run_dir, ctx, _checkpointed(saes, setup.adapter), opt, sched, batches) if resume else 0
    on_gpu = str(cfg.model.device).startswith("cuda")
    prefetch = Prefetcher(batches, pin_memory=on_gpu)  # the next batches are built while the step runs
    wandb_run = _wandb(cfg, run_dir) if ctx.is_main else None
    metrics = MetricsLog(RunDir(run_dir).metrics_file)
    return _Training(cfg, ctx, setup, run_dir, saes, step, prefetch, metrics, tokens_per_step, total_steps, first_step, wandb_run)


ADAPTER_KEY = ":adapter"  # the adapter's entry among the checkpointed modules (no hook name has a leading colon)


def _trainable(saes: dict[str, SAE], adapter, adapter_lr: float | None) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: the SAEs' parameters (unless saes.trainable is false), then
    the adapter's, at ``adapter.lr`` where the config gives one."""
    groups = [{"params": [p for s in saes.values() for p in s.parameters() if p.requires_grad]}]
    if adapter is not None:
        groups.append({"params": adapter.parameters(), **({"lr": adapter_lr} if adapter_lr else {})})
    return [g for g in groups if g["params"]]


def _checkpointed(saes: dict[str, SAE], adapter) -> dict:
    """The modules a checkpoint holds: the SAEs by hook, the adapter under `ADAPTER_KEY`."""
    return {**saes, ADAPTER_KEY: adapter} if adapter is not None else saes


def _record_init(rundir: RunDir, setup: RunSetup, saes: dict[str, SAE]) -> None:
    """The loaded SAEs' figures on the run's eval tokens before any step (eval.json's ``init``)."""
    res = _brief_evaluation(setup, saes, setup.cfg.eval.tokens)
    keep = ("ce_loss_clean", "ce_loss_spliced", "ce_loss_increase", "kl", "tokens")
    per_sae = {h: {k: m[k] for k in ("l0", "alive", "explained_variance", "mse")} for h, m in res["saes"].items()}
    rundir.write_init_eval({**{k: res[k] for k in keep if k in res}, "saes": per_sae})


def _resume(run_dir: Path, ctx: DistContext, saes, opt, sched, batches) -> int:
    """Restore the newest intact checkpoint (if any); trim metrics.jsonl to it; return its step."""
    first_step = 0
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
        RunDir(run_dir).trim_metrics(first_step)
    ctx.barrier()
    return first_step


def _loop(run: _Training) -> None:
    """The steps; values are read back only at log, evaluation and checkpoint steps."""
    t = run.cfg.train
    run.start = time.perf_counter()
    for step in range(run.first_step, run.total_steps):
        lr = run.step.sched.get_last_lr()[0]
        run.log.push(step + 1, run.step(run.micro_batches()))
        if step == run.first_step and t.compile:
            _report_first_step(run)
        tokens = (step + 1) * run.tokens_per_step
        run.bar.update(run.tokens_per_step)
        last = step == run.total_steps - 1
        if step % t.log_every == 0 or last:
            _log_step(run, step + 1, tokens, lr)
        if _crossed(tokens, run.tokens_per_step, t.eval_every_tokens) and not last:
            _read_values(run)
            if run.ctx.is_main:
                run.bar.set_description(f"{run.cfg.name} (evaluating)")  # a few seconds: said on the bar
                with averaged_weights(run.step.opt):  # a schedule-free optimizer's average; the same weights otherwise
                    row = _eval_row(run.setup, run.saes, tokens, run.cfg.eval.during_training_tokens, step + 1)
                run.bar.set_description(run.cfg.name)
                _write_row(run, row)
        stopping = _should_stop(run, step, last)
        if stopping or (_crossed(tokens, run.tokens_per_step, t.checkpoint_every_tokens) and not last):
            _checkpoint(run, step + 1, tokens)
        if stopping:
            run.ctx.barrier()  # the checkpoint is on disk before any rank leaves
            raise Interrupted(f"stopped by a signal at step {step + 1}; resume with: e2edict train --resume {run.run_dir}")
    _read_values(run)


def _report_first_step(run: _Training) -> None:
    """Under ``train.compile`` the first step includes compiling: say how long it took."""
    if str(run.cfg.model.device).startswith("cuda"):
        torch.cuda.synchronize()
    if run.ctx.is_main:
        print(f"e2edict: first step, with torch.compile, took {time.perf_counter() - run.start:.1f} s", file=sys.stderr)


def _should_stop(run: _Training, step: int, last: bool) -> bool:
    """Whether a signal arrived: checked every step by one process; across ranks (a collective,
    which waits for the device) only at log steps."""
    if not run.ctx.enabled:
        return bool(run.stop_signal)
    if step % run.cfg.train.log_every and not last:
        return False
    return run.ctx.broadcast_flag(bool(run.stop_signal))


def _read_values(run: _Training) -> dict[str, float] | None:
    """Read the pending step values back (one transfer); stop on the first NaN or Inf."""
    try:
        return run.log.read(run.step.names)
    except NonFinite as e:
        _non_finite(run.run_dir, e.what, e.step)


def _write_row(run: _Training, row: dict[str, Any]) -> None:
    run.metrics.write(row)
    if run.wandb_run is not None:
        run.wandb_run.log(row, step=row["step"])


def _log_step(run: _Training, step: int, tokens: int, lr: float) -> None:
    sums = _read_values(run)
    if not run.ctx.is_main or sums is None:
        return
    grad_norm = sums.pop("grad_norm")
    rate = (tokens - run.first_step * run.tokens_per_step) / (time.perf_counter() - run.start)
    row = {"step": step, "tokens": tokens, "split": "train", **sums, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": rate}
    _write_row(run, row)
    l0 = sum(v for k, v in sums.items() if k.startswith("l0/")) / len(run.saes)
    post = {"loss": f"{sums['loss']:.4g}", "L0": f"{l0:.1f}"}
    if "kl" in sums:
        post["KL"] = f"{sums['kl']:.4f}"
    run.bar.set_postfix(post, refresh=False)
    if run.plain_log:
        figures = " ".join(f"{k} {v}" for k, v in post.items())
        print(f"{run.cfg.name}: step {step}/{run.total_steps}, {tokens:,} tokens, {figures}, {rate:,.0f} tok/s", file=sys.stderr)


def _checkpoint(run: _Training, step: int, tokens: int) -> None:
    """Write a checkpoint (rank 0), after checking every step since the last read was finite."""
    _read_values(run)
    if run.ctx.is_main:
        state = {"tokens": tokens, "data": run.batches.state(), "world_size": run.ctx.world}
        t = run.cfg.train
        modules = _checkpointed(run.saes, run.setup.adapter)
        save_checkpoint(run.run_dir, step, modules, run.step.opt, run.step.sched, state, keep=t.keep_checkpoints)


def _finish(run: _Training) -> None:
    """Save the SAEs, evaluate them, write eval.json, the densities and the final metrics row."""
    cfg = run.cfg
    final_tokens = run.total_steps * run.tokens_per_step
    rundir = RunDir(run.run_dir)
    finish_training(run.step.opt)  # the weights to keep (a schedule-free optimizer's average)
    rundir.save_saes(run.saes, {h: sae_metadata(cfg, h, final_tokens) for h in run.saes})
    adapter = run.setup.adapter
    if adapter is not None:
        adapter.train(False)
        rundir.save_adapter(adapter, cfg.model.name)
    run.setup.backbone.restore_dtype()  # the final evaluation sees the model as configured
    # with an adapter, the evaluation first checks the frozen weights bit for bit (`run.adapter_figures`)
    progress = not run.bar.disable
    result, _ = evaluate_and_record(rundir, cfg, run.setup.backbone, run.saes, run.setup.eval_seqs, progress=progress)
    keys = ("ce_loss_clean", "ce_loss_spliced", "ce_loss_increase", "kl")
    run.metrics.write({"step": run.total_steps, "tokens": final_tokens, "split": "final_eval", **{k: result[k] for k in keys}})
    if run.wandb_run is not None:
        run.wandb_run.summary.update({k: v for k, v in result.items() if k != "saes"})
        run.wandb_run.finish()


def _speed_settings(cfg: Config, setup: RunSetup, saes: dict[str, SAE], ctx: DistContext):
    """bf16: the frozen model held in bf16 (cast once; `_finish` restores its original weights for
    the final evaluation); no autocast anywhere: the model computes in its own dtype, the SAEs in
    their input's (`e2edict.saes.base.affine`), and their weights, optimizer state and losses stay
    fp32, as does the fused head's KL. TF32 on CUDA, DDP under torchrun, optional compile.
    Returns the SAEs the step calls."""
    device_type = torch.device(cfg.model.device).type
    if cfg.train.precision == "bf16":
        setup.backbone.cast(torch.bfloat16)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    if device_type == "cpu" and cfg.train.reuse_cpu_memory:
        keep_freed_memory()

    step_saes: dict = dict(saes)
    if ctx.enabled and cfg.saes.trainable:  # held SAEs have no gradient to average (an adapter's: `TrainStep`)
        from torch.nn.parallel import DistributedDataParallel

        ids = [ctx.local_rank] if device_type == "cuda" else None
        step_saes = {h: DistributedDataParallel(s, device_ids=ids) for h, s in step_saes.items()}
    if cfg.train.compile:  # the whole forward is compiled by `TrainStep`
        for s in saes.values():  # static shapes: the ragged sparse paths would recompile every step
            if hasattr(s, "sparse_decode"):
                s.sparse_decode = False
    return step_saes


def _non_finite(run_dir: Path, what: str, step: int) -> None:
    found = latest_checkpoint(run_dir, warn=lambda m: None) if RunDir(run_dir).checkpoints.is_dir() else None
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
