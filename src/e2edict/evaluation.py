"""Evaluation, the last phase of a run and the one entry every evaluation goes through: the metrics
of method §5 on held-out tokens with every SAE spliced in at once (`evaluate_saes`; the sums
behind them in `e2edict.eval_metrics`), and the run's evaluation written to its directory
(`evaluate_and_record`: training's end, ``e2edict eval``, ``e2edict report``), the figures during
training (`brief_evaluation`, `eval_row`) and of warm-started SAEs before any step (`record_init`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from tqdm.auto import tqdm

from e2edict.attribution import run_graph_scores
from e2edict.backbones.base import Backbone
from e2edict.errors import E2EDictError
from e2edict.eval_metrics import Accumulators, OutputStats, codes_only
from e2edict.saes.base import SAE, eval_mode
from e2edict.splice import SpliceOutput, evaluation_forward


def evaluate_saes(
    backbone: Backbone,
    saes: dict[str, SAE],
    sequences: torch.Tensor,
    tokens: int | None = None,
    alive_tokens: int | None = None,
    batch_size: int = 16,
    densities: dict[str, torch.Tensor] | None = None,
    ce_score: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """The SAEs spliced into ``backbone``, evaluated on the first ``tokens`` tokens of ``sequences`` ([N, n_ctx]).

    ``alive`` and each latent's firing density are counted over the first ``alive_tokens``
    tokens (more sequences are read if needed, or all there are); the sequences past the first
    ``tokens`` run only up to the last SAE (codes are all the count needs). Pass a dict as
    ``densities`` to receive each SAE's per-latent firing frequency. ``ce_score`` adds the
    CE-loss score (two more forward passes per SAE and batch). ``progress``: a bar on stderr
    (off where stderr is not a terminal)."""
    if len(sequences) == 0:
        raise E2EDictError("evaluation data is empty")
    if not saes:
        raise E2EDictError("no SAEs to evaluate")
    backbone.check_saes(saes)
    n_ctx = sequences.shape[1]
    n_eval = min(len(sequences), len(sequences) if tokens is None else max(1, -(-tokens // n_ctx)))
    n_alive = min(len(sequences), n_eval if alive_tokens is None else max(1, -(-alive_tokens // n_ctx)))
    first = min(saes, key=backbone.block_order)
    # every residual hook after the first SAE; each SAE's figures read those after it
    # (training's downstream loss reads those after the last: `e2edict.run.setup_run`)
    later = [h for h in backbone.resid_hooks_after(first) if h not in saes]
    device = next(next(iter(saes.values())).parameters()).device
    acc = Accumulators(backbone, saes, later, n_ctx, device, ce_score)
    n_total = max(n_eval, n_alive)
    bar = tqdm(total=n_total * n_ctx, unit="tok", desc="evaluating", disable=True if not progress else None, leave=False)
    inference = backbone.adapter.evaluating() if backbone.adapter is not None else contextlib.nullcontext()
    with eval_mode(saes), inference, torch.no_grad(), bar:
        for start in range(0, n_total, batch_size):
            stop = min(start + batch_size, n_total)
            x = sequences[start:stop].to(device)
            keep, alive = max(0, min(stop, n_eval) - start), max(0, min(stop, n_alive) - start)
            if keep == 0:  # the alive pass alone: codes only
                acc.firing.add(codes_only(backbone, saes, x[:alive]))
            else:
                out = evaluation_forward(backbone, saes, x, later)
                acc.firing.add({h: c[:alive] for h, c in out.codes.items()})
                acc.add(out, x[:keep], keep)
            bar.update((stop - start) * n_ctx)
    return acc.result(n_alive * n_ctx, densities)


def evaluate_adapter(
    backbone: Backbone, sequences: torch.Tensor, tokens: int | None = None, batch_size: int = 16
) -> dict[str, float]:
    """How far the backbone's adapter alone moves the model (no SAEs): the next-token CE of the
    original and of the adapted model, its change, and KL(p_original ‖ p_adapted), per token."""
    adapter = backbone.adapter
    if adapter is None:
        raise E2EDictError("the model carries no adapter")
    n_ctx = sequences.shape[1]
    n = min(len(sequences), len(sequences) if tokens is None else max(1, -(-tokens // n_ctx)))
    device = next(iter(adapter.parameters())).device
    stats = OutputStats()
    first = adapter.first_block
    with adapter.evaluating(), torch.no_grad():
        for start in range(0, n, batch_size):
            x = sequences[start : min(start + batch_size, n)].to(device)
            resid = backbone.embed_to(x, first)  # the blocks before the first adapted one are the same
            with backbone.original():
                clean = backbone.run_from(resid, first, {})
            adapted = backbone.run_from(resid, first, {})
            out = SpliceOutput(torch.zeros(()), {}, {}, {}, {}, logits_clean=clean, logits_spliced=adapted)
            stats.add(out, x, len(x))
    r = stats.result()
    return {"ce_loss_original": r["ce_loss_clean"], "ce_loss_adapted": r["ce_loss_spliced"],
            "ce_loss_change": r["ce_loss_increase"], "kl": r["kl"], "tokens": n * n_ctx}  # fmt: skip


RUN_KEYS = ("ce_loss_clean", "ce_loss_spliced", "ce_loss_increase", "kl")  # the output figures a run records
SAE_KEYS = ("l0", "alive", "explained_variance", "mse")  # each SAE's figures during training


def brief_evaluation(backbone: Backbone, saes: dict[str, SAE], seqs: torch.Tensor, tokens: int, batch_size: int) -> dict:
    """The figures of an evaluation during a run (alive over the same tokens, no CE score)."""
    return evaluate_saes(backbone, saes, seqs, tokens=tokens, alive_tokens=tokens, batch_size=batch_size, ce_score=False)


def eval_row(result: dict[str, Any], step: int, tokens: int) -> dict[str, Any]:
    """metrics.jsonl's ``eval`` row of a `brief_evaluation`."""
    row: dict[str, Any] = {"step": step, "tokens": tokens, "split": "eval", **{k: result[k] for k in RUN_KEYS}}
    for h, m in result["saes"].items():
        for k in SAE_KEYS:
            row[f"{k}/{h}"] = m[k]
    return row


def record_init(rundir, backbone: Backbone, saes: dict[str, SAE], seqs: torch.Tensor, tokens: int, batch_size: int,
                write: bool = True) -> None:  # fmt: skip
    """Warm-started SAEs' figures on the run's eval tokens before any step (eval.json's ``init``;
    not written where not ``write``: a rank other than 0 of a sharded model)."""
    res = brief_evaluation(backbone, saes, seqs, tokens, batch_size)
    per_sae = {h: {k: m[k] for k in SAE_KEYS} for h, m in res["saes"].items()}
    if write:
        rundir.write_init_eval({**{k: res[k] for k in (*RUN_KEYS, "tokens") if k in res}, "saes": per_sae})


def evaluate_and_record(rundir, cfg, backbone: Backbone, saes: dict[str, SAE], seqs: torch.Tensor,
                        tokens: int | None = None, alive_tokens: int | None = None, progress: bool = False,
                        write: bool = True):  # fmt: skip
    """The run's evaluation (its ``eval`` settings, or ``tokens`` / ``alive_tokens``), written to
    its directory (`e2edict.rundir.RunDir`: eval.json and each SAE's sparsity file) unless not
    ``write`` (a rank other than 0 of a sharded model); returns the result and the densities.
    With an adapter, eval.json also holds `adapter_figures`; a transcoder run, the replacement and
    completeness scores of its attribution graphs (``graph``: `e2edict.attribution.run_graph_scores`)."""
    densities: dict[str, torch.Tensor] = {}
    result = evaluate_saes(
        backbone,
        saes,
        seqs,
        tokens=tokens or cfg.eval.tokens,
        alive_tokens=alive_tokens or cfg.eval.alive_tokens,
        batch_size=cfg.eval.batch_size,
        densities=densities,
        progress=progress,
    )
    if backbone.adapter is not None:
        result.update(adapter_figures(backbone, saes, seqs, tokens or cfg.eval.tokens, cfg.eval.batch_size))
    if cfg.eval.graph_prompts and all(s.hook_name_out is not None for s in saes.values()):
        e = cfg.eval
        result["graph"] = run_graph_scores(backbone, saes, seqs, e.graph_prompts, e.graph_tokens, e.graph_max_features)
    if write:
        rundir.record_evaluation(result, densities)
    return result, densities


def adapter_figures(backbone: Backbone, saes: dict[str, SAE], seqs: torch.Tensor, tokens: int, batch_size: int) -> dict:
    """eval.json's adapter sections beside the figures with SAEs and adapter: ``without_adapter``
    (the SAEs spliced into the original model) and ``adapter_alone`` (the adapted model without
    SAEs against the original: how far the model itself moved). The frozen weights are checked
    bit for bit first."""
    with backbone.original():
        bare = evaluate_saes(backbone, saes, seqs, tokens=tokens, alive_tokens=tokens, batch_size=batch_size, ce_score=False)
    per_sae = {h: {k: m[k] for k in ("l0", "explained_variance", "mse")} for h, m in bare["saes"].items()}
    backbone.adapter.check_base_unchanged()
    return {
        "adapter": {**backbone.adapter.describe(), "base_unchanged": True},
        "without_adapter": {**{k: bare[k] for k in RUN_KEYS}, "saes": per_sae},
        "adapter_alone": evaluate_adapter(backbone, seqs, tokens, batch_size),
    }
