"""The shared-prefix step: one prefix run, then the clean and the spliced runs branch.

The blocks before the first SAE run once, without a graph. From there the clean run (no graph)
gives clean logits and activations, and the spliced run replaces each SAE position's activation
by the SAE's reconstruction; gradients reach only the SAEs (the model is frozen). With no KL and
no downstream term (local training) nothing past the last SAE runs. Where the backbone exposes
its output head, training takes the KL from the two runs' final hidden states with the
unembedding fused in (`e2edict.losses.head_kl_loss`): no [tokens, vocab] logits are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from e2edict.backbones.base import Backbone, StopForward
from e2edict.losses import downstream_loss, head_kl_loss, kl_loss, mse_loss
from e2edict.saes.base import SAE


@dataclass
class LossWeights:
    """Resolved coefficients for one run (see `e2edict.config.LossConfig`)."""

    sparsity: dict[str, float]
    p: float = 1.0
    local: float = 0.0
    kl: float = 0.0
    downstream: float = 0.0
    downstream_positions: list[str] = field(default_factory=list)

    @classmethod
    def from_config(cls, loss_cfg, positions: list[str], downstream_positions: list[str]) -> LossWeights:
        return cls(
            sparsity={h: loss_cfg.sparsity_coeff(h) for h in positions},
            p=loss_cfg.sparsity.p,
            local=loss_cfg.local.coeff,
            kl=loss_cfg.kl.coeff,
            downstream=loss_cfg.downstream.coeff,
            downstream_positions=downstream_positions,
        )

    @property
    def needs_output(self) -> bool:
        return self.kl > 0 or self.downstream > 0


@dataclass
class SpliceOutput:
    loss: torch.Tensor
    terms: dict[str, torch.Tensor]  # "sparsity/<hook>", "local/<hook>", "kl", "downstream"
    inputs: dict[str, torch.Tensor]  # each SAE's input activation
    recons: dict[str, torch.Tensor]
    codes: dict[str, torch.Tensor]
    logits_clean: torch.Tensor | None = None
    logits_spliced: torch.Tensor | None = None
    clean_acts: dict[str, torch.Tensor] = field(default_factory=dict)  # SAE and downstream hooks, clean run
    spliced_acts: dict[str, torch.Tensor] = field(default_factory=dict)  # downstream hooks, spliced run


def unwrap(module: torch.nn.Module) -> SAE:
    """The SAE inside a DistributedDataParallel or torch.compile wrapper (whose forward the step calls)."""
    while True:
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if inner is None:
            return module
        module = inner


def splice_forward(
    backbone: Backbone, saes: dict[str, SAE], tokens: torch.Tensor, weights: LossWeights, full: bool = False
) -> SpliceOutput:
    """One training (or, with ``full``, evaluation) forward.

    ``full`` runs the whole model even for local training, and returns logits and the clean and
    spliced activations at every downstream hook (what evaluation needs)."""
    positions = list(saes)
    first = min(backbone.block_of(h) for h in positions)
    ds_hooks = weights.downstream_positions
    resid = backbone.embed_to(tokens, first)
    run_output = full or weights.needs_output

    inputs: dict[str, torch.Tensor] = {}
    recons: dict[str, torch.Tensor] = {}
    codes: dict[str, torch.Tensor] = {}
    clean_acts: dict[str, torch.Tensor] = {}
    spliced_acts: dict[str, torch.Tensor] = {}
    logits_clean = logits_spliced = None

    def capture(store: dict[str, torch.Tensor], name: str, stop: bool = False):
        def fn(act: torch.Tensor):
            store[name] = act
            if stop:
                raise StopForward

        return fn

    head = backbone.head() if weights.kl > 0 and not full else None
    want_logits = weights.kl > 0 or full
    if run_output:
        clean_hooks = {h: capture(clean_acts, h) for h in (*positions, *ds_hooks)}
        with torch.no_grad():
            logits_clean = backbone.run_from(resid, first, clean_hooks, logits=want_logits, hidden=head is not None)

        def splice(name: str):
            sae = saes[name]

            def fn(act: torch.Tensor):
                a_hat, c = sae(act)
                inputs[name], recons[name], codes[name] = act, a_hat, c
                return a_hat.to(act.dtype)  # the model's own dtype downstream (bf16 when it is held in bf16)

            return fn

        hooks = {h: splice(h) for h in positions}
        hooks.update({h: capture(spliced_acts, h) for h in ds_hooks})
        logits_spliced = backbone.run_from(resid, first, hooks, logits=want_logits, hidden=head is not None)
    else:
        # Local: each SAE reads the clean activation; the run stops at the last SAE position.
        last = backbone.last_position(positions)
        hooks = {h: capture(clean_acts, h, stop=(h == last)) for h in positions}
        with torch.no_grad():
            backbone.run_from(resid, first, hooks, logits=False)
        for h in positions:
            a_hat, c = saes[h](clean_acts[h])
            inputs[h], recons[h], codes[h] = clean_acts[h], a_hat, c

    terms, total = _sae_terms(saes, inputs, recons, codes, weights, full)
    if logits_spliced is not None and want_logits:
        if head is not None:  # final hidden states, not logits
            terms["kl"] = head_kl_loss(head, logits_clean, logits_spliced)
            logits_clean = logits_spliced = None
        else:
            terms["kl"] = kl_loss(logits_clean, logits_spliced)
        total = total + weights.kl * terms["kl"]
    if ds_hooks and (weights.downstream > 0 or full):
        # Unit total here; the coefficient multiplies below so the logged term is comparable across runs.
        terms["downstream"] = downstream_loss(spliced_acts, {h: clean_acts[h] for h in ds_hooks}, 1.0)
        total = total + weights.downstream * terms["downstream"]
    return SpliceOutput(total, terms, inputs, recons, codes, logits_clean, logits_spliced, clean_acts, spliced_acts)


def _sae_terms(saes, inputs, recons, codes, weights: LossWeights, full: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each SAE's sparsity term, and its local MSE (and auxiliary loss) where wanted, with their weighted sum."""
    terms: dict[str, torch.Tensor] = {}
    total = None
    for h in saes:
        core = unwrap(saes[h])
        parts = {f"sparsity/{h}": (weights.sparsity[h], core.sparsity_loss(inputs[h], codes[h], weights.p))}
        if weights.local > 0 or full:
            parts[f"local/{h}"] = (weights.local, mse_loss(recons[h], inputs[h]))
            aux = core.aux_loss(inputs[h], recons[h], codes[h]) if weights.local > 0 else None
            if aux is not None:  # e.g. the Gated SAE's auxiliary reconstruction, local training only
                parts[f"aux/{h}"] = (weights.local, aux)
        for name, (coeff, value) in parts.items():
            terms[name] = value
            total = coeff * value if total is None else total + coeff * value
    return terms, total
