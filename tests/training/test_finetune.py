"""Fine-tuning SAEs others trained: Karvonen's recipe (loss.preset: finetune), the sources
saes.init_from reads (sparsify folders, sae_lens releases), and what a run records of its start."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import ENV, ROOT, cli_cmd

from e2edict.config import config_from_dict
from e2edict.presets import PRESETS
from e2edict.saes import load_sae, registry, save_sae
from e2edict.splice import LossWeights, training_forward

HOOK = "blocks.1.hook_resid_pre"


def grads_of(backbone, sae, tokens, weights):
    sae.zero_grad()
    out = training_forward(backbone, {HOOK: sae}, tokens, weights)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in sae.named_parameters()}


def test_recipe_loss_and_gradient_equal_a_hand_computation_with_alpha_detached(small_backbone):
    torch.manual_seed(0)
    sae = registry["relu"](32, 64, HOOK).double()
    small_backbone.model.double()
    try:
        alphas = []
        for seed in (1, 2):  # alpha is this step's MSE / KL, recomputed for every batch
            torch.manual_seed(seed)
            tokens = torch.randint(0, 4096, (2, 16))
            balanced = LossWeights(sparsity={HOOK: 0.3}, kl=0.5, local=0.5, kl_balance=True)
            out, g = grads_of(small_backbone, sae, tokens, balanced)
            mse, kl, l1 = out.terms[f"local/{HOOK}"].item(), out.terms["kl"].item(), out.terms[f"sparsity/{HOOK}"].item()
            alpha = mse / kl
            assert out.terms["kl_alpha"].item() == pytest.approx(alpha, rel=1e-12)
            assert out.loss.item() == pytest.approx(0.5 * (alpha * kl + mse) + 0.3 * l1, rel=1e-12)
            # the same gradient as a fixed coefficient alpha (no gradient through alpha) ...
            fixed = LossWeights(sparsity={HOOK: 0.3}, kl=0.5 * alpha, local=0.5)
            _, g_fixed = grads_of(small_backbone, sae, tokens, fixed)
            for n in g:
                assert torch.allclose(g[n], g_fixed[n], rtol=1e-9, atol=1e-12), n
            # ... and not the gradient alpha would give if it were differentiated (that is dMSE)
            mse_only = LossWeights(sparsity={HOOK: 0.3}, kl=0.0, local=1.0)
            _, g_mse = grads_of(small_backbone, sae, tokens, mse_only)
            assert not torch.allclose(g["W_dec"], g_mse["W_dec"], rtol=1e-3)
            alphas.append(alpha)
        assert alphas[0] != alphas[1]
    finally:
        small_backbone.model.float()


def config(**blocks):
    raw = {"saes": {"positions": [HOOK], "init_from": "x"}, "loss": {"preset": "finetune"}}
    for k, v in blocks.items():
        raw.setdefault(k, {}).update(v)
    return config_from_dict(raw)


@pytest.mark.parametrize("preset", ["finetune", "adapter"])
def test_preset_train_defaults_follow_the_optimizer_given(preset):
    """Each key left out comes from the preset's training defaults: the rate of the optimizer in use (AdamW's for
    Adam), its schedule (constant for schedule-free, else linear to 0), AdamW where only a decay
    schedule is given; what is given stays."""
    best = PRESETS[preset].train
    extra = {"adapter": {"rank": 4}} if preset == "adapter" else {}

    def train_of(**train):
        return config(loss={"preset": preset}, train=train, **extra).train

    t = train_of(optimizer="schedulefree")
    assert (t.lr, t.schedule) == (best.lr, "constant")
    for opt in ("adamw", "adam"):
        t = train_of(optimizer=opt)
        assert (t.optimizer, t.lr, t.schedule, t.min_lr_factor) == (opt, best.lr, "linear", 0.0)
    t = train_of(schedule="cosine")
    assert (t.optimizer, t.lr, t.schedule) == ("adamw", best.lr, "cosine")
    t = train_of(lr=2e-4, warmup_tokens=512, min_lr_factor=0.1)
    assert (t.optimizer, t.lr, t.warmup_tokens, t.min_lr_factor) == (best.optimizer, 2e-4, 512, 0.1)
    assert config_from_dict({"saes": {"positions": [HOOK]}}).train.optimizer == "adam"  # other presets: unchanged


def test_finetune_preset_defaults_and_what_overrides_them():
    c = config()
    t = c.train
    # what benchmarks/short_budget.py chose (benchmarks/results/short_budget/results.json)
    assert (t.optimizer, t.lr, t.schedule, t.min_lr_factor, t.warmup_tokens) == ("schedulefree", 1e-3, "constant", 0.0, 0)
    assert config(loss={"preset": "adapter"}, adapter={"rank": 4}).train.lr == 1e-2
    assert c.saes.decoder_norm == "project" and c.loss.kl_balance is True
    assert (c.loss.kl.coeff, c.loss.local.coeff) == (0.5, 0.5)
    c = config(train={"lr": 1e-3, "schedule": "cosine"}, loss={"kl": {"coeff": 2.0}}, saes={"decoder_norm": "reparam"})
    assert (c.train.lr, c.train.schedule, c.train.optimizer) == (1e-3, "cosine", "adamw")
    assert c.loss.kl_balance is False and c.loss.kl.coeff == 2.0 and c.saes.decoder_norm == "reparam"
    # the resolved config reads back as itself (every default is written out)
    again = config_from_dict(c.to_dict())
    assert again.to_dict() == c.to_dict()
    e2e = config_from_dict({"saes": {"positions": [HOOK]}})
    assert (e2e.train.optimizer, e2e.saes.decoder_norm, e2e.loss.kl_balance) == ("adam", "reparam", False)


def test_a_file_records_the_lambda_it_was_trained_with(tmp_path):
    sae = registry["relu"](8, 16, HOOK)
    save_sae(sae, tmp_path / "a", {"e2edict_coefficients": {"sparsity": 0.7}})
    assert load_sae(tmp_path / "a").source_lambda == 0.7
    save_sae(sae, tmp_path / "b")
    assert load_sae(tmp_path / "b").source_lambda is None


# --- through the command line: sources, before/after, bad sources ---------------------------


def small_overrides(model_dir, *extra):
    return [
        f"model.name={model_dir}",
        "data.n_ctx=32",
        "train.tokens=4096",
        "train.batch_size=8",
        "eval.tokens=2048",
        "eval.alive_tokens=2048",
        *extra,
    ]


def sparsify_folder(root: Path, hook: str = "h.1", d_in: int = 32) -> Path:
    sparsify = pytest.importorskip("sparsify")
    torch.manual_seed(0)
    coder = sparsify.SparseCoder(d_in, sparsify.SaeConfig(num_latents=64, k=4))
    coder.save_to_disk(root / hook)
    return root


def train_cli(*args, env=ENV):
    return subprocess.run(cli_cmd("train", ROOT / "configs/tiny/finetune.yaml", *args, "--quiet"),
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip


@pytest.mark.slow
def test_sparsify_checkpoint_fine_tunes_through_the_cli_and_records_its_start(tmp_path, small_gpt2_dir):
    src = sparsify_folder(tmp_path / "sparsify")
    out = tmp_path / "run"
    r = train_cli(*small_overrides(small_gpt2_dir, "model.backend=huggingface", "saes.positions=[transformer.h.1]",
                                   f"saes.init_from={src}"), "--out", out)  # fmt: skip
    assert r.returncode == 0, r.stderr
    saved = (out / "config.yaml").read_text()
    assert "architecture: topk" in saved and "k: 4" in saved  # taken from the source
    ev = json.loads((out / "eval.json").read_text())
    init = ev["init"]["saes"]["transformer.h.1"]
    assert init["l0"] == pytest.approx(4.0) and ev["init"]["ce_loss_increase"] != ev["ce_loss_increase"]
    r = subprocess.run(cli_cmd("compare", out, "--out", tmp_path / "cmp"), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    table = (tmp_path / "cmp" / "runs.md").read_text()
    assert "init_ce_loss_increase" in table and f"{ev['init']['ce_loss_increase']:.4g}"[:5] in table


@pytest.mark.slow
def test_sae_lens_release_resolves_through_sae_lens_from_a_cache_the_test_fills(tmp_path, small_gpt2_dir):
    repo, sub = "jbloom/GPT2-Small-SAEs-Reformatted", "blocks.1.hook_resid_pre"  # release gpt2-small-res-jb
    snap = tmp_path / "hub" / ("models--" + repo.replace("/", "--")) / "snapshots" / ("0" * 40)
    torch.manual_seed(0)
    source = registry["relu"](32, 64, sub)
    save_sae(source, snap / sub)
    (snap.parent.parent / "refs").mkdir(parents=True)
    (snap.parent.parent / "refs" / "main").write_text("0" * 40)
    env = {**ENV, "HF_HUB_CACHE": str(tmp_path / "hub")}
    out = tmp_path / "run"
    ov = small_overrides(small_gpt2_dir, f"saes.positions=[{sub}]", f"saes.init_from=sae_lens:gpt2-small-res-jb/{sub}")
    r = train_cli(*ov, "--out", out, env=env)
    assert r.returncode == 0, r.stderr
    assert "architecture: relu" in (out / "config.yaml").read_text()
    assert "init" in json.loads((out / "eval.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, message",
    [
        ("neither", "neither a run directory"),
        ("release", "sae_lens could not load release"),
        ("clash", "saes.architecture is 'jumprelu'"),
        ("hook", "is not a hook of model"),
        ("width", "d_in"),
    ],
)
def test_bad_sources_end_in_one_line_exit_2_and_nothing_written(tmp_path, small_gpt2_dir, case, message):
    hf = ["model.backend=huggingface", "saes.positions=[transformer.h.1]"]
    if case == "neither":
        (tmp_path / "junk").mkdir()
        (tmp_path / "junk" / "notes.txt").write_text("not an SAE")
        extra = [f"saes.init_from={tmp_path / 'junk'}"]
    elif case == "release":
        extra = ["saes.init_from=sae_lens:no-such-release/blocks.0.hook_resid_pre"]
    elif case == "clash":
        extra = [*hf, f"saes.init_from={sparsify_folder(tmp_path / 'sp')}", "saes.architecture=jumprelu"]
    elif case == "hook":
        extra = [*hf, f"saes.init_from={sparsify_folder(tmp_path / 'sp', hook='h.9')}"]
    else:
        extra = [*hf, f"saes.init_from={sparsify_folder(tmp_path / 'sp', d_in=16)}"]
    out = tmp_path / "run"
    r = train_cli(*small_overrides(small_gpt2_dir, *extra), "--out", out)
    assert r.returncode == 2, r.stderr
    lines = [x for x in r.stderr.strip().splitlines() if x.startswith("e2edict: error")]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not out.exists()


@pytest.mark.parametrize("backend", ["huggingface", "transformer_lens"])
def test_sparsify_hook_points_map_to_the_backbone_hooks(tmp_path, backend):
    sparsify = pytest.importorskip("sparsify")
    from e2edict.run import open_backbone, source_saes

    for name, cfg in (("h.2", {}), ("h.1.mlp", {"transcode": True})):
        coder = sparsify.SparseCoder(128, sparsify.SaeConfig(num_latents=256, k=8, **cfg))
        coder.save_to_disk(tmp_path / name)
    backbone = open_backbone("tiny", backend)
    got = source_saes(str(tmp_path), backbone)
    if backend == "huggingface":
        sae_hook, mlp_in, mlp_out = "transformer.h.2", "transformer.h.1.mlp:input", "transformer.h.1.mlp"
    else:
        sae_hook, mlp_in, mlp_out = "blocks.2.hook_resid_post", "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
    assert set(got) == {sae_hook, mlp_in}
    assert got[sae_hook].kind == "sae" and got[sae_hook].hook_name == sae_hook
    assert got[mlp_in].kind == "transcoder" and (got[mlp_in].hook_name, got[mlp_in].hook_name_out) == (mlp_in, mlp_out)


def test_load_saes_reads_every_source_init_from_takes(tmp_path, monkeypatch):
    """`e2edict.load_saes` on a sparsify folder (its module paths as keys; with a model, that
    model's hooks), a SAELens-layout folder, and a sae_lens release from a cache the test fills:
    the same weights as each format's own loader gives, in eval mode."""
    import e2edict
    from e2edict.saes import load_sparsify

    sparsify = pytest.importorskip("sparsify")
    torch.manual_seed(0)
    sparsify.SparseCoder(128, sparsify.SaeConfig(num_latents=256, k=8)).save_to_disk(tmp_path / "sp" / "h.2")
    got = e2edict.load_saes(tmp_path / "sp")
    ref = load_sparsify(tmp_path / "sp" / "h.2")
    assert list(got) == ["h.2"] and not got["h.2"].training
    torch.testing.assert_close(got["h.2"].W_dec, ref.W_dec, rtol=0, atol=0)
    tl, hf = e2edict.load_model("tiny"), e2edict.load_model("tiny", backend="huggingface")
    assert list(e2edict.load_saes(tmp_path / "sp", model=tl)) == ["blocks.2.hook_resid_post"]
    assert list(e2edict.load_saes(tmp_path / "sp" / "h.2", model=hf)) == ["transformer.h.2"]
    # a release of sae_lens's registry, resolved by sae_lens itself from the Hugging Face cache
    repo, sub = "jbloom/GPT2-Small-SAEs-Reformatted", "blocks.1.hook_resid_pre"  # release gpt2-small-res-jb
    snap = tmp_path / "hub" / ("models--" + repo.replace("/", "--")) / "snapshots" / ("0" * 40)
    source = registry["relu"](128, 256, sub)
    save_sae(source, snap / sub)
    (snap.parent.parent / "refs").mkdir(parents=True)
    (snap.parent.parent / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    rel = e2edict.load_saes(f"sae_lens:gpt2-small-res-jb/{sub}", model=tl)
    torch.testing.assert_close(rel[sub].W_enc, source.W_enc, rtol=0, atol=0)
    from e2edict.errors import E2EDictError

    with pytest.raises(E2EDictError, match="SAE source .* does not exist"):
        e2edict.load_saes(tmp_path / "nowhere")
