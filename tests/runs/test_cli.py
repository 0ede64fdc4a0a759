"""The `e2edict` command end to end: train, eval, load_saes round trip, and bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from support import run_cli

import e2edict

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_version_and_help():
    r = run_cli("--version")
    assert r.returncode == 0 and e2edict.__version__ in r.stdout
    r = run_cli("--help")
    assert r.returncode == 0 and "train" in r.stdout and "eval" in r.stdout


@pytest.mark.slow
def test_short_e2e_run_lowers_kl_and_round_trips(tmp_path, tiny_model):
    out = tmp_path / "run"
    r = run_cli(
        "train",
        ROOT / "configs/tiny/e2e.yaml",
        "train.tokens=40960",
        "train.batch_size=8",
        "train.warmup_tokens=0",
        "train.log_every=1",
        "eval.tokens=8192",
        "eval.alive_tokens=8192",
        "--out",
        out,
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [row for row in rows if row["split"] == "train"]
    assert [row["step"] for row in train_rows] == list(range(1, 41))
    for key in ("loss", "kl", "lr", "grad_norm", "tokens", "l0/blocks.2.hook_resid_pre", "sparsity/blocks.2.hook_resid_pre"):
        assert key in train_rows[0]
    result = json.loads((out / "eval.json").read_text())
    assert result["kl"] < 0.5 * train_rows[0]["kl"]  # the first row is measured before any update
    m = result["saes"]["blocks.2.hook_resid_pre"]
    assert set(m) >= {"l0", "alive", "dead", "d_sae", "explained_variance", "mse", "downstream_explained_variance"}
    assert m["alive"] + m["dead"] == m["d_sae"] == 1024
    assert "blocks.3.hook_resid_pre" in m["downstream_explained_variance"]
    assert "blocks.3.hook_resid_post" in m["downstream_explained_variance"]

    # the saved folder loads with identical outputs, and evaluates to the same numbers
    saes = e2edict.load_saes(out)
    x = torch.randn(3, 5, 128)
    cfg = e2edict.load_config(out / "config.yaml")
    assert cfg.loss.preset == "e2e" and cfg.train.tokens == 40960
    sae_cfg = json.loads((out / "saes/blocks.2.hook_resid_pre/cfg.json").read_text())
    assert sae_cfg["metadata"]["e2edict_tokens_trained"] == 40960
    assert sae_cfg["metadata"]["context_size"] == 128 and sae_cfg["metadata"]["model_name"] == "tiny"
    from e2edict.sources import pack_stream as to_sequences

    val = np.load(Path(e2edict.__file__).parent / "assets/tiny/val_tokens.npy").astype(np.int64)
    seqs = to_sequences(val, 128, 0)[:64]
    again = e2edict.evaluate(tiny_model, saes, seqs, alive_tokens=8192)
    assert again["kl"] == pytest.approx(result["kl"], rel=1e-4)
    assert again["saes"]["blocks.2.hook_resid_pre"]["l0"] == pytest.approx(m["l0"], rel=1e-4)
    with torch.no_grad():
        ref = saes["blocks.2.hook_resid_pre"](x)
        again_sae = e2edict.load_saes(out / "saes/blocks.2.hook_resid_pre")["blocks.2.hook_resid_pre"]
        torch.testing.assert_close(again_sae(x)[0], ref[0], atol=0, rtol=0)

    r = run_cli("eval", out, "--tokens", 4096)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "eval.json").read_text())["tokens"] == 4096
    assert "CE-loss increase" in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["saes.positions=[blocks.9.hook_resid_pre]"], "valid: blocks.0.hook_resid_pre"),
        (["bogus.key=1"], "bogus: unknown key"),
        (["loss.sparsity.coeff=-1"], "loss.sparsity.coeff"),
        (["saes.dict_ratio=0"], "saes.dict_ratio"),
        (["train.batch_size=0"], "train.batch_size"),
        (["data.n_ctx=4096"], "context"),
        (["data.train=NPY", "train.batch_size=4"], "fewer than one step"),
        (["data.train=/no/such/file.npy"], "neither an embedded data set"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_run_dir(tmp_path, small_gpt2_dir, overrides, fragment):
    np.save(tmp_path / "short.npy", np.arange(100, dtype=np.int32))  # 3 sequences of 32
    overrides = [o.replace("NPY", str(tmp_path / "short.npy")) for o in overrides]
    out = tmp_path / "run"
    r = run_cli(
        "train",
        ROOT / "configs/tiny/e2e.yaml",
        f"model.name={small_gpt2_dir}",
        "data.n_ctx=32",
        "saes.positions=[blocks.1.hook_resid_pre]",
        *overrides,
        "--out",
        out,
    )
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("e2edict: error:")]
    assert len(lines) == 1 and fragment in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()


@pytest.mark.slow
def test_existing_run_dir_is_not_overwritten(tmp_path, small_gpt2_dir):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    r = run_cli(
        "train",
        ROOT / "configs/tiny/local.yaml",
        f"model.name={small_gpt2_dir}",
        "data.n_ctx=32",
        "saes.positions=[blocks.1.hook_resid_pre]",
        "--out",
        out,
    )
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert (out / "keep.txt").read_text() == "precious"


def test_eval_of_non_run_dir(tmp_path):
    r = run_cli("eval", tmp_path)
    assert r.returncode == 2 and "not a run directory" in r.stderr


@pytest.mark.slow
def test_training_into_a_log_writes_a_plain_line_per_log_step(tmp_path):
    """stderr is a pipe here, not a terminal: no bar's carriage returns, one line per log step."""
    out = tmp_path / "run"
    r = run_cli("train", ROOT / "configs/tiny/local.yaml", "train.tokens=8192", "train.batch_size=8", "train.log_every=2",
                "eval.tokens=1024", "eval.alive_tokens=1024", "--out", out)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if ": step " in x]
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if json.loads(x)["split"] == "train"]
    assert len(lines) == len(steps) == 5  # steps 1, 3, 5, 7 and the last, 8
    assert lines[0].startswith("tiny-local: step 1/8, 1,024 tokens, loss ") and "tok/s" in lines[0]
    quiet = run_cli("train", ROOT / "configs/tiny/local.yaml", "train.tokens=2048", "train.batch_size=8", "eval.tokens=1024",
                    "eval.alive_tokens=1024", "--out", tmp_path / "quiet", "--quiet")  # fmt: skip
    assert quiet.returncode == 0 and ": step " not in quiet.stderr
