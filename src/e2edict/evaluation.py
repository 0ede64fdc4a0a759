"""The metrics of method §5, on held-out tokens with every SAE spliced in at once.

Explained variance is pooled (``1 - sum_t ||a - a_hat||^2 / sum_t ||a - mean||^2``), accumulated
in float64 over all evaluated tokens; the per-token ratio the reference code averages is not used.
"""

from __future__ import annotations

from typing import Any

import torch

from e2edict.backbones.base import Backbone
from e2edict.errors import E2EDictError
from e2edict.losses import kl_loss, next_token_ce
from e2edict.saes.base import SAE, eval_mode
from e2edict.splice import LossWeights, SpliceOutput, splice_forward, splice_hooks


class _Pooled:
    """Sums for a pooled explained variance and an MSE between a target and a prediction."""

    def __init__(self) -> None:
        self.n = 0
        self.d = 0
        self.sse = 0.0
        self.sum_sq = 0.0
        self.sum: torch.Tensor | None = None

    def add(self, target: torch.Tensor, pred: torch.Tensor) -> None:
        t = target.detach().reshape(-1, target.shape[-1]).double()
        p = pred.detach().reshape(-1, pred.shape[-1]).double()
        self.n += t.shape[0]
        self.d = t.shape[1]
        self.sse += (t - p).pow(2).sum().item()
        self.sum_sq += t.pow(2).sum().item()
        s = t.sum(0)
        self.sum = s if self.sum is None else self.sum + s

    def explained_variance(self) -> float:
        total = self.sum_sq - self.sum.pow(2).sum().item() / self.n
        return 1.0 - self.sse / total if total > 0 else float("nan")

    def mse(self) -> float:
        return self.sse / (self.n * self.d)


def evaluate_backbone(
    backbone: Backbone,
    saes: dict[str, SAE],
    sequences: torch.Tensor,
    tokens: int | None = None,
    alive_tokens: int | None = None,
    batch_size: int = 16,
    downstream: list[str] | None = None,
    densities: dict[str, torch.Tensor] | None = None,
    ce_score: bool = True,
) -> dict[str, Any]:
    """Evaluate on the first ``tokens`` tokens of ``sequences`` ([N, n_ctx]).

    ``alive`` and each latent's firing density are measured over the first ``alive_tokens``
    tokens (more sequences are read if needed, or all there are). Pass a dict as ``densities``
    to receive each SAE's per-latent firing frequency. ``ce_score`` adds the CE-loss score (two
    more forward passes per SAE and batch)."""
    with eval_mode(saes), torch.no_grad():
        return _evaluate(backbone, saes, sequences, tokens, alive_tokens, batch_size, downstream, densities, ce_score)


def _evaluate(backbone, saes, sequences, tokens, alive_tokens, batch_size, downstream, densities, ce_score):
    if len(sequences) == 0:
        raise E2EDictError("evaluation data is empty")
    if not saes:
        raise E2EDictError("no SAEs to evaluate")
    backbone.check_saes(saes)
    n_ctx = sequences.shape[1]
    n_eval = len(sequences) if tokens is None else max(1, -(-tokens // n_ctx))
    n_alive = n_eval if alive_tokens is None else max(1, -(-alive_tokens // n_ctx))
    n_eval, n_alive = min(n_eval, len(sequences)), min(n_alive, len(sequences))
    first = min(saes, key=backbone.block_order)
    if downstream is None:
        downstream = [h for h in backbone.resid_hooks_after(first) if h not in saes]
    ds = downstream
    weights = LossWeights(sparsity=dict.fromkeys(saes, 0.0), downstream_positions=ds)
    device = next(next(iter(saes.values())).parameters()).device

    ce_clean = ce_spliced = kl = 0.0
    ce_alone = dict.fromkeys(saes, 0.0)
    ce_zero = dict.fromkeys(saes, 0.0)
    n_pred = n_tok = 0
    pooled = {h: _Pooled() for h in saes}
    down = {h: _Pooled() for h in ds}
    l0 = dict.fromkeys(saes, 0.0)
    ratio_sum = {h: torch.zeros(n_ctx, dtype=torch.float64) for h in saes}
    ratio_n = 0
    fired = {h: torch.zeros(s.d_sae, dtype=torch.long, device=device) for h, s in saes.items()}
    prefix_stats = {h: _PrefixStats(s) for h, s in saes.items() if len(getattr(s, "prefixes", ())) > 1}
    for start in range(0, max(n_eval, n_alive), batch_size):
        stop = min(start + batch_size, max(n_eval, n_alive))
        x = sequences[start:stop].to(device)
        out = splice_forward(backbone, saes, x, weights, full=True)
        for h in saes:
            fired[h] += (out.codes[h][: max(0, min(stop, n_alive) - start)] != 0).flatten(0, 1).sum(0)
        keep = max(0, min(stop, n_eval) - start)
        if keep == 0:
            continue
        x = x[:keep]
        ce_clean += next_token_ce(out.logits_clean[:keep], x).sum().item()
        ce_spliced += next_token_ce(out.logits_spliced[:keep], x).sum().item()
        n_pred += x[:, 1:].numel()
        kl += kl_loss(out.logits_clean[:keep], out.logits_spliced[:keep]).item() * x.numel()
        n_tok += x.numel()
        ratio_n += keep
        for h in saes:
            a, a_hat = out.targets[h][:keep], out.recons[h][:keep]
            pooled[h].add(a, a_hat)
            l0[h] += (out.codes[h][:keep] != 0).sum().item()
            ratio = a_hat.double().norm(dim=-1) / a.double().norm(dim=-1).clamp_min(1e-12)
            ratio_sum[h] += ratio.sum(0).cpu()
            # CE-loss score: this SAE alone spliced, against ablating what it replaces (`_ablation`)
            if not ce_score:
                continue
            if len(saes) == 1:
                ce_alone[h] += next_token_ce(out.logits_spliced[:keep], x).sum().item()
            else:
                ce_alone[h] += _ce_with_hooks(backbone, x, _alone(saes, h))
            ce_zero[h] += _ce_with_hooks(backbone, x, _ablation(saes[h], h))
        for h in ds:
            down[h].add(out.clean_acts[h][:keep], out.spliced_acts[h][:keep])
        for h, ps in prefix_stats.items():
            ps.add(backbone, saes, h, x, out.codes[h][:keep], out.targets[h][:keep])

    result: dict[str, Any] = {
        "tokens": n_tok,
        "alive_tokens": n_alive * n_ctx,
        "ce_loss_clean": ce_clean / n_pred,
        "ce_loss_spliced": ce_spliced / n_pred,
        "ce_loss_increase": (ce_spliced - ce_clean) / n_pred,
        "kl": kl / n_tok,
        "saes": {},
    }
    for h, sae in saes.items():
        alive = int((fired[h] > 0).sum().item())
        by_pos = (ratio_sum[h] / ratio_n).tolist()
        zero, alone = ce_zero[h] / n_pred, ce_alone[h] / n_pred
        clean = result["ce_loss_clean"]
        result["saes"][h] = {
            "kind": sae.kind,
            **({"hook_name_out": sae.hook_name_out} if sae.hook_name_out else {}),
            "l0": l0[h] / n_tok,
            "alive": alive,
            "dead": sae.d_sae - alive,
            "d_sae": sae.d_sae,
            "explained_variance": pooled[h].explained_variance(),
            "mse": pooled[h].mse(),
            "ce_loss_alone": alone,
            ("ce_loss_mean_ablation" if sae.hook_name_out else "ce_loss_zero_ablation"): zero,
            "ce_loss_score": (zero - alone) / (zero - clean) if ce_score and zero != clean else float("nan"),
            "norm_ratio_pos0": by_pos[0],
            "norm_ratio_pos_gt0": sum(by_pos[1:]) / max(1, len(by_pos) - 1),
            "norm_ratio_by_position": by_pos,
            "downstream_explained_variance": {
                k: down[k].explained_variance() for k in ds if backbone.block_order(k) > backbone.block_order(h)
            },
        }
        if h in prefix_stats:
            result["saes"][h]["prefixes"] = prefix_stats[h].result(n_tok, n_pred, result["ce_loss_clean"])
        density = (fired[h].double() / (n_alive * n_ctx)).cpu()
        result["saes"][h]["log10_feature_density"] = [round(v, 3) for v in log10_density(density).tolist()]
        if densities is not None:
            densities[h] = density
    return result


class _PrefixStats:
    """A Matryoshka SAE's prefixes, each judged alone: its L0 (active latents among its first m),
    the explained variance of its reconstruction, and the CE loss with it alone spliced in."""

    def __init__(self, sae: SAE) -> None:
        self.sizes = list(sae.prefixes)
        self.l0 = [0.0] * len(self.sizes)
        self.ce = [0.0] * len(self.sizes)
        self.pooled = [_Pooled() for _ in self.sizes]

    def add(self, backbone: Backbone, saes: dict[str, SAE], h: str, x: torch.Tensor, codes, target) -> None:
        sae = saes[h]
        D = sae.normalized_decoder()
        for i, m in enumerate(self.sizes):
            self.l0[i] += (codes[..., :m] != 0).sum().item()
            self.pooled[i].add(target, sae.decode_prefix(codes, i, D))
            sae.prefix_mode = i
            try:
                self.ce[i] += _ce_with_hooks(backbone, x, _alone(saes, h))
            finally:
                sae.prefix_mode = None

    def result(self, n_tok: int, n_pred: int, ce_clean: float) -> list[dict[str, Any]]:
        return [
            {
                "size": m,
                "l0": self.l0[i] / n_tok,
                "explained_variance": self.pooled[i].explained_variance(),
                "ce_loss_alone": self.ce[i] / n_pred,
                "ce_loss_increase": self.ce[i] / n_pred - ce_clean,
            }
            for i, m in enumerate(self.sizes)
        ]


def _alone(saes: dict[str, SAE], h: str) -> dict:
    """Hooks that splice the SAE (or transcoder) at ``h`` alone."""
    out = SpliceOutput(torch.zeros(()), {}, {}, {}, {})
    sae = saes[h]
    return splice_hooks({h: sae}, {h: sae.hook_name_out} if sae.hook_name_out else {}, out)


def _ablation(sae: SAE, h: str) -> dict:
    """The baseline of the CE-loss score: an SAE's activation zero-ablated (the paper's); a
    transcoder's output activation (an MLP's output) replaced by its mean over the batch's tokens."""
    if sae.hook_name_out is None:
        return {h: torch.zeros_like}
    return {sae.hook_name_out: lambda act: act.mean(dim=(0, 1), keepdim=True).expand_as(act)}


def _ce_with_hooks(backbone: Backbone, x: torch.Tensor, hooks: dict) -> float:
    """Summed next-token CE with the given hooks in place (from the block of the earliest)."""
    layer = min(backbone.block_of(h) for h in hooks)
    logits = backbone.run_from(backbone.embed_to(x, layer), layer, hooks)
    return next_token_ce(logits, x).sum().item()


def log10_density(density: torch.Tensor) -> torch.Tensor:
    """SAELens's feature-sparsity convention: log10 of the firing frequency, with 1e-10 added."""
    return torch.log10(density + 1e-10).float()


def density_from_log10(log_density: torch.Tensor) -> torch.Tensor:
    """The inverse of `log10_density` (a latent that never fired comes back as 0)."""
    return (10 ** log_density.double() - 1e-10).clamp_min(0)
