"""Reading finished run directories (config.yaml + eval.json) into flat rows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e2edict.config import Config
from e2edict.errors import E2EDictError
from e2edict.interpret.table import HEADLINE, headline
from e2edict.rundir import RunDir


@dataclass
class FinishedRun:
    path: Path
    name: str
    config: Config
    eval: dict[str, Any]
    interp: dict[str, Any] | None = None  # interp.json, where `e2edict interp` has run

    @property
    def preset(self) -> str:
        return self.config.loss.preset


def load_run(path: str | Path) -> FinishedRun:
    rundir = RunDir(path)
    if not rundir.is_run():
        raise E2EDictError(f"{str(rundir.path)!r} is not a finished run directory: no config.yaml")
    result, cfg = rundir.read_eval(), rundir.read_config()
    return FinishedRun(rundir.path, cfg.name, cfg, result, rundir.read_interp())


def load_runs(paths: list[str | Path]) -> list[FinishedRun]:
    runs = [load_run(p) for p in paths]
    names = [r.name for r in runs]
    for r in runs:  # disambiguate equal names (e.g. the same config with other seeds)
        if names.count(r.name) > 1:
            r.name = f"{r.name}@{r.path.name}"
    names = [r.name for r in runs]
    for i, r in enumerate(runs):
        if names.count(r.name) > 1:
            r.name = f"{r.name}#{i + 1}"
    return runs


COLUMNS = [
    "run",
    "type",
    "position",
    "kind",
    "lambda",
    "l0",
    "alive",
    "dead",
    "d_sae",
    "ce_loss_clean",
    "ce_loss_increase",
    "kl",
    "explained_variance",
    "mse",
    "ce_loss_score",
    "replacement_score",  # a transcoder run's attribution graphs (eval.json "graph"), the same on each of its rows
    "completeness_score",
    "norm_ratio_pos0",
    "norm_ratio_pos_gt0",
    "tokens",
    "init_ce_loss_increase",  # a fine-tune's source before any step (eval.json "init")
    "init_kl",
    "init_l0",
    "init_explained_variance",
    "adapter_rank",  # a run with an adapter: its rank, the SAEs in the original model, the adapter alone
    "no_adapter_ce_loss_increase",
    "adapter_alone_kl",
    "adapter_alone_ce_change",
    *HEADLINE,  # interp.json's figures (`e2edict interp`), empty where it has not run
]


def _interp_columns(interp: dict[str, Any] | None, hook: str) -> dict[str, Any]:
    entry = ((interp or {}).get("saes") or {}).get(hook) or {}
    figures = headline(entry)
    return {k: figures.get(k) for k in HEADLINE}


def _lambda(cfg: Config, hook: str) -> float | None:
    """The run's sparsity coefficient for the SAE at ``hook`` (None where a mapping does not name it)."""
    c = cfg.loss.sparsity.coeff
    return c.get(hook) if isinstance(c, dict) else c


def _init_columns(init: dict[str, Any] | None, hook: str) -> dict[str, Any]:
    """Before / after for a run that started from loaded SAEs: the source's figures (else empty)."""
    if not isinstance(init, dict):
        return dict.fromkeys(("init_ce_loss_increase", "init_kl", "init_l0", "init_explained_variance"))
    m = (init.get("saes") or {}).get(hook) or {}
    return {
        "init_ce_loss_increase": init.get("ce_loss_increase"),
        "init_kl": init.get("kl"),
        "init_l0": m.get("l0"),
        "init_explained_variance": m.get("explained_variance"),
    }


def _adapter_columns(ev: dict[str, Any]) -> dict[str, Any]:
    """A run with an adapter: its rank, the CE-loss increase without it, and how far it alone moved the model."""
    sections = ("adapter", "without_adapter", "adapter_alone")
    adapter, bare, alone = (ev.get(k) if isinstance(ev.get(k), dict) else {} for k in sections)
    return {
        "adapter_rank": adapter.get("rank"),
        "no_adapter_ce_loss_increase": bare.get("ce_loss_increase"),
        "adapter_alone_kl": alone.get("kl"),
        "adapter_alone_ce_change": alone.get("ce_loss_change"),
    }


def rows(runs: list[FinishedRun]) -> list[dict[str, Any]]:
    """One row per (run, SAE) with the columns of `COLUMNS`."""
    out = []
    for r in runs:
        for hook, m in r.eval["saes"].items():
            out.append(
                {
                    "run": r.name,
                    "type": r.preset,
                    "position": hook,
                    "kind": m.get("kind", "sae"),
                    "lambda": _lambda(r.config, hook),
                    "l0": m.get("l0"),
                    "alive": m.get("alive"),
                    "dead": m.get("dead"),
                    "d_sae": m.get("d_sae"),
                    "ce_loss_clean": r.eval.get("ce_loss_clean"),
                    "ce_loss_increase": r.eval.get("ce_loss_increase"),
                    "kl": r.eval.get("kl"),
                    "explained_variance": m.get("explained_variance"),
                    "mse": m.get("mse"),
                    "ce_loss_score": m.get("ce_loss_score"),
                    "replacement_score": r.eval.get("graph", {}).get("replacement_score"),
                    "completeness_score": r.eval.get("graph", {}).get("completeness_score"),
                    "norm_ratio_pos0": m.get("norm_ratio_pos0"),
                    "norm_ratio_pos_gt0": m.get("norm_ratio_pos_gt0"),
                    "tokens": r.eval.get("tokens"),
                    **_init_columns(r.eval.get("init"), hook),
                    **_adapter_columns(r.eval),
                    **_interp_columns(r.interp, hook),
                }
            )
    return out
