"""The Python API as a user meets it: the README's snippet runs as written, `evaluate` takes what
users have (token streams of any integer dtype, texts, rows) and packs them as runs do, SAEs
trained on one backend's hook names evaluate on the other's model, run names follow overrides,
loaded SAEs are in eval mode, and the run directory keeps hook names inside it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import e2edict
from e2edict.errors import E2EDictError
from e2edict.overrides import run_name_for
from e2edict.rundir import RunDir
from e2edict.saes import registry

ROOT = Path(__file__).resolve().parents[1]
HOOK = "blocks.2.hook_resid_pre"


def _readme_python() -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


@pytest.mark.slow
def test_readme_python_snippet_runs_as_written_and_reproduces_eval_json(tmp_path):
    """Run in a fresh folder (configs linked in): evaluate() on the shipped stream, packed as
    runs pack it, gives the run's own eval.json; the Hugging Face model gives the same figures."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    code = _readme_python() + "\nimport json; json.dump({'tl': metrics, 'hf': metrics_hf}, open('metrics.json', 'w'))\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((tmp_path / "metrics.json").read_text())
    saved = json.loads((tmp_path / "out/runs/api-e2e/eval.json").read_text())
    for key in ("ce_loss_clean", "ce_loss_spliced", "ce_loss_increase", "kl"):
        assert got["tl"][key] == pytest.approx(saved[key], rel=1e-6), key
        assert got["hf"][key] == pytest.approx(saved[key], rel=1e-4, abs=1e-6), key
    assert got["tl"]["saes"][HOOK]["l0"] == pytest.approx(saved["saes"][HOOK]["l0"], rel=1e-6)
    assert got["hf"]["saes"]["transformer.h.2:input"]["l0"] == pytest.approx(saved["saes"][HOOK]["l0"], rel=1e-4)


@pytest.fixture(scope="module")
def tiny_sae(tiny_model):
    torch.manual_seed(0)
    d = tiny_model.cfg.d_model
    sae = registry["relu"](d, 4 * d, HOOK)
    with torch.no_grad():
        sae.b_enc.sub_(0.3)
    return {HOOK: sae.eval()}


def test_evaluate_takes_streams_of_any_integer_dtype_texts_and_rows(tiny_model, tiny_sae):
    """A uint16 stream, the same stream as int64 rows packed by hand (BOS + 127 tokens), and a
    tensor give one result; texts are tokenized with a BOS before each."""
    from e2edict.assets import TINY_MODEL_DIR

    stream = np.load(TINY_MODEL_DIR / "val_tokens.npy")[: 8 * 127]
    assert stream.dtype == np.uint16
    bos = tiny_model.tokenizer.bos_token_id
    rows = np.concatenate([np.full((8, 1), bos), stream.astype(np.int64).reshape(8, 127)], axis=1)
    a = e2edict.evaluate(tiny_model, tiny_sae, stream, n_ctx=128, batch_size=4)
    b = e2edict.evaluate(tiny_model, tiny_sae, torch.from_numpy(rows), batch_size=4)
    c = e2edict.evaluate(tiny_model, tiny_sae, rows.astype(np.int32), batch_size=4)
    assert a["tokens"] == b["tokens"] == 8 * 128
    assert a["ce_loss_increase"] == b["ce_loss_increase"] == c["ce_loss_increase"]
    texts = ["The quick brown fox jumps over the lazy dog. " * 30, "It was the best of times, it was the worst of times. " * 30]
    t = e2edict.evaluate(tiny_model, tiny_sae, texts, n_ctx=64)
    ids = [tiny_model.tokenizer(x, add_special_tokens=False)["input_ids"] for x in texts]
    n_tokens = sum(len(i) + 1 for i in ids)  # a BOS before each text
    assert t["tokens"] == (n_tokens // 63) * 64


@pytest.mark.parametrize(
    "bad",
    [np.zeros((2, 8), dtype=np.float32), {"tokens": [1, 2]}, np.zeros((2, 2, 2), dtype=np.int64), [1.5, 2.5]],
)
def test_evaluate_refuses_what_is_not_tokens_in_one_line(tiny_model, tiny_sae, bad):
    with pytest.raises(E2EDictError, match=r"^evaluate: tokens must be \[N, n_ctx\] or \[T\] integer token ids") as e:
        e2edict.evaluate(tiny_model, tiny_sae, bad)
    assert "\n" not in str(e.value)


def test_transformer_lens_names_evaluate_on_the_hugging_face_model(tiny_model, tiny_sae):
    """The same SAE, named as TransformerLens names it, on the Hugging Face model: the hook is
    mapped (residual stream), the figures equal the TransformerLens model's; a hook without an
    unambiguous counterpart is refused in one line."""
    hf = e2edict.load_model("tiny", backend="huggingface")
    rows = torch.randint(0, tiny_model.cfg.d_vocab, (4, 32), generator=torch.Generator().manual_seed(0))
    tl = e2edict.evaluate(tiny_model, tiny_sae, rows)
    got = e2edict.evaluate(hf, tiny_sae, rows)
    assert list(got["saes"]) == ["transformer.h.2:input"]
    assert got["ce_loss_increase"] == pytest.approx(tl["ce_loss_increase"], rel=1e-4, abs=1e-6)
    assert got["saes"]["transformer.h.2:input"]["l0"] == pytest.approx(tl["saes"][HOOK]["l0"], rel=1e-4)
    attn = {"blocks.2.hook_attn_out": tiny_sae[HOOK]}
    with pytest.raises(E2EDictError, match="'blocks.2.hook_attn_out' is not a hook of model"):
        e2edict.evaluate(hf, attn, rows)
    back = e2edict.evaluate(tiny_model, {"transformer.h.2:input": tiny_sae[HOOK]}, rows)  # and the other way
    assert list(back["saes"]) == [HOOK]


def test_a_transformer_lens_3_bridge_evaluates_under_its_own_names(tiny_model, tiny_sae):
    """TransformerLens 3's `TransformerBridge` booted from the embedded model's folder: the SAE at
    its TransformerLens name gives the HookedTransformer's figures, reported under that name, and
    e2edict's path raises no deprecation warning."""
    import warnings

    from transformer_lens.model_bridge import TransformerBridge

    from e2edict.assets import TINY_MODEL_DIR

    bridge = TransformerBridge.boot_transformers(str(TINY_MODEL_DIR), device="cpu")
    rows = torch.randint(0, tiny_model.cfg.d_vocab, (4, 32), generator=torch.Generator().manual_seed(0))
    tl = e2edict.evaluate(tiny_model, tiny_sae, rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        got = e2edict.evaluate(bridge, tiny_sae, rows)
    assert list(got["saes"]) == [HOOK]
    assert got["ce_loss_increase"] == pytest.approx(tl["ce_loss_increase"], rel=1e-4, abs=1e-6)
    assert got["saes"][HOOK]["l0"] == pytest.approx(tl["saes"][HOOK]["l0"], rel=1e-4)


def test_alive_pass_codes_only_counts_what_the_full_pass_counts(small_backbone):
    """Sequences past the evaluated ones run only up to the SAE: the firing densities equal those
    of evaluating every sequence in full."""
    from e2edict.evaluation import evaluate_saes

    torch.manual_seed(0)
    saes = {h: registry["relu"](32, 64, h) for h in ("blocks.0.hook_resid_post", "blocks.1.hook_mlp_out")}
    seqs = torch.randint(0, 4096, (12, 16), generator=torch.Generator().manual_seed(1))
    cheap, full = {}, {}
    a = evaluate_saes(small_backbone, saes, seqs, tokens=3 * 16, alive_tokens=12 * 16, batch_size=4, densities=cheap)
    b = evaluate_saes(small_backbone, saes, seqs, tokens=12 * 16, alive_tokens=12 * 16, batch_size=4, densities=full)
    for h in saes:
        assert torch.equal(cheap[h], full[h])
        assert a["saes"][h]["alive"] == b["saes"][h]["alive"]
    assert a["tokens"] == 3 * 16


def test_run_names_follow_the_overrides_that_change_a_run():
    assert run_name_for("tiny-e2e", ["saes.architecture=topk", "saes.k=32"]) == "tiny-e2e+architecture-topk+k-32"
    assert run_name_for("tiny-e2e", ["model.device=cuda", "train.log_every=5", "wandb.project=x"]) == "tiny-e2e"
    assert run_name_for("tiny-e2e", ["saes.k=32", "name=mine"]) == "tiny-e2e"
    long = run_name_for("r", [f"loss.sparsity.coeff={'9' * 200}"])
    assert len(long) == 128 and re.fullmatch(r"[A-Za-z0-9._+-]+", long)
    odd = run_name_for("r", ["saes.positions=[blocks.1.hook_resid_pre, blocks.2.hook_resid_pre]"])
    assert re.fullmatch(r"[A-Za-z0-9._+-]+", odd) and "/" not in odd


def test_loaded_saes_are_in_eval_mode_and_keep_their_threshold(tmp_path):
    from e2edict.saes import save_sae

    torch.manual_seed(0)
    sae = registry["batchtopk"](8, 32, "blocks.0.hook_resid_pre", k=2)
    sae(torch.randn(6, 8))  # one training forward: a threshold to save
    save_sae(sae, RunDir(tmp_path).sae_folder("blocks.0.hook_resid_pre"))
    loaded = e2edict.load_saes(tmp_path)["blocks.0.hook_resid_pre"]
    assert not loaded.training
    before = loaded.threshold.clone()
    loaded(torch.randn(6, 8))
    assert torch.equal(loaded.threshold, before)


@pytest.mark.parametrize("hook", ["../x", "..", "", "a/../../b", "/abs"])
def test_run_dir_keeps_hook_folders_inside(tmp_path, hook):
    with pytest.raises(E2EDictError, match="cannot name a folder inside the run directory"):
        RunDir(tmp_path).sae_folder(hook)


def test_run_dir_eval_round_trip_and_one_line_errors(tmp_path):
    rd = RunDir(tmp_path)
    with pytest.raises(E2EDictError, match="not a run directory"):
        rd.read_config()
    with pytest.raises(E2EDictError, match="no eval.json"):
        rd.read_eval()
    rd.write_eval({"saes": {"h": {"l0": 3.0}}, "kl": 0.5})
    assert rd.read_eval()["kl"] == 0.5
    rd.eval_file.write_text("[1, 2]")
    with pytest.raises(E2EDictError, match="is not a valid eval.json"):
        rd.read_eval()
    assert not list(tmp_path.glob(".*tmp*"))  # nothing half-written left beside it


@pytest.mark.parametrize("override", ["loss.sparsity.coeff=nan", "train.lr=inf", "train.lr=-inf", "saes.dict_ratio=.nan"])
def test_non_finite_config_values_are_refused_before_anything_is_written(tmp_path, override, capsys):
    from e2edict.cli import main as cli_main

    out = tmp_path / "run"
    assert cli_main(["train", str(ROOT / "configs/tiny/e2e.yaml"), override, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("e2edict: error: invalid config:") and "finite" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_an_existing_out_folder_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """The check needs no model: it answers without building one."""
    import e2edict.run as run_mod
    from e2edict.cli import main as cli_main

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(run_mod, "build_backbone", no_model)
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli_main(["train", str(ROOT / "configs/tiny/e2e.yaml"), "--out", str(out), "--quiet"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_unknown_architecture_is_refused_while_the_config_is_read():
    from e2edict.config import load_config

    with pytest.raises(E2EDictError, match=r"saes.architecture: unknown 'nope'; known: .*relu"):
        load_config(ROOT / "configs/tiny/e2e.yaml", ["saes.architecture=nope"])


def test_report_order_puts_near_always_on_features_last():
    from e2edict.analysis.report import DENSE, feature_order

    d = torch.tensor([0.0, 0.5, 0.01, 0.9, 0.05, 0.0, 0.8 * DENSE])
    assert feature_order(d).tolist() == [6, 4, 2, 3, 1]  # 0.08, 0.05, 0.01; then the dense ones, 0.9 and 0.5


@pytest.mark.parametrize("kind", ["npy", "shards"])
def test_too_little_data_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys, kind):
    """A .npy stream's shape or a shard folder's manifest says how many sequences there are:
    fewer than one step is answered without building the model."""
    import e2edict.run as run_mod
    from e2edict.cli import main as cli_main

    path = tmp_path / "data.npy"
    np.save(path, np.arange(127 * 3, dtype=np.int64) % 100)  # 3 sequences of 128
    if kind == "shards":
        shard = tmp_path / "shards"
        shard.mkdir()
        (shard / "manifest.json").write_text(json.dumps({"n_ctx": 128, "sequences": 3, "shards": []}))
        path = shard

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(run_mod, "build_backbone", no_model)
    out = tmp_path / "run"
    assert cli_main(["train", str(ROOT / "configs/tiny/e2e.yaml"), f"data.train={path}", "--out", str(out), "--quiet"]) == 2
    assert "data.train has 3 sequences of 128 tokens, fewer than one step's 16" in capsys.readouterr().err
    assert not out.exists()
