"""A new architecture is one file: this one. A ReLU SAE with a fixed shift of its
pre-activations (``c = ReLU(x W + b - shift)``), with its own key (``saes.shift``), registered
by subclassing, trains through the command line, saves, loads back with the same codes, and
its keys are checked by its class (one line, exit 2, nothing written)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import Field

from e2edict.cli import main as cli_main
from e2edict.saes.base import Options, affine
from e2edict.saes.relu import ReLUSAE


class ShiftOptions(Options):
    shift: float = Field(0.0, ge=0)


class ShiftedReLUSAE(ReLUSAE):
    architecture = "test_shifted_relu"
    options_schema = ShiftOptions

    def __init__(self, d_in: int, d_sae: int, hook_name: str = "", shift: float = 0.0, **kw):
        super().__init__(d_in, d_sae, hook_name, **kw)
        self.shift = shift
        self.sparse_decode = False

    @classmethod
    def from_config(cls, d_in, d_sae, hook_name, cfg):
        return cls(d_in, d_sae, hook_name, shift=cfg.options.shift, orthogonal_init=cfg.orthogonal_init)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(affine(self.centered(x), self.W_enc, self.b_enc) - self.shift)

    def _forward(self, x):
        c = self.encode(x)
        return self.decode(c), c

    def saelens_metadata(self):
        return {"e2edict_shift": self.shift}

    @classmethod
    def _empty_from_saelens(cls, cfg):
        return cls(cfg["d_in"], cfg["d_sae"], shift=cfg["metadata"]["e2edict_shift"])


ROOT = Path(__file__).resolve().parents[2]


def _args(small_gpt2_dir, out, *extra):
    return [
        "train", str(ROOT / "configs/tiny/e2e.yaml"), f"model.name={small_gpt2_dir}", "data.n_ctx=32",
        "saes.positions=[blocks.1.hook_resid_pre]", "saes.architecture=test_shifted_relu", "saes.dict_ratio=2",
        "train.tokens=4096", "train.batch_size=8", "train.warmup_tokens=0", "eval.tokens=1024", "eval.alive_tokens=1024",
        "train.eval_every_tokens=null", *extra, "--out", str(out), "--quiet",
    ]  # fmt: skip


@pytest.mark.slow
def test_a_new_architecture_in_one_file_trains_through_the_cli(tmp_path, small_gpt2_dir):
    import e2edict

    out = tmp_path / "run"
    assert cli_main(_args(small_gpt2_dir, out, "saes.shift=0.25")) == 0
    assert e2edict.load_config(out / "config.yaml").saes.options.shift == 0.25  # written flat, read back
    sae = e2edict.load_saes(out)["blocks.1.hook_resid_pre"]
    assert isinstance(sae, ShiftedReLUSAE) and sae.shift == 0.25
    x = torch.randn(5, 32)
    with torch.no_grad():
        expected = torch.relu(x @ sae.W_enc + sae.b_enc - 0.25)
        torch.testing.assert_close(sae(x)[1], expected)
    assert e2edict.rundir.RunDir(out).read_eval()["saes"]["blocks.1.hook_resid_pre"]["d_sae"] == 64


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["saes.shift=-1"], "saes.shift: Input should be greater than or equal to 0 (architecture 'test_shifted_relu')"),
        (["saes.options={shift: -1}"], "saes.shift: Input should be greater than or equal to 0 (architecture 'test_shift"),
        (["saes.options={scale: 2}"], "saes.scale: Extra inputs are not permitted (architecture 'test_shifted_relu')"),
    ],
)
def test_the_new_architecture_checks_its_own_keys(tmp_path, small_gpt2_dir, capsys, extra, fragment):
    out = tmp_path / "bad"
    assert cli_main(_args(small_gpt2_dir, out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_another_architecture_refuses_its_key(tmp_path, small_gpt2_dir, capsys):
    args = _args(small_gpt2_dir, tmp_path / "r", "saes.shift=1")
    args[args.index("saes.architecture=test_shifted_relu")] = "saes.architecture=relu"
    assert cli_main(args) == 2
    assert "saes.shift=1 is not read by architecture 'relu' (it is a key of test_shifted_relu)" in capsys.readouterr().err
