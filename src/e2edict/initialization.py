"""How new SAEs start: ``saes.init``, ``saes.b_dec_init``, ``saes.apply_b_dec_to_input``.

The paper's SAE starts from an orthogonal decoder, an independent Kaiming-uniform encoder and
small random biases; the architectures' constructors draw that. Libraries tuned for short budgets
start closer to a good solution (sparsify; SAELens's options): the encoder tied to the
dictionary (each latent first reads the direction it writes, so the first top-k picks are
meaningful), the encoder bias at 0, and ``b_dec`` at the data's centre, which with
``apply_b_dec_to_input`` also centres what the encoder reads. The data-dependent part is computed
once, from the clean activations of the first training step's tokens, before any step is taken.

`initial_saes` is the one place a run's SAEs get their starting weights: copies of the warm-start
SAEs (``saes.init_from``), or new ones of the configured architecture, initialised here.
"""

from __future__ import annotations

import torch

from e2edict.backbones import Backbone
from e2edict.errors import E2EDictError
from e2edict.saes import SAE, registry
from e2edict.saes.base import Writes
from e2edict.splice import shared_prefix


def initial_saes(setup, batches, grad_accum: int) -> dict[str, SAE]:
    """The run's SAEs before its first step (``setup``: `e2edict.run.RunSetup`): copies of the
    warm-start SAEs, or new ones (`build_saes`, `initialize`) with ``b_dec`` from the clean
    activations of the first step's ``grad_accum`` batches where ``saes.b_dec_init`` asks for it;
    ``batches`` is rewound to where it was."""
    cfg = setup.cfg
    torch.manual_seed(cfg.seed)
    if setup.init_from is not None:
        return warm_start(setup.init_from, setup.d_in, cfg.saes, cfg.model.device)
    saes = build_saes(setup)
    initialize(saes, cfg.saes)
    if needs_data(cfg.saes):  # every rank alike, then rewound
        start = batches.state()
        first = [batches.next().to(cfg.model.device) for _ in range(grad_accum)]
        b_dec_from_data(saes, setup.backbone, first, cfg.saes.b_dec_init)
        batches.load_state(start)
    return saes


def warm_start(loaded: dict[str, SAE], hooks, cfg, device: str) -> dict[str, SAE]:
    """Copies of the loaded SAEs at ``hooks``, set up for training as the ``saes`` block says:
    in training mode, or held fixed (inference behaviour, no gradient) under ``trainable: false``."""
    import copy

    saes = {h: copy.deepcopy(loaded[h]).to(device) for h in hooks}
    for sae in saes.values():
        sae.configure_training(cfg)
        if cfg.trainable:
            sae.train()  # loaded in eval mode (`load_saes`)
        else:
            sae.requires_grad_(False)
    return saes


def build_saes(setup) -> dict[str, SAE]:
    """New SAEs of the configured architecture at each position, transcoders where the position
    names an output hook, as their constructors draw them."""
    s = setup.cfg.saes
    cls = registry[s.architecture]
    saes = {}
    for h, d in setup.d_in.items():
        writes = None
        if h in setup.outputs:
            out = setup.outputs[h]
            writes = Writes(setup.backbone.hook_shapes()[out][0], out, skip=s.kind == "skip_transcoder")
        # `writes` only for transcoders: an architecture that cannot be one need not take it
        extra = {} if writes is None else {"writes": writes}
        sae = cls.from_config(d, setup.d_sae[h], h, s, **extra)
        sae.configure_training(s)
        saes[h] = sae.to(setup.cfg.model.device)
    return saes


def initialize(saes: dict[str, SAE], cfg) -> None:
    """Apply the ``saes`` block's (`e2edict.config.SAEsConfig`) data-free choices to freshly built SAEs."""
    for sae in saes.values():
        sae.apply_b_dec_to_input = cfg.apply_b_dec_to_input
        if cfg.init == "tied":
            tie_encoder(sae)
        if cfg.b_dec_init == "zero":
            with torch.no_grad():
                sae.b_dec.zero_()
        if cfg.decoder_norm == "project":
            sae.renormalize_decoder()


def needs_data(cfg) -> bool:
    return cfg.init_from is None and cfg.b_dec_init in ("mean", "geometric_median")


@torch.no_grad()
def tie_encoder(sae: SAE) -> None:
    """``W_enc = D^T`` (the unit-norm dictionary, transposed) and the encoder biases at 0."""
    W_enc = getattr(sae, "W_enc", None)
    if W_enc is None or tuple(W_enc.shape) != (sae.d_in, sae.d_sae) or sae.d_out != sae.d_in:
        raise E2EDictError(f"saes.init=tied: a {sae.architecture} {sae.kind} has no encoder to tie to its dictionary")
    W_enc.copy_(sae.normalized_decoder().T)
    for name in ("b_enc", "b_gate", "b_mag"):
        b = getattr(sae, name, None)
        if isinstance(b, torch.nn.Parameter):
            b.zero_()


@torch.no_grad()
def b_dec_from_data(saes: dict[str, SAE], backbone: Backbone, batches: list[torch.Tensor], how: str) -> None:
    """Set each SAE's ``b_dec`` to the mean or geometric median of the clean activations it
    reconstructs (a transcoder's: its output hook) over the token ``batches``."""
    targets = {h: sae.hook_name_out or h for h, sae in saes.items()}
    got: dict[str, list[torch.Tensor]] = {t: [] for t in targets.values()}

    def keep(name: str):
        def fn(act: torch.Tensor) -> None:
            got[name].append(act.detach().reshape(-1, act.shape[-1]).double())

        return fn

    for tokens in batches:
        first, resid = shared_prefix(backbone, saes, tokens, two_runs=False)
        backbone.run_from(resid, first, {t: keep(t) for t in got}, logits=False)
    for h, sae in saes.items():
        x = torch.cat(got[targets[h]])
        centre = x.mean(0) if how == "mean" else geometric_median(x)
        sae.b_dec.copy_(centre.to(sae.b_dec.dtype))


def geometric_median(x: torch.Tensor, iters: int = 200, tol: float = 1e-9) -> torch.Tensor:
    """The point minimising the sum of Euclidean distances to the rows of ``x`` [n, d], by
    Weiszfeld's iteration (each step a distance-weighted mean; distances clamped away from 0 so a
    data point as the iterate does not divide by zero), started from the mean."""
    x = x.double()
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=1).clamp_min(1e-12)
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - m).norm() <= tol * (1.0 + m.norm()):
            return new
        m = new
    return m
