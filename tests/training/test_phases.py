"""The three phases of a training run on their own: `prepare` (everything checked and built, the
warm-start source loaded once, only config.yaml written), `train_run` (the loop: metrics rows, no
evaluation file), `finish_run` (SAEs saved, eval.json), and `initial_saes` (b_dec from the data,
the batches rewound)."""

import json

import pytest
import torch
from safetensors.torch import load_file

import e2edict.preparation as preparation
import e2edict.run as run_module
from e2edict.config import load_config
from e2edict.distributed import DistContext
from e2edict.errors import E2EDictError
from e2edict.initialization import initial_saes
from e2edict.preparation import prepare
from e2edict.saes import load_sae, registry, save_sae
from e2edict.trainer import finish_run, train, train_run

HOOK = "blocks.1.hook_resid_pre"


def small_config(model_dir, root, *extra):
    return load_config(
        root / "configs/tiny/local.yaml",
        [
            f"model.name={model_dir}",
            "data.n_ctx=32",
            f"saes.positions=[{HOOK}]",
            "train.tokens=4096",
            "train.batch_size=8",
            "train.log_every=4",
            "train.warmup_tokens=0",
            "train.eval_every_tokens=2048",
            "eval.tokens=1024",
            "eval.alive_tokens=1024",
            "eval.during_training_tokens=512",
            *extra,
        ],
    )


def cpu():
    return DistContext(device="cpu")


def test_prepare_loads_the_source_once_and_writes_only_the_config(tmp_path, small_gpt2_dir):
    from conftest import ROOT

    torch.manual_seed(5)
    source = registry["relu"](32, 64, HOOK)
    save_sae(source, tmp_path / "source")
    calls = []
    real = preparation.load_source

    def counted(spec, *a, **k):
        calls.append(spec)
        return real(spec, *a, **k)

    cfg = small_config(small_gpt2_dir, ROOT, f"saes.init_from={tmp_path / 'source'}", "loss.preset=finetune")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(preparation, "load_source", counted)
        mp.setattr(run_module, "load_source", counted)
        run = prepare(cfg, cpu(), out=tmp_path / "run")
    try:
        assert calls == [str(tmp_path / "source")]  # once, for the config's keys and the warm start alike
        written = sorted(p.name for p in (tmp_path / "run").iterdir())
        assert written == ["config.yaml", "init_eval.json"]  # no metrics, no SAEs before a step
        assert (run.first_step, run.tokens_per_step, run.total_steps) == (0, 8 * 32, 4096 // (8 * 32))
        loaded = load_sae(tmp_path / "source")  # the file's weights, as the format's loader reads them
        assert run.saes[HOOK].state_dict().keys() == loaded.state_dict().keys()
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in run.saes[HOOK].state_dict().items())
        assert run.saes[HOOK].training
        assert "architecture: relu" in (tmp_path / "run" / "config.yaml").read_text()
    finally:
        run.batches.close()


def test_prepare_checks_the_budget_before_the_model_loads(tmp_path, small_gpt2_dir, monkeypatch):
    from conftest import ROOT

    def no_model(cfg):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(run_module, "build_backbone", no_model)
    cfg = small_config(small_gpt2_dir, ROOT, "train.tokens=100")
    with pytest.raises(E2EDictError, match=r"train.tokens=100 is less than one step \(256 tokens\)"):
        prepare(cfg, cpu(), out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_phases_one_by_one_give_what_train_gives(tmp_path, small_gpt2_dir):
    from conftest import ROOT

    cfg = small_config(small_gpt2_dir, ROOT)
    whole = train(cfg, out=tmp_path / "whole", progress=False)
    run = prepare(cfg, cpu(), out=tmp_path / "phases")
    train_run(run, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "phases" / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in rows} == {"train", "eval"} and [r["step"] for r in rows if r["split"] == "eval"] == [8]
    assert not (tmp_path / "phases" / "eval.json").exists()  # the loop writes no evaluation file
    result = finish_run(run)
    got = json.loads((tmp_path / "phases" / "eval.json").read_text())
    assert got == json.loads((whole / "eval.json").read_text())
    assert got["ce_loss_increase"] == result["ce_loss_increase"]
    a = load_file(whole / f"saes/{HOOK}/sae_weights.safetensors")
    b = load_file(tmp_path / f"phases/saes/{HOOK}/sae_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_initial_saes_take_b_dec_from_the_first_step_and_rewind_the_batches(small_gpt2_dir):
    """``saes.b_dec_init: mean``: b_dec is the mean clean activation over the first step's batches
    (recomputed here with TransformerLens's own cache), and the batches start where they were."""
    from conftest import ROOT

    from e2edict.data import make_batches

    cfg = small_config(small_gpt2_dir, ROOT, "saes.b_dec_init=mean", "train.grad_accum=2")
    setup = run_module.setup_run(cfg)
    batches = make_batches(setup.train_data, 8, cfg.seed)
    before = batches.state()
    saes = initial_saes(setup, batches, grad_accum=2)
    assert batches.state() == before
    first = torch.cat([batches.next() for _ in range(2)])
    _, cache = setup.backbone.model.run_with_cache(first, names_filter=HOOK)
    want = cache[HOOK].reshape(-1, 32).double().mean(0)
    torch.testing.assert_close(saes[HOOK].b_dec.double(), want, rtol=1e-6, atol=1e-6)
