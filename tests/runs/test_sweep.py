"""`e2edict sweep`: the grid expands as written, finished runs are skipped, unfinished ones resumed."""

import json
from pathlib import Path

import pytest

from e2edict.cli import main as cli_main
from e2edict.errors import E2EDictError
from e2edict.sweep import SweepConfig, expand

ROOT = Path(__file__).resolve().parents[2]


def test_expand_grid_and_runs():
    sweep = SweepConfig.model_validate(
        {
            "base": "b.yaml",
            "out": "o",
            "grid": [
                {
                    "name": "x-l{loss.sparsity.coeff}-{loss.preset}",
                    "values": {"loss.preset": ["local", "e2e+ds"], "loss.sparsity.coeff": [0.5, 2]},
                }
            ],
            "runs": [{"name": "ft", "overrides": ["saes.init_from={run:x-l0.5-local}"]}],
        }
    )
    runs = expand(sweep)
    assert [n for n, _ in runs] == ["x-l0.5-local", "x-l2-local", "x-l0.5-e2e+ds", "x-l2-e2e+ds", "ft"]
    assert runs[2][1] == ["loss.preset=e2e+ds", "loss.sparsity.coeff=0.5"]
    with pytest.raises(E2EDictError, match="repeat"):
        expand(SweepConfig.model_validate({"base": "b", "out": "o", "runs": [{"name": "a"}, {"name": "a"}]}))
    with pytest.raises(E2EDictError, match="safe folder name"):
        expand(SweepConfig.model_validate({"base": "b", "out": "o", "runs": [{"name": "../x"}]}))


def test_sweep_trains_skips_and_resumes(tmp_path, small_gpt2_dir, capsys):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"""
base: {ROOT / "configs/tiny/local.yaml"}
out: runs
compare_out: results
overrides: [model.name={small_gpt2_dir}, data.n_ctx=32, "saes.positions=[blocks.1.hook_resid_pre]", saes.dict_ratio=4,
            train.tokens=2048, train.batch_size=8, train.eval_every_tokens=null, eval.tokens=1024, eval.alive_tokens=1024]
grid:
  - name: "local-l{{loss.sparsity.coeff}}"
    values: {{loss.sparsity.coeff: [0.5, 2]}}
runs:
  - name: e2e-ft
    overrides: ["saes.init_from={{run:local-l0.5}}", loss.preset=e2e]
""")
    assert cli_main(["sweep", str(sweep), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.count("training ->") == 3
    runs = tmp_path / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["e2e-ft", "local-l0.5", "local-l2"]
    assert (
        json.loads((runs / "e2e-ft/saes/blocks.1.hook_resid_pre/cfg.json").read_text())["metadata"]["e2edict_loss_preset"]
        == "e2e"
    )
    for f in ("runs.csv", "runs.md", "l0_vs_ce.png", "geometry.md"):
        assert (tmp_path / "results" / f).is_file()
    table = {r["run"]: r for r in _csv(tmp_path / "results/runs.csv")}
    assert {n: (r["type"], r["lambda"]) for n, r in table.items()} == {
        "local-l0.5": ("local", "0.5"),
        "local-l2": ("local", "2.0"),
        "e2e-ft": ("e2e", "1.0"),
    }

    # an interrupted run (config.yaml, no eval.json) is resumed; finished ones are skipped
    (runs / "local-l2" / "eval.json").unlink()
    assert cli_main(["sweep", str(sweep), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "local-l0.5: finished, skipped" in out and "e2e-ft: finished, skipped" in out
    assert "local-l2: resuming" in out
    assert (runs / "local-l2" / "eval.json").is_file()


def _csv(path):
    import csv

    with open(path) as fh:
        return list(csv.DictReader(fh))
