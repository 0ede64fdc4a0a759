"""The shared-prefix step: one prefix run, then the clean and the spliced runs branch.

The blocks before the first SAE run once, without a graph. From there the clean run (no graph)
gives clean logits and activations, and the spliced run replaces each SAE position's activation
by the SAE's reconstruction; gradients reach only the SAEs (the model is frozen), and an adapter
where the model carries one (`e2edict.adapters`): the clean run is the original model, the
spliced run the adapted one, and the shared prefix ends at the first adapted block. With no KL and
no downstream term (local training) nothing past the last SAE runs. Where the backbone exposes
its output head, training takes the KL from the two runs' final hidden states with the
unembedding fused in (`e2edict.losses.head_kl_loss`): no [tokens, vocab] logits are kept.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from e2edict.backbones.base import Backbone
from e2edict.backbones.in_turn import chain
from e2edict.errors import E2EDictError
from e2edict.losses import downstream_loss, head_kl_loss, kl_alpha, kl_loss, target_variance
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
    kl_balance: bool = False  # the KL's coefficient times alpha = MSE / KL of the step, detached (loss.kl_balance)
    local_normalize: bool = False  # each local MSE over its target's batch variance (loss.local.normalize)
    clean_inputs: bool = False  # transcoders read the clean run's activation in the spliced run (loss.transcoder_input)

    @classmethod
    def from_config(cls, loss_cfg, positions: dict[str, str], downstream_positions: list[str]) -> LossWeights:
        """``positions``: each SAE's (input) hook mapped to the position as the config wrote it."""
        return cls(
            sparsity={h: loss_cfg.sparsity_coeff(h, raw) for h, raw in positions.items()},
            p=loss_cfg.sparsity.p,
            local=loss_cfg.local.coeff,
            kl=loss_cfg.kl.coeff,
            downstream=loss_cfg.downstream.coeff,
            downstream_positions=downstream_positions,
            kl_balance=bool(loss_cfg.kl_balance),
            local_normalize=loss_cfg.local.normalize,
            clean_inputs=loss_cfg.transcoder_input == "clean",
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
    clean_acts: dict[str, torch.Tensor] = field(default_factory=dict)  # SAE, transcoder output and downstream hooks, clean run
    spliced_acts: dict[str, torch.Tensor] = field(default_factory=dict)  # downstream hooks, spliced run
    # what each SAE should output: its input, or the activation a transcoder replaces
    targets: dict[str, torch.Tensor] = field(default_factory=dict)
    copies: int = 1  # the spliced run's copies of the batch (Matryoshka "all": one per prefix)


def unwrap(module: torch.nn.Module) -> SAE:
    """The SAE inside a DistributedDataParallel or torch.compile wrapper (whose forward the step calls)."""
    while True:
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if inner is None:
            return module
        module = inner


Prefix = tuple[int, torch.Tensor]  # the block the runs start at, and the residual stream entering it


def shared_prefix(backbone: Backbone, positions: Iterable[str], tokens: torch.Tensor, two_runs: bool = True) -> Prefix:
    """The blocks before the first of ``positions`` (hook names: the SAEs' dict, say) run once,
    without a graph: where the runs start, and the residual stream there. For ``two_runs`` (clean
    and spliced) with an adapter they start at the first adapted block where that is earlier (the
    clean run must not see it). The training step computes this before its compiled region: the
    prefix needs no gradient, and a backbone may run it through hooks."""
    first = min(backbone.start_block(h) for h in positions)
    adapted = backbone.adapted_from() if two_runs else None
    first = first if adapted is None else min(first, adapted)
    return first, backbone.embed_to(tokens, first)


def training_forward(backbone: Backbone, saes: dict[str, SAE], tokens: torch.Tensor, weights: LossWeights) -> SpliceOutput:
    """The loss of one step: its `shared_prefix`, then `training_forward_from` there."""
    start = shared_prefix(backbone, saes, tokens, weights.needs_output)
    return training_forward_from(backbone, saes, start, weights)


def training_forward_from(backbone: Backbone, saes: dict[str, SAE], start: Prefix, weights: LossWeights) -> SpliceOutput:
    """The loss of one step from its shared prefix. e2e and e2e+ds: the clean run (no graph) and
    the spliced run, with the KL from the final hidden states where the backbone has a fused head;
    each SAE in its training behaviour (`SAE.training_splice`, e.g. one stacked copy of the batch
    per Matryoshka prefix). Local: each SAE reads the clean activation, and nothing past the last
    SAE runs."""
    out = _new_output()
    if not weights.needs_output:
        _local_run(backbone, saes, start, out)
        out.terms, out.loss = _sae_terms(saes, out, weights)
        return out
    head = backbone.head() if weights.kl > 0 else None
    copies = _training_copies(saes)
    cores = [c for c in map(unwrap, saes.values()) if c.training]  # SAEs held fixed (eval mode) splice as at inference
    for core in cores:
        core.training_splice(True)
    try:
        logits, hidden = weights.kl > 0, head is not None
        _two_runs(backbone, saes, start, weights.downstream_positions, out, logits=logits, hidden=hidden, copies=copies,
                  clean_inputs=weights.clean_inputs)  # fmt: skip
    finally:
        for core in cores:
            core.training_splice(False)
    if copies > 1:
        _stack_clean(out, copies, weights.downstream_positions)
    out.terms, out.loss = _sae_terms(saes, out, weights)
    _output_terms(out, weights, head)
    return out


def evaluation_forward(backbone: Backbone, saes: dict[str, SAE], tokens: torch.Tensor, downstream: list[str]) -> SpliceOutput:
    """Everything evaluation reads: clean and spliced logits, every SAE's input, code, output and
    target, and both runs' activations at the ``downstream`` hooks; each SAE with its whole
    dictionary. No loss terms: the metrics (`e2edict.evaluation`) and the report compute what
    they need from these outputs."""
    out = _new_output()
    _two_runs(backbone, saes, shared_prefix(backbone, saes, tokens), downstream, out, logits=True, hidden=False, copies=1)
    return out


def _new_output() -> SpliceOutput:
    return SpliceOutput(torch.zeros(()), {}, {}, {}, {})


def hooked_positions(saes: dict[str, SAE], weights: LossWeights) -> list[str]:
    """Every hook a step's runs read or replace: the SAEs' inputs, the transcoders' outputs and
    the downstream positions (what `TrainStep` keeps hooks at, `Backbone.keep_hooks`)."""
    return [*saes, *_transcoder_outputs(saes).values(), *weights.downstream_positions]


def _transcoder_outputs(saes: dict[str, SAE]) -> dict[str, str]:
    """Each transcoder's input hook mapped to the output hook it writes."""
    outputs = {}
    for h, s in saes.items():
        out = unwrap(s).hook_name_out
        if out is not None:
            outputs[h] = out
    return outputs


def _two_runs(backbone, saes, start: Prefix, ds_hooks, out: SpliceOutput, logits: bool, hidden: bool, copies: int,
              clean_inputs: bool = False) -> None:  # fmt: skip
    """From the shared prefix, the clean run (no graph, without the model's adapter) and the
    spliced run (with it); ``copies`` > 1 stacks that many copies of the batch for the spliced run.
    ``clean_inputs``: each transcoder reads the clean run's activation (`splice_hooks`)."""
    positions, outputs = list(saes), _transcoder_outputs(saes)
    first, resid = start
    hooks = {h: _capture(out.clean_acts, h) for h in (*positions, *outputs.values(), *ds_hooks)}
    with torch.no_grad(), backbone.original():
        out.logits_clean = backbone.run_from(resid, first, hooks, logits=logits, hidden=hidden)
    hooks = splice_hooks(saes, outputs, out, clean_inputs)
    for h in ds_hooks:
        _add_hook(hooks, h, _capture(out.spliced_acts, h))
    spliced_resid = resid.repeat(copies, *([1] * (resid.dim() - 1))) if copies > 1 else resid
    out.logits_spliced = backbone.run_from(spliced_resid, first, hooks, logits=logits, hidden=hidden)
    for h in positions:  # an SAE's target is its input; a transcoder's the activation it replaced
        out.targets.setdefault(h, out.clean_acts[outputs[h]] if h in outputs else out.inputs[h])


def _local_run(backbone, saes, start: Prefix, out: SpliceOutput) -> None:
    """Each SAE reads the clean activation; the run stops at the last hook it needs."""
    positions, outputs = list(saes), _transcoder_outputs(saes)
    hooks = {h: _capture(out.clean_acts, h) for h in (*positions, *outputs.values())}
    with torch.no_grad():  # without logits the run ends at the last hook
        backbone.run_from(start[1], start[0], hooks, logits=False)
    for h in positions:
        out.recons[h], out.codes[h] = saes[h](out.clean_acts[h])
        out.inputs[h] = out.clean_acts[h]
        out.targets[h] = out.clean_acts[outputs[h]] if h in outputs else out.inputs[h]


def _output_terms(out: SpliceOutput, weights: LossWeights, head) -> None:
    """The KL and downstream terms (summed over stacked copies), added to the loss."""
    copies = out.copies
    if out.logits_spliced is not None and weights.kl > 0:
        if head is not None:  # final hidden states, not logits
            out.terms["kl"] = copies * head_kl_loss(head, out.logits_clean, out.logits_spliced)
            out.logits_clean = out.logits_spliced = None
        else:
            out.terms["kl"] = copies * kl_loss(out.logits_clean, out.logits_spliced)
        coeff = weights.kl
        if weights.kl_balance:
            mse = sum(v for k, v in out.terms.items() if k.startswith("local/"))
            out.terms["kl_alpha"] = kl_alpha(mse, out.terms["kl"])
            coeff = weights.kl * out.terms["kl_alpha"]
        out.loss = out.loss + coeff * out.terms["kl"]
    ds_hooks = weights.downstream_positions
    if ds_hooks and weights.downstream > 0:
        # Unit total here; the coefficient multiplies below so the logged term is comparable across runs.
        clean = {h: out.clean_acts[h] for h in ds_hooks}
        out.terms["downstream"] = copies * downstream_loss(out.spliced_acts, clean, 1.0)
        out.loss = out.loss + weights.downstream * out.terms["downstream"]


def _training_copies(saes: dict[str, SAE]) -> int:
    """How many stacked copies of the batch the training spliced run takes (`SAE.spliced_copies`):
    one per Matryoshka prefix under "all", else 1; SAEs asking for different numbers are refused."""
    counts = sorted({unwrap(s).spliced_copies() for s in saes.values() if unwrap(s).training} - {1})
    if len(counts) > 1:
        raise E2EDictError(
            "SAEs trained together in one stacked spliced run need equally many copies of the batch "
            f"(Matryoshka 'all': equally many prefixes, not {counts})"
        )
    return counts[0] if counts else 1


def _stack_clean(out: SpliceOutput, copies: int, ds_hooks: list[str]) -> None:
    """The clean run's outputs repeated once per prefix, to sit beside the stacked spliced run."""

    def rep(t: torch.Tensor) -> torch.Tensor:
        return t.repeat(copies, *([1] * (t.dim() - 1)))

    out.copies = copies
    if out.logits_clean is not None:
        out.logits_clean = rep(out.logits_clean)
    for h in ds_hooks:
        out.clean_acts[h] = rep(out.clean_acts[h])


def _capture(store: dict[str, torch.Tensor], name: str):
    def fn(act: torch.Tensor):
        store[name] = act

    return fn


def _add_hook(hooks: dict, name: str, fn) -> None:
    """Add ``fn`` at ``name``, after any hook already there (which may have replaced the activation)."""
    hooks[name] = fn if name not in hooks else chain(hooks[name], fn)


def splice_hooks(saes: dict[str, SAE], outputs: dict[str, str], out: SpliceOutput, clean_inputs: bool = False) -> dict:
    """The spliced run's hooks: an SAE replaces its activation by its reconstruction; a transcoder
    reads the spliced run's own input activation (with ``clean_inputs``, the clean run's: each
    transcoder then sees what circuit-tracer feeds it, and its target is the clean MLP output) and
    replaces the activation at its output hook."""
    hooks: dict = {}

    def run(name: str):
        def fn(act: torch.Tensor):
            if clean_inputs and name in outputs:
                act = out.clean_acts[name].to(act.dtype)
            a_hat, c = saes[name](act)
            out.inputs[name], out.recons[name], out.codes[name] = act, a_hat, c
            # the model's own dtype downstream (bf16 when it is held in bf16)
            return a_hat.to(act.dtype) if name not in outputs else None

        return fn

    def write(name: str):
        def fn(act: torch.Tensor):
            # the real MLP's output on the input the transcoder read: what it replaces
            out.targets[name] = out.clean_acts[outputs[name]] if clean_inputs else act
            return out.recons[name].to(act.dtype)

        return fn

    for h in saes:
        _add_hook(hooks, h, run(h))
        if h in outputs:
            _add_hook(hooks, outputs[h], write(h))
    return hooks


def _sae_terms(saes, out: SpliceOutput, weights: LossWeights) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each SAE's sparsity term, and its local MSE against its target (its input, or a
    transcoder's clean output activation) and auxiliary loss where wanted, with their weighted sum."""
    terms: dict[str, torch.Tensor] = {}
    total = None
    for h in saes:
        core = unwrap(saes[h])
        parts = {f"sparsity/{h}": (weights.sparsity[h], core.sparsity_loss(out.inputs[h], out.codes[h], weights.p))}
        if weights.local > 0:
            local = core.local_loss(out.recons[h], out.targets[h], out.codes[h])
            if weights.local_normalize:
                local = local / target_variance(out.targets[h])
            parts[f"local/{h}"] = (weights.local, local)
            aux = core.aux_loss(out.inputs[h], out.recons[h], out.codes[h])
            if aux is not None:  # e.g. the Gated SAE's auxiliary reconstruction, local training only
                parts[f"aux/{h}"] = (weights.local, aux)
        core.release_forward()  # every term of this forward is computed
        for name, (coeff, value) in parts.items():
            terms[name] = value
            if coeff == 0:  # logged, not in the loss: no backward through it (a TopK code's sum, say)
                continue
            total = coeff * value if total is None else total + coeff * value
    if total is None:
        total = torch.zeros((), device=next(iter(terms.values())).device) if terms else torch.zeros(())
    return terms, total
