"""`e2edict sweep SWEEP.yaml`: a grid of runs from one base config, one run directory each.

Finished runs (with eval.json) are skipped, unfinished ones resumed from their last checkpoint,
and at the end `compare` writes the table and plots for all of them. The sweep file::

    base: ../../configs/tiny/e2e.yaml      # relative to the sweep file
    out: ../../out/sweeps/pareto-tiny      # run directories: <out>/<run name>
    compare_out: results                   # tables and plots (relative to the sweep file)
    overrides: [train.checkpoint_every_tokens=200000]   # for every run
    grid:                                  # each entry: the product of its lists
      - name: "local-l{loss.sparsity.coeff}"
        values: {loss.preset: [local], loss.sparsity.coeff: [0.5, 1, 2]}
    runs:                                  # single runs, after the grid, in order
      - name: e2e-finetune
        overrides: ["saes.init_from={run:local-stage1}", loss.preset=e2e]

``{run:NAME}`` in a value is replaced by that run's directory (so a stage can start from another).
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from e2edict.config import RUN_NAME_RE, StrictModel
from e2edict.errors import E2EDictError
from e2edict.rundir import RunDir

_SAFE = re.compile(r"[^A-Za-z0-9._+-]+")


class GridEntry(StrictModel):
    name: str = Field(description="run name template; {dotted.key} is replaced by the value")
    values: dict[str, list[Any]] = Field(min_length=1)
    overrides: list[str] = []


class RunEntry(StrictModel):
    name: str
    overrides: list[str] = []


class SweepConfig(StrictModel):
    base: str
    out: str
    compare_out: str | None = None
    overrides: list[str] = []
    grid: list[GridEntry] = []
    runs: list[RunEntry] = []


def _fmt(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def expand(sweep: SweepConfig) -> list[tuple[str, list[str]]]:
    """Every run as (name, overrides), in order; names are checked to be safe and unique."""
    runs: list[tuple[str, list[str]]] = []
    for g in sweep.grid:
        keys = list(g.values)
        for combo in itertools.product(*(g.values[k] for k in keys)):
            name = g.name
            for k, v in zip(keys, combo, strict=True):
                name = name.replace("{" + k + "}", _SAFE.sub("_", _fmt(v)))
            runs.append((name, [*g.overrides, *(f"{k}={_fmt(v)}" for k, v in zip(keys, combo, strict=True))]))
    runs += [(r.name, list(r.overrides)) for r in sweep.runs]
    names = [n for n, _ in runs]
    for n in names:
        if not RUN_NAME_RE.match(n) or n in (".", ".."):
            raise E2EDictError(f"sweep run name {n!r} is not a safe folder name (letters, digits, . _ + -)")
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise E2EDictError(f"sweep run names repeat: {', '.join(sorted(dupes))}")
    return runs


def load_sweep(path: str | Path) -> tuple[SweepConfig, Path]:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise E2EDictError(f"cannot read sweep {str(path)!r}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise E2EDictError(f"sweep {str(path)!r} is not valid YAML: {' '.join(str(e).split())}") from None
    try:
        return SweepConfig.model_validate(raw if raw is not None else {}), path.parent
    except ValidationError as e:
        msg = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise E2EDictError(f"invalid sweep {str(path)!r}: {' '.join(msg.split())}") from None


def run_sweep(path: str | Path, dry_run: bool = False, progress: bool = True, log=print) -> list[Path]:
    """Train every run of the sweep that is not finished; then compare them all."""
    from e2edict.config import load_config
    from e2edict.trainer import train

    sweep, root = load_sweep(path)
    base = (root / sweep.base).resolve()
    out = (root / sweep.out).resolve()
    runs = expand(sweep)
    dirs = {name: out / name for name, _ in runs}
    configs = []
    for name, overrides in runs:  # every config is checked before anything runs
        resolved = [re.sub(r"\{run:([^}]+)\}", lambda m: str(_run_dir(dirs, m.group(1))), o) for o in overrides]
        configs.append((name, load_config(base, [*sweep.overrides, *resolved, f"name={name}"])))
    for name, cfg in configs:
        run_dir = dirs[name]
        if RunDir(run_dir).has_eval():
            log(f"sweep: {name}: finished, skipped")
            continue
        resume = RunDir(run_dir).is_run()
        log(f"sweep: {name}: {'resuming' if resume else 'training'} -> {run_dir}")
        if not dry_run:
            train(cfg, out=run_dir, progress=progress, resume=resume, overwrite=False)
    if sweep.compare_out and not dry_run:
        from e2edict.analysis.compare import compare_with_geometry
        from e2edict.analysis.runs import load_runs

        written = compare_with_geometry(load_runs([dirs[n] for n, _ in runs]), (root / sweep.compare_out).resolve())
        log(f"sweep: wrote {', '.join(sorted(p.name for p in written.values()))} to {root / sweep.compare_out}")
    return [dirs[n] for n, _ in runs]


def _run_dir(dirs: dict[str, Path], name: str) -> Path:
    if name not in dirs:
        raise E2EDictError(f"sweep: {{run:{name}}} names no run of this sweep")
    return dirs[name]
