"""Importing a checkpoint in the reference implementation's layout."""

import argparse

import torch
import torch.nn.functional as F
from support import reference_checkpoint

import e2edict
from e2edict.cli import main as cli_main


def test_import_reproduces_the_reference_reconstruction(tmp_path, capsys):
    state = reference_checkpoint(tmp_path)
    rc = cli_main(
        [
            "import-e2e-sae",
            str(tmp_path / "samples_400000.pt"),
            str(tmp_path / "final_config.yaml"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    sae = e2edict.load_saes(tmp_path / "out" / "blocks.1.hook_resid_pre")["blocks.1.hook_resid_pre"]
    x = torch.randn(5, 16)
    W_e, b_e = state["saes.blocks-1-hook_resid_pre.encoder.0.weight"], state["saes.blocks-1-hook_resid_pre.encoder.0.bias"]
    W_d, b_d = state["saes.blocks-1-hook_resid_pre.decoder.weight"], state["saes.blocks-1-hook_resid_pre.decoder.bias"]
    c = torch.relu(x @ W_e.T + b_e)  # the reference's forward, written out
    x_hat = c @ F.normalize(W_d, dim=0).T + b_d
    ours, code = sae(x)
    torch.testing.assert_close(code, c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, x_hat, atol=1e-5, rtol=1e-5)
    assert sae.hook_name == "blocks.1.hook_resid_pre"


def test_import_refuses_pickled_objects(tmp_path, capsys):
    reference_checkpoint(tmp_path, prefix="")
    torch.save({"weights": argparse.Namespace(a=1)}, tmp_path / "evil.pt")  # an arbitrary object: weights_only refuses it
    rc = cli_main(
        ["import-e2e-sae", str(tmp_path / "evil.pt"), str(tmp_path / "final_config.yaml"), "--out", str(tmp_path / "out")]
    )
    assert rc == 2 and "not a tensors-only checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    rc = cli_main(
        [
            "import-e2e-sae",
            str(tmp_path / "samples_400000.pt"),
            str(tmp_path / "final_config.yaml"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 0  # the layout without the "saes." prefix converts too
