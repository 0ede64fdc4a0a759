"""Every architecture trained through the command line with every preset, and a warm start from a
local run (whole runs)."""

import json
from pathlib import Path

import pytest
import torch

import e2edict
from e2edict.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # whole training runs through the command line

@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "gated"])
@pytest.mark.parametrize("preset", ["local", "e2e", "e2e+ds"])
def test_every_architecture_trains_with_every_preset(tmp_path, arch, preset, capsys):
    """Through the CLI on the embedded model."""
    out = tmp_path / "run"
    lam = 0.0 if arch in ("topk", "batchtopk") else 0.5
    rc = cli_main(
        [
            "train",
            str(ROOT / "configs/tiny/e2e.yaml"),
            "model.name=tiny",
            "data.n_ctx=32",
            "saes.positions=[blocks.2.hook_resid_pre]",
            f"saes.architecture={arch}",
            *(["saes.k=8"] if "topk" in arch else []),  # k is TopK's and BatchTopK's key alone
            "saes.dict_ratio=4",
            f"loss.preset={preset}",
            f"loss.sparsity.coeff={lam}",
            "train.tokens=2048",
            "train.batch_size=8",
            "train.log_every=1",
            "train.eval_every_tokens=null",
            "eval.tokens=1024",
            "eval.alive_tokens=1024",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6, 7, 8]
    if arch == "gated" and preset == "local":
        assert "aux/blocks.2.hook_resid_pre" in rows[0]
    m = json.loads((out / "eval.json").read_text())["saes"]["blocks.2.hook_resid_pre"]
    if arch == "topk":
        assert m["l0"] <= 8 + 1e-9
    sae = e2edict.load_saes(out)["blocks.2.hook_resid_pre"]
    assert type(sae).architecture == arch
    x = torch.randn(2, 5, 128)
    sae.eval()
    again = e2edict.load_saes(out)["blocks.2.hook_resid_pre"].eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x)[0], sae(x)[0], atol=0, rtol=0)

def test_warm_start_from_a_local_run(tmp_path, small_gpt2_dir, capsys):
    base = [
        str(ROOT / "configs/tiny/local.yaml"),
        f"model.name={small_gpt2_dir}",
        "data.n_ctx=32",
        "saes.positions=[blocks.1.hook_resid_pre]",
        "saes.dict_ratio=4",
        "train.tokens=2048",
        "train.batch_size=8",
        "train.eval_every_tokens=null",
        "eval.tokens=1024",
        "eval.alive_tokens=1024",
        "--quiet",
    ]
    assert cli_main(["train", *base, "--out", str(tmp_path / "local")]) == 0
    start = e2edict.load_saes(tmp_path / "local")["blocks.1.hook_resid_pre"]
    rc = cli_main(
        [
            "train",
            *base,
            "loss.preset=e2e",
            f"saes.init_from={tmp_path / 'local'}",
            "train.lr=1e-12",
            "--out",
            str(tmp_path / "ft"),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    ft = e2edict.load_saes(tmp_path / "ft")["blocks.1.hook_resid_pre"]
    for a, b in zip(start.parameters(), ft.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    cfg = json.loads((tmp_path / "ft/saes/blocks.1.hook_resid_pre/cfg.json").read_text())
    assert cfg["metadata"]["e2edict_loss_preset"] == "e2e"

    capsys.readouterr()
    rc = cli_main(
        ["train", *base, "saes.architecture=gated", f"saes.init_from={tmp_path / 'local'}", "--out", str(tmp_path / "bad")]
    )
    assert rc == 2 and "is a relu SAE but saes.architecture is 'gated'" in capsys.readouterr().err
    rc = cli_main(
        [
            "train",
            *base,
            "saes.positions=[blocks.2.hook_resid_pre]",
            f"saes.init_from={tmp_path / 'local'}",
            "--out",
            str(tmp_path / "bad"),
        ]
    )
    assert rc == 2 and "has no SAE at blocks.2.hook_resid_pre" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
