"""The second phase of a training run: the loop over a prepared `e2edict.preparation.Run`.

Each step (`e2edict.step.TrainStep`: gradient accumulation, clipping with the pre-clip norm
logged, the optimizer and schedule of `e2edict.optim`), a row of metrics.jsonl at log steps, an
evaluation on schedule, a checkpoint on schedule or when a signal arrives, and at the end the SAEs
(and adapter) saved and the final evaluation (`e2edict.evaluation.evaluate_and_record`).
`train` is the whole run: `e2edict.preparation.prepare`, this loop, the final evaluation.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from e2edict.checkpoint import latest_checkpoint, save_checkpoint
from e2edict.config import Config
from e2edict.distributed import close_distributed, init_distributed
from e2edict.errors import E2EDictError
from e2edict.evaluation import RUN_KEYS, brief_evaluation, eval_row, evaluate_and_record
from e2edict.optim import averaged_weights, finish_training
from e2edict.precision import end_run_precision
from e2edict.preparation import Run, prepare
from e2edict.rundir import RunDir
from e2edict.step import NonFinite, StepLog


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived; a checkpoint was written and the run can be resumed."""


def train(
    cfg: Config, out: str | Path | None = None, overwrite: bool = False, progress: bool = True, resume: bool = False
) -> Path:
    """Train the SAEs of ``cfg``; return the run directory (``out`` or ``out/runs/<name>``).

    With ``resume``, ``out`` is an existing run directory: training continues from its newest
    intact checkpoint (or from the start if it has none) and ends exactly as an uninterrupted run.
    Under torchrun every rank calls this; see `e2edict.distributed`."""
    ctx = init_distributed(cfg.model.device, cfg.train.dist_backend, cfg.train.dist_timeout_s)
    try:
        run = prepare(cfg, ctx, out, overwrite, resume)
        train_run(run, progress)
        if ctx.is_main or run.step.sharded is not None:  # a sharded model evaluates on every rank
            finish_run(run, progress=progress and ctx.is_main and not _writes_to_a_log())
        return run.run_dir
    finally:
        close_distributed(ctx)


@dataclass
class _Loop:
    """The loop's own state beside the prepared run: the bar, the pending step values, the signal flag."""

    run: Run
    bar: Any
    plain_log: bool  # stderr is a log, not a terminal: one line per log step instead of a bar
    stop_signal: list[int] = field(default_factory=list)
    log: StepLog = field(default_factory=StepLog)
    start: float = 0.0

    def micro_batches(self) -> list[torch.Tensor]:
        """This rank's slice of each micro-step's global batch (2 ranks x b sequences see what 1 rank x 2b does)."""
        run = self.run
        b, dev = run.cfg.train.batch_size, run.cfg.model.device
        mine = slice(run.ctx.rank * b, (run.ctx.rank + 1) * b)
        on_gpu = str(dev).startswith("cuda")
        return [run.batches.next()[mine].to(dev, non_blocking=on_gpu) for _ in range(run.cfg.train.grad_accum)]


def _writes_to_a_log() -> bool:
    """Whether stderr is a log: not a terminal, and not a notebook (where tqdm draws a widget)."""
    return not sys.stderr.isatty() and "ipykernel" not in sys.modules


def train_run(run: Run, progress: bool = True) -> None:
    """The steps from ``run.first_step`` to the end of the budget (a bar on a terminal, a plain
    line per log step in a log); SIGTERM or SIGINT writes a checkpoint and raises `Interrupted`."""
    shown = progress and run.ctx.is_main
    plain = shown and _writes_to_a_log()
    bar = tqdm(
        total=run.total_steps * run.tokens_per_step,
        initial=run.first_step * run.tokens_per_step,
        unit="tok",
        unit_scale=True,
        disable=not shown or plain,
        desc=run.cfg.name,
        dynamic_ncols=True,
    )
    lp = _Loop(run, bar, plain)
    old_handlers = _install_signal_handlers(lp.stop_signal)
    try:
        _loop(lp)
    finally:
        run.batches.close()
        bar.close()
        _restore_signal_handlers(old_handlers)


def _crossed(tokens: int, step_tokens: int, every: int | None) -> bool:
    return every is not None and tokens // every > (tokens - step_tokens) // every


def _loop(lp: _Loop) -> None:
    """The steps; values are read back only at log, evaluation and checkpoint steps."""
    run, t = lp.run, lp.run.cfg.train
    lp.start = time.perf_counter()
    for step in range(run.first_step, run.total_steps):
        lr = run.step.sched.get_last_lr()[0]
        lp.log.push(step + 1, run.step(lp.micro_batches()))
        if step == run.first_step and t.compile:
            _report_first_step(lp)
        tokens = (step + 1) * run.tokens_per_step
        lp.bar.update(run.tokens_per_step)
        last = step == run.total_steps - 1
        if step % t.log_every == 0 or last:
            _log_step(lp, step + 1, tokens, lr)
        if _crossed(tokens, run.tokens_per_step, t.eval_every_tokens) and not last:
            _evaluate(lp, step + 1, tokens)
        stopping = _should_stop(lp, step, last)
        if stopping or (_crossed(tokens, run.tokens_per_step, t.checkpoint_every_tokens) and not last):
            _checkpoint(lp, step + 1, tokens)
        if stopping:
            run.ctx.barrier()  # the checkpoint is on disk before any rank leaves
            raise Interrupted(f"stopped by a signal at step {step + 1}; resume with: e2edict train --resume {run.run_dir}")
    _read_values(lp)


def _evaluate(lp: _Loop, step: int, tokens: int) -> None:
    """An evaluation during training (rank 0; every rank runs a sharded model), written as
    metrics.jsonl's ``eval`` row."""
    run, sharded = lp.run, lp.run.step.sharded
    _read_values(lp)
    if not run.ctx.is_main and sharded is None:
        return
    lp.bar.set_description(f"{run.cfg.name} (evaluating)")  # a few seconds: said on the bar
    s, e = run.setup, run.cfg.eval
    with averaged_weights(run.step.opt):  # a schedule-free optimizer's average; the same weights otherwise
        result = brief_evaluation(s.backbone, run.saes, s.eval_seqs, e.during_training_tokens, e.batch_size)
    if sharded is not None:
        sharded.release()
    lp.bar.set_description(run.cfg.name)
    if run.ctx.is_main:
        _write_row(run, eval_row(result, step, tokens))


def _report_first_step(lp: _Loop) -> None:
    """Under ``train.compile`` the first step includes compiling: say how long it took."""
    if str(lp.run.cfg.model.device).startswith("cuda"):
        torch.cuda.synchronize()
    if lp.run.ctx.is_main:
        print(f"e2edict: first step, with torch.compile, took {time.perf_counter() - lp.start:.1f} s", file=sys.stderr)


def _should_stop(lp: _Loop, step: int, last: bool) -> bool:
    """Whether a signal arrived: checked every step by one process; across ranks (a collective,
    which waits for the device) only at log steps."""
    ctx = lp.run.ctx
    if not ctx.enabled:
        return bool(lp.stop_signal)
    if step % lp.run.cfg.train.log_every and not last:
        return False
    return ctx.broadcast_flag(bool(lp.stop_signal))


def _read_values(lp: _Loop) -> dict[str, float] | None:
    """Read the pending step values back (one transfer); stop on the first NaN or Inf."""
    try:
        return lp.log.read(lp.run.step.names)
    except NonFinite as e:
        _non_finite(lp.run.run_dir, e.what, e.step)


def _write_row(run: Run, row: dict[str, Any]) -> None:
    run.rundir.append_metrics(row)
    if run.wandb_run is not None:
        run.wandb_run.log(row, step=row["step"])


def _log_step(lp: _Loop, step: int, tokens: int, lr: float) -> None:
    run = lp.run
    sums = _read_values(lp)
    if not run.ctx.is_main or sums is None:
        return
    grad_norm = sums.pop("grad_norm")
    rate = (tokens - run.first_step * run.tokens_per_step) / (time.perf_counter() - lp.start)
    row = {"step": step, "tokens": tokens, "split": "train", **sums, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": rate}
    _write_row(run, row)
    l0 = sum(v for k, v in sums.items() if k.startswith("l0/")) / len(run.saes)
    post = {"loss": f"{sums['loss']:.4g}", "L0": f"{l0:.1f}"}
    if "kl" in sums:
        post["KL"] = f"{sums['kl']:.4f}"
    lp.bar.set_postfix(post, refresh=False)
    if lp.plain_log:
        figures = " ".join(f"{k} {v}" for k, v in post.items())
        print(f"{run.cfg.name}: step {step}/{run.total_steps}, {tokens:,} tokens, {figures}, {rate:,.0f} tok/s", file=sys.stderr)


def _checkpoint(lp: _Loop, step: int, tokens: int) -> None:
    """Write a checkpoint (rank 0), after checking every step since the last read was finite."""
    _read_values(lp)
    run = lp.run
    if run.ctx.is_main:
        state = {"tokens": tokens, "data": run.batches.state(), "world_size": run.ctx.world}
        keep = run.cfg.train.keep_checkpoints
        save_checkpoint(run.run_dir, step, run.checkpointed(), run.step.opt, run.step.sched, state, keep=keep)


def finish_run(run: Run, progress: bool = False) -> dict[str, Any]:
    """The run's end (rank 0; every rank with a sharded model, rank 0 writing): the SAEs (and
    adapter) saved, the model back in its configured precision, the final evaluation written
    (eval.json, densities, metrics.jsonl's ``final_eval`` row); returns the evaluation. With an
    adapter it first checks the frozen weights bit for bit."""
    cfg, rundir, main = run.cfg, run.rundir, run.ctx.is_main
    final_tokens = run.total_steps * run.tokens_per_step
    finish_training(run.step.opt)  # the weights to keep (a schedule-free optimizer's average)
    if main:
        rundir.save_saes(run.saes, {h: sae_metadata(cfg, h, final_tokens) for h in run.saes})
    adapter = run.setup.adapter
    if adapter is not None:
        adapter.train(False)
        if main:
            rundir.save_adapter(adapter, cfg.model.name)
    end_run_precision(run.setup.backbone)  # the final evaluation sees the model as configured
    s = run.setup
    result, _ = evaluate_and_record(rundir, cfg, s.backbone, run.saes, s.eval_seqs, progress=progress, write=main)
    if run.step.sharded is not None:
        run.step.sharded.release()
    if not main:
        return result
    row = {"step": run.total_steps, "tokens": final_tokens, "split": "final_eval", **{k: result[k] for k in RUN_KEYS}}
    rundir.append_metrics(row)
    if run.wandb_run is not None:
        run.wandb_run.summary.update({k: v for k, v in result.items() if k != "saes"})
        run.wandb_run.finish()
    return result


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
