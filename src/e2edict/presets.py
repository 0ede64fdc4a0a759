"""The loss presets, in one table that the config (`e2edict.config`) and the run's loss weights
(`e2edict.run.RunSetup.loss_weights`) both read.

A preset gives the coefficients of the reconstruction terms (method §3: the paper's local, e2e
and e2e+ds; Karvonen 2025's fine-tuning; Chen, Engels & Tegmark 2025's adapter around frozen
SAEs) and everything else it decides where the config is silent: the KL balance, the decoder-norm
rule, whether the SAEs train, the training defaults, and what a fine-tune keeps of its source.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainDefaults:
    """What a preset sets in ``train`` where the config does not (`e2edict.config.Config`)."""

    optimizer: str
    lr: float


# The optimizer and rates benchmarks/short_budget.py found best at short budgets (30k tokens, 5% of
# the sources' training, and 60k) on the embedded model, by the worst gap closed over a ReLU and a TopK
# source (docs/performance.md). The rate was also AdamW's best there, so it serves any optimizer
# given without a rate. The papers' AdamW 5e-5 (Karvonen; Chen et al.) closed 8-20% (finetune) and
# 0.5-2% (adapter) there.
SHORT_BUDGET_FINETUNE = TrainDefaults("schedulefree", 1e-3)
SHORT_BUDGET_ADAPTER = TrainDefaults("schedulefree", 1e-2)


@dataclass(frozen=True)
class Preset:
    """One ``loss.preset``: the coefficients (local = MSE out-to-in, kl = logits KL, downstream =
    the in-to-original total over later layers) and the rest it decides."""

    local: float
    kl: float
    downstream: float
    sparsity: float | None = None  # lambda where the config gives none; None: the config's default
    kl_balance: bool = False  # alpha = MSE / KL each step (`e2edict.losses.kl_alpha`) unless kl or local is given
    decoder_norm: str = "reparam"  # saes.decoder_norm where not given
    trainable: bool = True  # saes.trainable where not given
    needs_adapter: bool = False
    train: TrainDefaults | None = None
    keeps_source_sparsity: bool = False  # each loaded SAE keeps its own sparsity term (`RunSetup.loss_weights`)

    def coefficients(self) -> dict[str, float]:
        return {"local": self.local, "kl": self.kl, "downstream": self.downstream}


PRESETS: dict[str, Preset] = {
    "local": Preset(local=1.0, kl=0.0, downstream=0.0),
    "e2e": Preset(local=0.0, kl=1.0, downstream=0.0),
    "e2e+ds": Preset(local=0.0, kl=0.5, downstream=2.5),
    # Karvonen (2025): ½(α·KL + MSE), α = MSE / KL recomputed each step, detached; unit decoder rows by projection
    "finetune": Preset(
        local=0.5, kl=0.5, downstream=0.0, kl_balance=True, decoder_norm="project",
        train=SHORT_BUDGET_FINETUNE, keeps_source_sparsity=True,
    ),  # fmt: skip
    # Chen, Engels & Tegmark (2025): an adapter around frozen SAEs, trained on the KL alone
    "adapter": Preset(
        local=0.0, kl=1.0, downstream=0.0, sparsity=0.0, trainable=False, needs_adapter=True, train=SHORT_BUDGET_ADAPTER
    ),
}
