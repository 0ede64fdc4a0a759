"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a folder ``RUN_DIR/checkpoints/step_<N>/`` holding ``saes.safetensors`` (every SAE
parameter), ``optimizer.safetensors`` (Adam's moments and step counts), and ``state.json`` (step,
tokens, data position, scheduler and optimizer hyper-parameters). It is written under a temporary
name, each file fsynced, then renamed into place, so a crash leaves either the whole checkpoint or
none; ``state.json`` is written last and holds the checksums of the tensor files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from e2edict.atomic import sha256, write_folder_atomic
from e2edict.errors import E2EDictError
from e2edict.rundir import CHECKPOINTS

CKPT_DIR = CHECKPOINTS  # the run directory's layout is `e2edict.rundir`'s


def save_checkpoint(
    run_dir: Path,
    step: int,
    saes: dict[str, torch.nn.Module],
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    root = run_dir / CKPT_DIR
    root.mkdir(exist_ok=True)
    final = root / f"step_{step:09d}"
    write_folder_atomic(final, lambda tmp: _write_checkpoint(tmp, step, saes, opt, sched, state))
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_checkpoint(tmp: Path, step: int, saes, opt, sched, state: dict[str, Any]) -> None:
    """The checkpoint's three files into the (temporary) folder ``tmp``."""
    # state_dict: parameters and buffers (e.g. BatchTopK's running threshold)
    sae_tensors = {f"{h}::{n}": t.detach().cpu().contiguous() for h, s in saes.items() for n, t in s.state_dict().items()}
    save_file(sae_tensors, str(tmp / "saes.safetensors"))
    opt_sd = opt.state_dict()
    opt_tensors = {}
    for idx, st in opt_sd["state"].items():
        for k, v in st.items():
            opt_tensors[f"{idx}::{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
    # Every RNG state, though the loop draws from none today (the data order is a function of seed
    # and epoch): an architecture or loss that samples must still resume exactly.
    opt_tensors["rng::torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            opt_tensors[f"rng::cuda{i}"] = s
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    sched_sd = {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}
    doc = {
        "step": step,
        **state,
        "scheduler": sched_sd,
        "optimizer_param_groups": opt_sd["param_groups"],
        "files": {f: sha256(tmp / f) for f in ("saes.safetensors", "optimizer.safetensors")},
    }
    (tmp / "state.json").write_text(json.dumps(doc, indent=1))


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Read and verify one checkpoint folder; raise `E2EDictError` if anything is damaged."""
    try:
        doc = json.loads((path / "state.json").read_text())
        for f, digest in doc["files"].items():
            if sha256(path / f) != digest:
                raise E2EDictError(f"checkpoint {path.name}: {f} does not match its checksum")
        return doc, load_file(str(path / "saes.safetensors")), load_file(str(path / "optimizer.safetensors"))
    except E2EDictError:
        raise
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise E2EDictError(f"checkpoint {path.name} is damaged ({type(e).__name__}: {e})") from None


def latest_checkpoint(run_dir: Path, warn=print) -> tuple[Path, tuple] | None:
    """The newest checkpoint that reads back intact; damaged newer ones are skipped with a message."""
    root = run_dir / CKPT_DIR
    if not root.is_dir():
        return None
    for path in sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True):
        try:
            return path, read_checkpoint(path)
        except E2EDictError as e:
            warn(f"e2edict: {e}; falling back to the previous checkpoint")
    return None


def restore(
    contents: tuple, saes: dict[str, torch.nn.Module], opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler
) -> dict[str, Any]:
    doc, sae_tensors, opt_tensors = contents
    with torch.no_grad():
        for h, s in saes.items():
            for n, p in s.state_dict(keep_vars=True).items():
                key = f"{h}::{n}"
                if key not in sae_tensors or sae_tensors[key].shape != p.shape:
                    raise E2EDictError(f"checkpoint does not match the config: SAE tensor {key!r} missing or misshapen")
                p.copy_(sae_tensors[key])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in opt_tensors.items():
        idx, name = key.split("::", 1)
        if idx == "rng":
            if name == "torch":
                torch.set_rng_state(v)
            elif torch.cuda.is_available() and int(name[4:]) < torch.cuda.device_count():
                torch.cuda.set_rng_state(v, int(name[4:]))
            continue
        state.setdefault(int(idx), {})[name] = v
    params = [p for group in opt.param_groups for p in group["params"]]
    for i, entries in state.items():
        for name, v in entries.items():
            if v.dim() > 0 and (i >= len(params) or v.shape != params[i].shape):
                raise E2EDictError(f"checkpoint does not match the config: optimizer state {i}::{name} is misshapen")
    opt.load_state_dict({"state": state, "param_groups": doc["optimizer_param_groups"]})
    # The schedule's function comes from the config; only its counters are restored.
    sched.load_state_dict({**doc["scheduler"], "lr_lambdas": [None] * len(opt.param_groups)})
    return doc
