"""Everything a run needs, built from a config and validated before anything is written:
the backbone, the SAE positions and widths, the downstream hooks, the token data."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from e2edict.backbones import Backbone
from e2edict.config import Config
from e2edict.data import SequenceStream, build_data, eval_sequences, first_rows, open_sequences
from e2edict.errors import E2EDictError
from e2edict.presets import PRESETS
from e2edict.rundir import RunDir
from e2edict.saes import SAE, registry
from e2edict.saes.pretrained import load_source
from e2edict.splice import LossWeights

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def build_backbone(cfg: Config, device: str | None = None) -> Backbone:
    """The configured model, on ``device`` (default ``model.device``)."""
    m = cfg.model
    return open_backbone(
        m.name, m.backend, device or m.device, DTYPES[m.dtype], m.process_weights, m.trust_remote_code, m.fused_attention
    )


def open_backbone(
    name: str,
    backend: str = "transformer_lens",
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    process_weights: bool = False,
    trust_remote_code: bool = False,
    fused_attention: bool = True,
) -> Backbone:
    """A frozen model behind the `Backbone` interface, from either backend."""
    if backend == "huggingface":
        from e2edict.backbones import HFBackbone, load_hf_causal_lm

        model, tokenizer = load_hf_causal_lm(name, device, dtype, trust_remote_code)
        return HFBackbone(model, tokenizer, name)
    if backend != "transformer_lens":
        raise E2EDictError(f"unknown model backend {backend!r}; known: transformer_lens, huggingface")
    from e2edict.backbones import TLBackbone, load_hooked_transformer

    model = load_hooked_transformer(name, device=device, dtype=dtype, process_weights=process_weights)
    return TLBackbone(model, name, fused_attention=fused_attention)


@dataclass
class RunSetup:
    cfg: Config
    backbone: Backbone
    d_in: dict[str, int]
    downstream: list[str]  # the hooks of the downstream loss (empty when its coefficient is 0)
    train_data: object  # a random-access sequence set, or a `SequenceStream` (see `e2edict.data`)
    eval_seqs: torch.Tensor
    init_from: dict[str, SAE] | None = None  # warm start (saes.init_from), already checked
    outputs: dict[str, str] = field(default_factory=dict)  # transcoders: input hook -> output hook
    written: dict[str, str] = field(default_factory=dict)  # input hook -> the position as the config wrote it

    @property
    def adapter(self):
        """The adapter the backbone carries (`adapter:` in the config), or None."""
        return self.backbone.adapter

    def loss_weights(self) -> LossWeights:
        """The run's coefficients. Under ``loss.preset: finetune`` each loaded SAE keeps the sparsity
        term it was trained with: none where k fixes L0 (TopK, BatchTopK, Matryoshka), its own
        lambda where its file records one, else the configured one."""
        weights = LossWeights.from_config(self.cfg.loss, self.written, self.downstream)
        if PRESETS[self.cfg.loss.preset].keeps_source_sparsity and self.init_from is not None:
            for h, sae in self.init_from.items():
                if not sae.has_sparsity_term:
                    weights.sparsity[h] = 0.0
                elif sae.source_lambda is not None:
                    weights.sparsity[h] = sae.source_lambda
        return weights

    @property
    def d_sae(self) -> dict[str, int]:
        return {h: dictionary_size(self.cfg, d) for h, d in self.d_in.items()}


def dictionary_size(cfg: Config, d_in: int) -> int:
    """Latents of an SAE reading ``d_in`` wide activations: ``saes.dict_ratio x d_in``, at least 1."""
    return max(1, round(cfg.saes.dict_ratio * d_in))


def check_one_step(cfg: Config, n_sequences: int) -> None:
    """Training data must hold at least one step's sequences (train.batch_size x train.grad_accum)."""
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    if n_sequences < per_step:
        raise E2EDictError(
            f"data.train has {max(0, n_sequences)} sequences of {cfg.data.n_ctx} tokens, fewer than one step's "
            f"{per_step} (train.batch_size x train.grad_accum)"
        )


def setup_run(cfg: Config, source: tuple[dict[str, SAE], str] | None = None) -> RunSetup:
    """Load and check everything that needs the model; raise `E2EDictError` on the first problem.
    ``source``: ``saes.init_from``'s SAEs as `e2edict.saes.pretrained.load_source` gave them
    (loaded here where not given). Under ``train.shard_model`` the model is loaded on the CPU: the
    split (`e2edict.distributed.ShardedModel`) moves each rank's share to its device, so no device
    ever holds it whole."""
    backbone = build_backbone(cfg, "cpu" if cfg.train.shard_model else None)
    resolved, outputs = _resolve_positions(cfg, backbone)
    positions = list(resolved)
    shapes = backbone.hook_shapes()
    if cfg.data.n_ctx > backbone.n_ctx:
        raise E2EDictError(f"data.n_ctx={cfg.data.n_ctx} exceeds the model's context of {backbone.n_ctx}")
    downstream: list[str] = []
    if cfg.loss.downstream.coeff and cfg.loss.downstream.coeff > 0:
        if cfg.loss.downstream.positions is not None:
            downstream = list(cfg.loss.downstream.positions)
            backbone.check_hooks(downstream, "loss.downstream.positions")
            last = backbone.block_order(backbone.last_position([*positions, *outputs.values()]))
            early = [h for h in downstream if backbone.block_order(h) <= last]
            if early:
                raise E2EDictError(f"loss.downstream.positions {early} are not after the last SAE position")
        else:
            downstream = backbone.resid_hooks_after(backbone.last_position([*positions, *outputs.values()]))
        if not downstream:
            raise E2EDictError("loss.downstream.coeff > 0 but no residual hook lies after the last SAE")
    registry[cfg.saes.architecture].check_sizes(cfg.saes, {h: dictionary_size(cfg, shapes[h][0]) for h in positions})
    if cfg.train.activation_checkpointing and not backbone.runs_blocks_in_turn():
        raise E2EDictError(
            f"train.activation_checkpointing: model {backbone.name!r} cannot have its blocks called one after the other "
            "(checked on load: see docs/models-and-data.md), which checkpointing needs"
        )
    train_data, eval_seqs = build_data(cfg, backbone)
    if not isinstance(train_data, SequenceStream):
        check_one_step(cfg, len(train_data))
    init = _load_init(cfg, backbone, resolved, outputs, source) if cfg.saes.init_from else None
    if cfg.adapter is not None:  # the last check: the model is changed only once everything else holds
        from e2edict.adapters import attach_adapter

        attach_adapter(backbone, cfg.adapter, min(positions, key=backbone.block_order), cfg.seed)
    d_in = {h: shapes[h][0] for h in positions}
    return RunSetup(cfg, backbone, d_in, downstream, train_data, eval_seqs, init, outputs, resolved)


def _resolve_positions(cfg: Config, backbone: Backbone) -> tuple[dict[str, str], dict[str, str]]:
    """Each position's input hook (mapped to the position as written) and, for transcoders, its output hook."""
    kind = cfg.saes.kind
    written: dict[str, str] = {}
    outputs: dict[str, str] = {}
    for p in cfg.saes.positions:
        src, dst = resolve_position(backbone, p, kind)
        if src in written:
            raise E2EDictError(f"saes.positions: {written[src]!r} and {p!r} both read {src!r}")
        written[src] = p
        if dst is not None:
            outputs[src] = dst
    taken = [h for h in outputs.values() if h in written or list(outputs.values()).count(h) > 1]
    if taken:
        raise E2EDictError(f"saes.positions: {taken[0]!r} is written by one transcoder and read or written by another")
    return written, outputs


def resolve_position(backbone: Backbone, position: str, kind: str = "sae") -> tuple[str, str | None]:
    """``(input hook, output hook)`` of a ``saes.positions`` entry: a hook for an SAE
    (output None); for a transcoder ``"IN -> OUT"`` or an MLP's short name (`mlp_pairs`)."""
    if kind == "sae":
        if "->" in position:
            raise E2EDictError(f"saes.positions: {position!r} names a pair of hooks, but saes.kind is 'sae' (use transcoder)")
        backbone.check_hooks([position])
        return position, None
    mlps = backbone.mlp_pairs()
    if "->" in position:
        src, _, dst = (x.strip() for x in position.partition("->"))
    elif position in mlps:
        src, dst = mlps[position]
    else:
        short = ", ".join(mlps) or "none"
        raise E2EDictError(
            f"saes.positions: transcoder position {position!r} must be 'INPUT_HOOK -> OUTPUT_HOOK' or an MLP ({short})"
        )
    backbone.check_pair(src, dst, f"saes.positions: transcoder {position!r}")
    return src, dst


def _load_init(cfg: Config, backbone: Backbone, positions: dict[str, str], outputs: dict[str, str], source) -> dict[str, SAE]:
    """The SAEs named by ``saes.init_from``: one for every position, of the configured architecture and kind."""
    loaded = adopt_source(*(source or load_source(cfg.saes.init_from)), backbone)
    missing = [h for h in positions if h not in loaded]
    if missing:
        raise E2EDictError(
            f"saes.init_from {cfg.saes.init_from!r} has no SAE at {', '.join(missing)} (it has {', '.join(loaded)})"
        )
    picked = {h: loaded[h] for h in positions}
    backbone.check_saes(picked)
    for h, sae in picked.items():
        if sae.kind != cfg.saes.kind or sae.hook_name_out != outputs.get(h):
            raise E2EDictError(
                f"saes.init_from SAE at {h!r} is a {sae.kind} writing {sae.hook_name_out or h!r}, but the config asks for a "
                f"{cfg.saes.kind} writing {outputs.get(h, h)!r}"
            )
        sae.check_config(cfg.saes, f"saes.init_from SAE at {h!r}")
    return picked


def source_saes(spec: str, backbone: Backbone) -> dict[str, SAE]:
    """The SAEs of a source (`e2edict.saes.pretrained.load_source`) keyed by ``backbone``'s input hook names."""
    return adopt_source(*load_source(spec), backbone)


def adopt_source(loaded: dict[str, SAE], kind: str, backbone: Backbone) -> dict[str, SAE]:
    """A loaded source's SAEs keyed by ``backbone``'s input hook names: sparsify's module paths
    matched to the model's hooks, names in the other backend's naming mapped where that is
    unambiguous (`e2edict.backbones.naming.HookNames`)."""
    if kind == "sparsify":
        return {_sparsify_position(backbone, name, sae): sae for name, sae in loaded.items()}
    adopted = backbone.adopt_saes(loaded)
    for h, sae in adopted.items():
        sae.hook_name = h
    return adopted


def _sparsify_position(backbone: Backbone, name: str, sae: SAE) -> str:
    """The hook a sparsify hook point (a module path below the model's base, ``h.2``,
    ``layers.6.mlp``) names in ``backbone``; a transcoder's the MLP's input, its output the MLP's."""
    shapes = backbone.hook_shapes()
    ends = [h for h in shapes if h.endswith("." + name)]
    full = name if name in shapes else ends[0] if len(ends) == 1 else backbone.naming.own(name)
    if full is None or full not in shapes:
        raise E2EDictError(f"sparsify hook point {name!r} is not a hook of model {backbone.name!r} (nor one unambiguous match)")
    if sae.kind == "sae":
        sae.hook_name = full
        return full
    by_output = {dst: src for src, dst in backbone.mlp_pairs().values()}
    if full not in by_output:
        raise E2EDictError(f"sparsify transcoder at {name!r}: {full!r} is not an MLP's output in model {backbone.name!r}")
    sae.hook_name, sae.hook_name_out = by_output[full], full
    return by_output[full]


@dataclass
class LoadedRun:
    """A run directory read back for evaluation or reports: its config, model, SAEs and eval data."""

    rundir: RunDir
    cfg: Config
    backbone: Backbone
    saes: dict[str, SAE]
    eval_seqs: torch.Tensor

    @property
    def path(self) -> Path:
        return self.rundir.path


def load_run_dir(run_dir: str | Path, data: str | None = None, tokens: int | None = None) -> LoadedRun:
    """A run directory's config, model and SAEs, with its eval data (or ``data``, read up to
    ``tokens`` or the run's eval amounts)."""
    rundir = RunDir(run_dir).require()
    cfg = rundir.read_config()
    backbone = build_backbone(cfg)
    saes = rundir.load_saes(device=cfg.model.device)
    backbone.check_saes(saes)
    rundir.load_adapter(backbone)  # where the run trained one
    need = max(tokens or 0, cfg.eval.tokens, cfg.eval.alive_tokens)
    seqs = eval_sequences(data or cfg.data.eval, cfg, backbone, need)
    return LoadedRun(rundir, cfg, backbone, saes, seqs)


def load_foreign_saes(spec: str, model: str, backend: str, data: str | None, tokens: int, n_ctx: int):
    """SAEs from elsewhere (anything `saes.init_from` accepts) on ``model``, checked against it, with
    ``tokens`` of held-out data (``data``, or the embedded held-out text) as ``[N, n_ctx]`` sequences:
    ``(backbone, saes, sequences)``."""
    backbone = open_backbone(model, backend)
    saes = source_saes(spec, backbone)
    backbone.check_saes(saes)
    n_ctx = min(n_ctx, backbone.n_ctx)
    n = -(-tokens // n_ctx)
    seqs = first_rows(open_sequences(data or "tiny-val", backbone, n_ctx, "bos", "--data", limit_tokens=n * n_ctx), n)
    return backbone, saes, seqs
