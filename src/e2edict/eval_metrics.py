"""The accumulators behind `e2edict.evaluation.evaluate_saes`: each metric family of method §5
summed over batches and read once at the end.

Explained variance is pooled (``1 - sum_t ||a - a_hat||^2 / sum_t ||a - mean||^2``), accumulated
in float64 over all evaluated tokens; the per-token ratio the reference code averages is not used.
"""

from __future__ import annotations

from typing import Any

import torch

from e2edict.backbones.base import Backbone
from e2edict.losses import kl_loss, next_token_ce
from e2edict.saes.base import SAE
from e2edict.splice import SpliceOutput, shared_prefix, splice_hooks


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


class Accumulators:
    """One accumulator per metric family: the output (CE, KL), each SAE (reconstruction, L0, norm
    ratio, CE-loss score), the residual hooks after the first SAE (``later``; each SAE's
    ``downstream_explained_variance`` reads those after it), latents' firing, nested dictionaries."""

    def __init__(self, backbone: Backbone, saes: dict[str, SAE], later: list[str], n_ctx: int, device, ce_score: bool):
        self.backbone, self.saes, self.later = backbone, saes, later
        self.output = OutputStats()
        self.per_sae = {h: _SAEStats(n_ctx) for h in saes}
        self.ce = _CEScore(backbone, saes) if ce_score else None
        self.down = {h: _Pooled() for h in later}
        self.firing = _Firing(saes, device)
        self.nested = {h: _NestedStats(s) for h, s in saes.items() if s.nested()}

    def add(self, out: SpliceOutput, x: torch.Tensor, keep: int) -> None:
        self.output.add(out, x, keep)
        for h in self.saes:
            self.per_sae[h].add(out.targets[h][:keep], out.recons[h][:keep], out.codes[h][:keep])
        if self.ce is not None:
            self.ce.add(x, out.logits_spliced[:keep])
        for h in self.later:
            self.down[h].add(out.clean_acts[h][:keep], out.spliced_acts[h][:keep])
        for h, ns in self.nested.items():
            ns.add(self.backbone, self.saes, h, x, out.codes[h][:keep], out.targets[h][:keep])

    def result(self, alive_tokens: int, densities: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        o = self.output
        result: dict[str, Any] = {"tokens": o.n_tok, "alive_tokens": alive_tokens, **o.result(), "saes": {}}
        clean = result["ce_loss_clean"]
        order = self.backbone.block_order
        for h, sae in self.saes.items():
            entry = {
                "kind": sae.kind,
                **({"hook_name_out": sae.hook_name_out} if sae.hook_name_out else {}),
                **self.firing.counts(h, sae.d_sae),
                **self.per_sae[h].result(o.n_tok),
                **(self.ce.result(h, sae, o.n_pred, clean) if self.ce is not None else _CEScore.empty(sae)),
                "downstream_explained_variance": {
                    k: self.down[k].explained_variance() for k in self.later if order(k) > order(h)
                },
            }
            if h in self.nested:
                entry["prefixes"] = self.nested[h].result(o.n_tok, o.n_pred, clean)
            density = self.firing.density(h, alive_tokens)
            entry["log10_feature_density"] = [round(v, 3) for v in log10_density(density).tolist()]
            if densities is not None:
                densities[h] = density
            result["saes"][h] = _ordered(entry)
        return result


_KEY_ORDER = ("kind", "hook_name_out", "l0", "alive", "dead", "d_sae", "explained_variance", "mse", "ce_loss_alone",
              "ce_loss_zero_ablation", "ce_loss_mean_ablation", "ce_loss_score", "norm_ratio_pos0", "norm_ratio_pos_gt0",
              "norm_ratio_by_position", "downstream_explained_variance", "prefixes", "log10_feature_density")  # fmt: skip


def _ordered(entry: dict[str, Any]) -> dict[str, Any]:
    """eval.json's per-SAE keys in their documented order."""
    return {k: entry[k] for k in _KEY_ORDER if k in entry}


class OutputStats:
    """The model's output: clean and spliced next-token CE, and the KL, over the evaluated tokens."""

    def __init__(self) -> None:
        self.ce_clean = self.ce_spliced = self.kl = 0.0
        self.n_pred = self.n_tok = 0

    def add(self, out: SpliceOutput, x: torch.Tensor, keep: int) -> None:
        clean, spliced = out.logits_clean[:keep], out.logits_spliced[:keep]
        self.ce_clean += next_token_ce(clean, x).sum().item()
        self.ce_spliced += next_token_ce(spliced, x).sum().item()
        self.n_pred += x[:, 1:].numel()
        self.kl += kl_loss(clean, spliced).item() * x.numel()
        self.n_tok += x.numel()

    def result(self) -> dict[str, float]:
        return {
            "ce_loss_clean": self.ce_clean / self.n_pred,
            "ce_loss_spliced": self.ce_spliced / self.n_pred,
            "ce_loss_increase": (self.ce_spliced - self.ce_clean) / self.n_pred,
            "kl": self.kl / self.n_tok,
        }


class _SAEStats:
    """One SAE's reconstruction (pooled explained variance, MSE), L0, and the norm ratio
    ``||a_hat|| / ||a||`` by position."""

    def __init__(self, n_ctx: int) -> None:
        self.pooled = _Pooled()
        self.l0 = 0.0
        self.ratio_sum = torch.zeros(n_ctx, dtype=torch.float64)
        self.ratio_n = 0

    def add(self, target: torch.Tensor, recon: torch.Tensor, codes: torch.Tensor) -> None:
        self.pooled.add(target, recon)
        self.l0 += (codes != 0).sum().item()
        ratio = recon.double().norm(dim=-1) / target.double().norm(dim=-1).clamp_min(1e-12)
        self.ratio_sum += ratio.sum(0).cpu()
        self.ratio_n += len(target)

    def result(self, n_tok: int) -> dict[str, Any]:
        by_pos = (self.ratio_sum / self.ratio_n).tolist()
        return {
            "l0": self.l0 / n_tok,
            "explained_variance": self.pooled.explained_variance(),
            "mse": self.pooled.mse(),
            "norm_ratio_pos0": by_pos[0],
            "norm_ratio_pos_gt0": sum(by_pos[1:]) / max(1, len(by_pos) - 1),
            "norm_ratio_by_position": by_pos,
        }


class _CEScore:
    """The CE-loss score per SAE: the CE with this SAE alone spliced in, against ablating what it
    replaces (`_ablation`): ``(zero - alone) / (zero - clean)``."""

    def __init__(self, backbone: Backbone, saes: dict[str, SAE]) -> None:
        self.backbone, self.saes = backbone, saes
        self.alone = dict.fromkeys(saes, 0.0)
        self.zero = dict.fromkeys(saes, 0.0)

    def add(self, x: torch.Tensor, logits_spliced: torch.Tensor) -> None:
        for h, sae in self.saes.items():
            if len(self.saes) == 1:  # the spliced run is this SAE alone
                self.alone[h] += next_token_ce(logits_spliced, x).sum().item()
            else:
                self.alone[h] += _ce_with_hooks(self.backbone, x, _alone(self.saes, h))
            self.zero[h] += _ce_with_hooks(self.backbone, x, _ablation(sae, h))

    def result(self, h: str, sae: SAE, n_pred: int, clean: float) -> dict[str, float]:
        zero, alone = self.zero[h] / n_pred, self.alone[h] / n_pred
        return {
            "ce_loss_alone": alone,
            _ablation_key(sae): zero,
            "ce_loss_score": (zero - alone) / (zero - clean) if zero != clean else float("nan"),
        }

    @staticmethod
    def empty(sae: SAE) -> dict[str, float]:
        return {"ce_loss_alone": 0.0, _ablation_key(sae): 0.0, "ce_loss_score": float("nan")}


def _ablation_key(sae: SAE) -> str:
    return "ce_loss_mean_ablation" if sae.hook_name_out else "ce_loss_zero_ablation"


class _Firing:
    """How often each latent fired, over the alive tokens (on the device until the end)."""

    def __init__(self, saes: dict[str, SAE], device) -> None:
        self.fired = {h: torch.zeros(s.d_sae, dtype=torch.long, device=device) for h, s in saes.items()}

    def add(self, codes: dict[str, torch.Tensor]) -> None:
        for h, c in codes.items():
            self.fired[h] += (c != 0).reshape(-1, c.shape[-1]).sum(0)

    def counts(self, h: str, d_sae: int) -> dict[str, int]:
        alive = int((self.fired[h] > 0).sum().item())
        return {"alive": alive, "dead": d_sae - alive, "d_sae": d_sae}

    def density(self, h: str, alive_tokens: int) -> torch.Tensor:
        return (self.fired[h].double() / alive_tokens).cpu()


def codes_only(backbone: Backbone, saes: dict[str, SAE], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every SAE's code on the spliced run, which stops at the last hook the SAEs need: no clean
    run, no logits (what the firing counts of the alive pass need)."""
    if len(x) == 0:
        return {}
    out = SpliceOutput(torch.zeros(()), {}, {}, {}, {})
    outputs = {h: s.hook_name_out for h, s in saes.items() if s.hook_name_out}
    hooks = splice_hooks(saes, outputs, out)  # without logits the run ends at the last hook
    layer, resid = shared_prefix(backbone, saes, x, two_runs=False)
    backbone.run_from(resid, layer, hooks, logits=False)
    return out.codes


class _NestedStats:
    """An SAE's nested sub-dictionaries (Matryoshka prefixes, `SAE.nested`), each judged alone:
    its L0 (active latents among its first m), the explained variance of its reconstruction, and
    the CE loss with it alone spliced in."""

    def __init__(self, sae: SAE) -> None:
        self.sizes = sae.nested()
        self.l0 = [0.0] * len(self.sizes)
        self.ce = [0.0] * len(self.sizes)
        self.pooled = [_Pooled() for _ in self.sizes]

    def add(self, backbone: Backbone, saes: dict[str, SAE], h: str, x: torch.Tensor, codes, target) -> None:
        sae = saes[h]
        D = sae.normalized_decoder()
        for i, m in enumerate(self.sizes):
            self.l0[i] += (codes[..., :m] != 0).sum().item()
            self.pooled[i].add(target, sae.decode_nested(codes, i, D))
            with sae.using_nested(i):
                self.ce[i] += _ce_with_hooks(backbone, x, _alone(saes, h))

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
    layer, resid = shared_prefix(backbone, hooks, x, two_runs=False)
    logits = backbone.run_from(resid, layer, hooks)
    return next_token_ce(logits, x).sum().item()


def log10_density(density: torch.Tensor) -> torch.Tensor:
    """SAELens's feature-sparsity convention: log10 of the firing frequency, with 1e-10 added."""
    return torch.log10(density + 1e-10).float()


def density_from_log10(log_density: torch.Tensor) -> torch.Tensor:
    """The inverse of `log10_density` (a latent that never fired comes back as 0)."""
    return (10 ** log_density.double() - 1e-10).clamp_min(0)
