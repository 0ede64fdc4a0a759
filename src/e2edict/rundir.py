"""The run directory: the one module that knows its layout.

    RUN_DIR/
      config.yaml            the resolved config (`e2edict train RUN_DIR/config.yaml` repeats the run)
      metrics.jsonl          one JSON object per log step
      eval.json              the final evaluation (a fine-tune's also holds "init": its source's, before any step)
      interp.json            the interpretability evaluation (`e2edict interp`)
      interp_cache/          autointerp's prompts and answers (autointerp.jsonl), so no call is made twice
      init_eval.json         a run from saes.init_from: the loaded SAEs' evaluation before any step
      saes/<hook>/           cfg.json + sae_weights.safetensors (SAELens v6) + sparsity.safetensors
      adapter/               a run with an adapter: adapter_config.json + adapter_model.safetensors (peft's files)
      checkpoints/step_<S>/  written by `e2edict.checkpoint`
      report/                the HTML report

Every other module asks a `RunDir` for a path or a file's content. Files are written to a
temporary name and renamed, so a crash never leaves half of one. A folder name built from a hook
name can never leave the run directory (`sae_folder`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from e2edict.atomic import write_atomic, write_text_atomic
from e2edict.config import load_config
from e2edict.errors import E2EDictError
from e2edict.eval_metrics import density_from_log10, log10_density
from e2edict.saes.base import SAE
from e2edict.saes.saelens_format import CFG_FILE, load_sae, save_sae

CONFIG, METRICS, EVAL, INTERP, INTERP_CACHE, INIT_EVAL, SAES, SPARSITY, CHECKPOINTS, REPORT, ADAPTER = (
    "config.yaml",
    "metrics.jsonl",
    "eval.json",
    "interp.json",
    "interp_cache",
    "init_eval.json",
    "saes",
    "sparsity.safetensors",
    "checkpoints",
    "report",
    "adapter",
)


class RunDir:
    """A run directory on disk (it need not exist yet)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # --- paths --------------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS

    @property
    def eval_file(self) -> Path:
        return self.path / EVAL

    @property
    def interp_file(self) -> Path:
        return self.path / INTERP

    @property
    def autointerp_cache(self) -> Path:
        return self.path / INTERP_CACHE / "autointerp.jsonl"

    @property
    def init_eval_file(self) -> Path:
        return self.path / INIT_EVAL

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def report(self) -> Path:
        return self.path / REPORT

    @property
    def adapter_folder(self) -> Path:
        return self.path / ADAPTER

    def sae_folder(self, hook: str) -> Path:
        """``RUN_DIR/saes/<hook>``, refusing any name that would leave the run directory."""
        base = (self.path / SAES).resolve()
        folder = (base / hook).resolve()
        if folder.parent != base or hook in ("", ".", ".."):
            raise E2EDictError(f"hook name {hook!r} cannot name a folder inside the run directory")
        return folder

    def sparsity_file(self, hook: str) -> Path:
        return self.sae_folder(hook) / SPARSITY

    # --- the directory ------------------------------------------------------------------------
    def is_run(self) -> bool:
        return self.config_file.is_file()

    def require(self) -> RunDir:
        """This run directory, or a one-line error when it has no config.yaml."""
        if not self.is_run():
            raise E2EDictError(f"{str(self.path)!r} is not a run directory (no {CONFIG})")
        return self

    def prepare(self, overwrite: bool) -> None:
        """Create it empty; refuse a non-empty one unless ``overwrite``."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise E2EDictError(f"run directory {str(p)!r} exists and is not a directory")
        if p.exists() and any(p.iterdir()):
            if not overwrite:
                raise E2EDictError(f"run directory {str(p)!r} exists and is not empty (use --overwrite to replace it)")
            shutil.rmtree(p)
        p.mkdir(parents=True, exist_ok=True)

    def check_free(self, overwrite: bool) -> None:
        """The `prepare` refusal without touching anything (to answer before a model loads)."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise E2EDictError(f"run directory {str(p)!r} exists and is not a directory")
        if p.exists() and any(p.iterdir()) and not overwrite:
            raise E2EDictError(f"run directory {str(p)!r} exists and is not empty (use --overwrite to replace it)")

    # --- config -------------------------------------------------------------------------------
    def read_config(self):
        return load_config(self.require().config_file)

    def config_text(self) -> str:
        return self.require().config_file.read_text()

    def write_config(self, text: str) -> None:
        _write_text(self.config_file, text)

    # --- metrics.jsonl ------------------------------------------------------------------------
    def append_metrics(self, row: dict[str, Any]) -> None:
        """One row appended as a JSON line, flushed: a crash loses at most the line being written."""
        with open(self.metrics_file, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")

    def trim_metrics(self, step: int) -> None:
        """Keep the rows up to ``step`` (those a checkpoint at ``step`` had written), dropping a torn
        last line and the final evaluation (a resumed run writes them again)."""
        path = self.metrics_file
        if not path.exists():
            return
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row.get("step", 0) <= step and row.get("split") != "final_eval":
                keep.append(line)
        write_text_atomic(path, "".join(x + "\n" for x in keep))

    # --- evaluation ---------------------------------------------------------------------------
    def has_eval(self) -> bool:
        return self.eval_file.is_file()

    def read_eval(self) -> dict[str, Any]:
        """eval.json, checked to be an evaluation (one line naming the problem otherwise)."""
        if not self.has_eval():
            raise E2EDictError(
                f"{str(self.path)!r} is not a finished run directory: no {EVAL} (run `e2edict eval {self.path}` first)"
            )
        try:
            result = json.loads(self.eval_file.read_text())
            if not isinstance(result, dict) or not isinstance(result.get("saes"), dict):
                raise ValueError("no 'saes' mapping")
        except ValueError as e:
            raise E2EDictError(f"{str(self.eval_file)!r} is not a valid {EVAL} ({e})") from None
        return result

    def write_eval(self, result: dict[str, Any]) -> None:
        _write_text(self.eval_file, json.dumps(result, indent=2) + "\n")

    def has_interp(self) -> bool:
        return self.interp_file.is_file()

    def read_interp(self) -> dict[str, Any] | None:
        """interp.json, or None where the run has none."""
        if not self.has_interp():
            return None
        try:
            result = json.loads(self.interp_file.read_text())
            if not isinstance(result, dict) or not isinstance(result.get("saes"), dict):
                raise ValueError("no 'saes' mapping")
        except (ValueError, UnicodeDecodeError) as e:
            raise E2EDictError(f"{str(self.interp_file)!r} is not a valid {INTERP} ({e})") from None
        return result

    def write_interp(self, result: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _write_text(self.interp_file, json.dumps(result, indent=2, allow_nan=True) + "\n")

    def write_sparsity(self, densities: dict[str, torch.Tensor]) -> None:
        """Each latent's log10 firing density, as SAELens stores it (key ``sparsity``)."""
        for h, d in densities.items():
            tensors = {"sparsity": log10_density(d)}
            write_atomic(self.sparsity_file(h), lambda tmp, t=tensors: save_file(t, str(tmp)))

    def read_densities(self, hooks: list[str]) -> dict[str, torch.Tensor] | None:
        """The firing densities the last evaluation wrote, or None where any is missing."""
        files = {h: self.sparsity_file(h) for h in hooks}
        if not all(f.is_file() for f in files.values()):
            return None
        return {h: density_from_log10(load_file(str(f))["sparsity"]) for h, f in files.items()}

    def write_init_eval(self, result: dict[str, Any]) -> None:
        _write_text(self.init_eval_file, json.dumps(result, indent=2) + "\n")

    def read_init_eval(self) -> dict[str, Any] | None:
        """The source SAEs' evaluation before any step, or None (not a run from saes.init_from)."""
        if not self.init_eval_file.is_file():
            return None
        try:
            return json.loads(self.init_eval_file.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise E2EDictError(f"{str(self.init_eval_file)!r} is not valid JSON ({e})") from None

    def record_evaluation(self, result: dict[str, Any], densities: dict[str, torch.Tensor]) -> None:
        """What an evaluation leaves: eval.json (with the source's ``init`` figures where the run
        started from loaded SAEs) and each SAE's sparsity file."""
        init = self.read_init_eval()
        if init is not None:
            result["init"] = init
        self.write_eval(result)
        self.write_sparsity(densities)

    # --- SAEs ---------------------------------------------------------------------------------
    def save_saes(self, saes: dict[str, SAE], metadata: dict[str, dict[str, Any]]) -> None:
        for h, sae in saes.items():
            save_sae(sae, self.sae_folder(h), metadata.get(h))

    def load_saes(self, device: str | torch.device = "cpu") -> dict[str, SAE]:
        """``{hook_name: SAE}`` from ``saes/``, in eval mode."""
        folder = self.path / SAES
        if not folder.is_dir():
            raise E2EDictError(
                f"{str(self.path)!r} is neither an SAE folder (with {CFG_FILE}) nor a run directory (with {SAES}/)"
            )
        out = {}
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            sae = load_sae(sub, device).eval()
            out[sae.hook_name or sub.name] = sae
        if not out:
            raise E2EDictError(f"run directory {str(self.path)!r} has no SAEs in {SAES}/")
        return out

    # --- the adapter --------------------------------------------------------------------------
    def save_adapter(self, adapter, base_model: str) -> None:
        adapter.save(self.adapter_folder, base_model)

    def load_adapter(self, backbone):
        """The run's adapter attached to ``backbone`` (None, and nothing changed, for a run without one)."""
        if not self.adapter_folder.is_dir():
            return None
        from e2edict.adapters import load_adapter

        return load_adapter(backbone, self.adapter_folder)


def load_saes(path: str | Path, device: str | torch.device = "cpu") -> dict[str, SAE]:
    """``{hook_name: SAE}`` from a run directory or from one SAE folder, in eval mode (inference
    behaviour: a BatchTopK threshold is used, not moved); training sets training mode itself."""
    path = Path(path)
    if (path / CFG_FILE).is_file():
        sae = load_sae(path, device).eval()
        return {sae.hook_name or path.name: sae}
    return RunDir(path).load_saes(device)


def _write_text(path: Path, text: str) -> None:
    write_text_atomic(path, text)
