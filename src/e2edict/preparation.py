"""The first phase of a training run: `prepare` resolves, checks, builds and initialises
everything once, and returns the `Run` the loop (`e2edict.trainer.train_run`) works with.

In order: ``saes.init_from`` is loaded once and fills the ``saes`` keys the config leaves out;
the checks that need no model (the run directory, the data's size where its files say it, the
token budget) answer before the model loads; `e2edict.run.setup_run` loads the model and data and
checks the rest; only then is the run directory written. The SAEs get their starting weights in
`e2edict.initialization.initial_saes`, the precision settings come from `e2edict.precision`, and
with ``resume`` the newest intact checkpoint is restored.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from e2edict.checkpoint import latest_checkpoint, restore
from e2edict.config import Config, config_from_dict, dump_config
from e2edict.data import Prefetcher, make_batches
from e2edict.distributed import DistContext, ShardedModel, check_sharding
from e2edict.errors import E2EDictError
from e2edict.evaluation import record_init
from e2edict.initialization import initial_saes
from e2edict.optim import make_schedule, optimizer_from_config
from e2edict.plan import check_memory, graph_start, model_layers
from e2edict.precision import apply_run_precision
from e2edict.run import RunSetup, check_one_step, setup_run
from e2edict.rundir import RunDir
from e2edict.saes import SAE, registry
from e2edict.saes.pretrained import load_source
from e2edict.step import TrainStep

ADAPTER_KEY = ":adapter"  # the adapter's entry among the checkpointed modules (no hook name has a leading colon)


@dataclass
class Run:
    """A prepared run: its resolved config, model and data (``setup``), SAEs, step, batches and
    where it stands; what the training loop works with."""

    cfg: Config
    ctx: DistContext
    setup: RunSetup
    rundir: RunDir
    saes: dict[str, SAE]
    step: TrainStep
    batches: Prefetcher
    tokens_per_step: int
    total_steps: int
    first_step: int = 0
    wandb_run: Any = None

    @property
    def run_dir(self) -> Path:
        return self.rundir.path

    def checkpointed(self) -> dict:
        """The modules a checkpoint holds: the SAEs by hook, the adapter under `ADAPTER_KEY`."""
        adapter = self.setup.adapter
        return {**self.saes, ADAPTER_KEY: adapter} if adapter is not None else self.saes


def prepare(cfg: Config, ctx: DistContext, out=None, overwrite: bool = False, resume: bool = False) -> Run:
    """Everything a training run needs, checked before anything is written (the same on every
    rank; rank 0 writes). ``out``: the run directory (default ``out/runs/<name>``); with
    ``resume`` an existing one, continued from its newest intact checkpoint."""
    source = load_source(cfg.saes.init_from) if cfg.saes.init_from else None
    cfg = resolve_from_source(cfg, source)
    config_text = dump_config(cfg)
    if ctx.enabled and ctx.device != cfg.model.device:
        cfg = cfg.model_copy(deep=True)
        cfg.model.device = ctx.device  # cuda:LOCAL_RANK
    rundir = RunDir(Path(out) if out is not None else Path("out") / "runs" / cfg.name)
    if not resume:
        rundir.check_free(overwrite)
    check_before_model(cfg, ctx.world)
    if str(cfg.model.device).startswith("cuda") and cfg.train.memory_check:
        _check_gpu_memory(cfg, ctx)
    if cfg.wandb.project:
        import_wandb()
    setup = setup_run(cfg, source)  # under train.shard_model the model is loaded on the CPU
    if not resume:
        on_main(ctx, lambda: (rundir.prepare(overwrite), rundir.write_config(config_text)))
    t = cfg.train
    sharded = _shard(setup, cfg, ctx) if t.shard_model else None
    # one global batch per micro-step, sliced by rank
    batches = make_batches(setup.train_data, t.batch_size * ctx.world, cfg.seed, cfg.data.shuffle_buffer)
    saes = initial_saes(setup, batches, t.grad_accum)
    if cfg.saes.init_from and not (resume and rundir.init_eval_file.is_file()):
        _record_init(rundir, setup, saes, cfg, ctx, sharded)
    tokens_per_step = t.batch_size * t.grad_accum * cfg.data.n_ctx * ctx.world
    total_steps, warmup = t.tokens // tokens_per_step, t.warmup_tokens // tokens_per_step
    opt = optimizer_from_config(_trainable(saes, setup.adapter, cfg.adapter and cfg.adapter.lr), t, warmup)
    sched = make_schedule(opt, t, total_steps, warmup)
    apply_run_precision(t, setup.backbone, cfg.model.device, cast=sharded is None)  # a sharded model was cast before
    setup.backbone.checkpoint_blocks = t.activation_checkpointing
    step = TrainStep(
        setup.backbone, saes, _step_saes(cfg, saes, ctx), setup.loss_weights(), opt, sched, ctx, t.max_grad_norm,
        compile=t.compile and t.compile_mode,
        project_decoders=cfg.saes.decoder_norm == "project" and cfg.saes.trainable, adapter=setup.adapter,
        sharded=sharded,
    )  # fmt: skip
    if setup.adapter is not None:
        setup.adapter.train(True)
    run = Run(cfg, ctx, setup, rundir, saes, step, batches, tokens_per_step, total_steps)
    if resume:
        run.first_step = _resume(run, batches)
    run.batches = Prefetcher(batches, pin_memory=str(cfg.model.device).startswith("cuda"))  # built while the step runs
    run.wandb_run = _wandb(cfg, rundir.path) if ctx.is_main else None
    return run


def _shard(setup: RunSetup, cfg: Config, ctx: DistContext) -> ShardedModel:
    """The model, loaded on the CPU, cast to bf16 under ``train.precision: bf16`` (for good: no
    whole fp32 copy is kept) and split over the ranks onto their devices (`ShardedModel`)."""
    if cfg.train.precision == "bf16":
        import torch

        setup.backbone.cast(torch.bfloat16, keep_original=False)
    return ShardedModel(setup.backbone, ctx)


def _record_init(rundir: RunDir, setup: RunSetup, saes: dict[str, SAE], cfg: Config, ctx: DistContext, sharded) -> None:
    """eval.json's ``init`` figures of warm-started SAEs: rank 0 evaluates, or every rank a sharded model."""
    e = cfg.eval
    if sharded is None:
        on_main(ctx, lambda: record_init(rundir, setup.backbone, saes, setup.eval_seqs, e.tokens, e.batch_size))
        return
    record_init(rundir, setup.backbone, saes, setup.eval_seqs, e.tokens, e.batch_size, write=ctx.is_main)
    sharded.release()


def resolve_from_source(cfg: Config, source: tuple[dict[str, SAE], str] | None) -> Config:
    """With ``saes.init_from`` (loaded: ``source``), the ``saes`` keys the config leaves out
    (architecture, k, kind) come from the source's SAEs, so config.yaml records what is trained;
    keys it gives are kept, and a clash is named by `SAE.check_config` once the SAEs load."""
    s = cfg.saes
    missing = [k for k in ("k", "kind", "architecture") if not s.given(k)]
    if source is None or not missing:
        return cfg
    first = next(iter(source[0].values()))
    found = {"architecture": first.architecture, "k": getattr(first, "k", None), "kind": first.kind}
    arch = s.architecture if s.given("architecture") else found["architecture"]
    if "k" not in registry[arch].options_schema.model_fields:  # a k it does not read would be refused, not the clash
        found["k"] = None
    raw = cfg.to_dict()
    for key in missing:  # k before architecture, so the architecture's own check sees it
        if found[key] is not None:
            raw["saes"][key] = found[key]
    return config_from_dict(raw)


def check_before_model(cfg: Config, world: int = 1) -> None:
    """Checks that need no model, run before it loads: the token budget against one step over
    ``world`` ranks, and the training data's size where its files say it without reading the
    data (a ``.npy`` token stream's shape, a shard folder's manifest) against one step's sequences."""
    t, d = cfg.train, cfg.data
    layers = model_layers(cfg) if t.shard_model or t.activation_checkpointing else None
    check_sharding(t.shard_model, world, layers)
    if t.activation_checkpointing and layers is not None:
        _check_blocks_after(cfg, layers)
    per_step = t.batch_size * t.grad_accum * d.n_ctx * world
    if t.tokens < per_step:
        ranks = f" over {world} ranks" if world > 1 else ""
        raise E2EDictError(f"train.tokens={t.tokens} is less than one step ({per_step} tokens{ranks})")
    n = _known_sequences(_train_path(cfg), d.n_ctx)
    if n is not None:
        check_one_step(cfg, n - (-(-d.holdout_tokens // d.n_ctx) if d.eval == "holdout" else 0))


def _check_blocks_after(cfg: Config, layers: int) -> None:
    """Activation checkpointing recomputes the blocks after the first SAE: there must be one."""
    starts = [graph_start(p.split("->")[0].strip()) for p in cfg.saes.positions]
    if all(s is not None and s >= layers for s in starts):
        raise E2EDictError(
            f"train.activation_checkpointing: no block of the model's {layers} runs after the SAEs "
            f"({', '.join(cfg.saes.positions)}), so there is nothing to recompute"
        )


def _check_gpu_memory(cfg: Config, ctx: DistContext) -> None:
    import torch

    total = torch.cuda.get_device_properties(torch.device(cfg.model.device)).total_memory
    check_memory(cfg, ctx.world, total, show=ctx.is_main)


def _train_path(cfg: Config) -> str:
    from e2edict.sources import source_fields

    return source_fields(cfg.data.train)["path"]


def _known_sequences(path: str, n_ctx: int) -> int | None:
    """Sequences of ``n_ctx`` a source holds where its files say so cheaply; None otherwise (the
    full check after the model loads names whatever is wrong with the files)."""
    from e2edict.sources import MANIFEST, source_kind

    try:
        kind = source_kind(path, "data.train")
        if kind == "npy":
            shape = np.load(Path(path).expanduser(), mmap_mode="r", allow_pickle=False).shape
            return shape[0] // max(1, n_ctx - 1) if len(shape) == 1 else None
        if kind == "shards":
            m = json.loads((Path(path).expanduser() / MANIFEST).read_text())
            return int(m["sequences"]) if int(m["n_ctx"]) == n_ctx else None
    except (E2EDictError, ValueError, OSError, KeyError, TypeError):
        return None
    return None


def on_main(ctx: DistContext, fn) -> None:
    """Run ``fn`` on rank 0; if it fails there, every rank fails (nobody waits forever)."""
    error: Exception | None = None
    if ctx.is_main:
        try:
            fn()
        except Exception as e:  # re-raised below, on rank 0 as itself
            error = e
    if ctx.broadcast_flag(error is not None):
        raise error if error is not None else E2EDictError("rank 0 failed to prepare the run; see its message")


def _trainable(saes: dict[str, SAE], adapter, adapter_lr: float | None) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: the SAEs' parameters (unless saes.trainable is false), then
    the adapter's, at ``adapter.lr`` where the config gives one."""
    groups = [{"params": [p for s in saes.values() for p in s.parameters() if p.requires_grad]}]
    if adapter is not None:
        groups.append({"params": adapter.parameters(), **({"lr": adapter_lr} if adapter_lr else {})})
    return [g for g in groups if g["params"]]


def _step_saes(cfg: Config, saes: dict[str, SAE], ctx: DistContext) -> dict:
    """The SAEs the step calls: wrapped in DDP under torchrun (held SAEs have no gradient to
    average; an adapter's is averaged by `TrainStep`); under ``train.compile`` the sparse decode
    off (static shapes: the ragged sparse paths would recompile every step)."""
    step_saes: dict = dict(saes)
    if ctx.enabled and cfg.saes.trainable:
        from torch.nn.parallel import DistributedDataParallel

        ids = [ctx.local_rank] if str(cfg.model.device).startswith("cuda") else None
        step_saes = {h: DistributedDataParallel(s, device_ids=ids) for h, s in step_saes.items()}
    if cfg.train.compile:  # the whole forward is compiled by `TrainStep`
        for s in saes.values():
            if hasattr(s, "sparse_decode"):
                s.sparse_decode = False
    return step_saes


def _resume(run: Run, batches) -> int:
    """Restore the newest intact checkpoint (if any); trim metrics.jsonl to it; return its step."""
    ctx, first_step = run.ctx, 0
    found = latest_checkpoint(run.run_dir, warn=lambda m: print(m, file=sys.stderr) if ctx.is_main else None)
    if found is not None:
        world = found[1][0].get("world_size", 1)
        if world != ctx.world:
            raise E2EDictError(f"the checkpoint was written by {world} ranks; resume it with {world}, not {ctx.world}")
        doc = restore(found[1], run.checkpointed(), run.step.opt, run.step.sched)
        batches.load_state(doc["data"])
        first_step = doc["step"]
        if ctx.is_main:
            print(f"e2edict: resuming {run.run_dir} from step {first_step} ({doc['tokens']} tokens)", file=sys.stderr)
    if ctx.is_main:
        run.rundir.trim_metrics(first_step)
    ctx.barrier()
    return first_step


def _wandb(cfg: Config, run_dir: Path):
    if not cfg.wandb.project:
        return None
    return import_wandb().init(
        project=cfg.wandb.project, entity=cfg.wandb.entity, name=cfg.name, dir=str(run_dir), config=cfg.to_dict()
    )


def import_wandb():
    try:
        import wandb
    except ImportError:
        raise E2EDictError("wandb.project is set but wandb is not installed (pip install 'e2edict[wandb]')") from None
    return wandb
