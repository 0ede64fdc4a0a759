"""A run killed with SIGKILL and resumed ends bitwise identical to an uninterrupted one."""

import json
import signal
import subprocess
import time

import pytest
from conftest import ENV, ROOT, logged_steps, sae_weights
from conftest import cli_cmd as cli
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # whole runs in child processes


def overrides(model_dir):
    return [
        f"model.name={model_dir}",
        "data.n_ctx=32",
        "saes.positions=[blocks.1.hook_resid_pre]",
        "train.tokens=16384",
        "train.batch_size=8",
        "train.grad_accum=2",
        "train.log_every=1",
        "train.checkpoint_every_tokens=1024",
        "train.keep_checkpoints=3",
        "train.eval_every_tokens=4096",
        "train.warmup_tokens=2048",
        "eval.tokens=2048",
        "eval.alive_tokens=2048",
        "eval.during_training_tokens=1024",
    ]


# Every optimizer's state (AdamW's; schedule-free AdamW's z, its weight sum and step count in the
# param groups) and the new-SAE options (tied encoder, b_dec from the data, projected decoder)
# come back exactly; evaluations during training (under schedule-free: the averaged weights) leave
# the trajectory as it was.
SCHEDULE_FREE = ["train.optimizer=schedulefree", "train.schedule=constant", "saes.init=tied", "saes.b_dec_init=mean",
                 "saes.apply_b_dec_to_input=true", "saes.decoder_norm=project"]  # fmt: skip


@pytest.mark.parametrize(
    "preset, extra",
    [("e2e", []), ("local", []), ("e2e", ["train.optimizer=adamw", "train.weight_decay=0.01"]), ("e2e", SCHEDULE_FREE)],
    ids=["e2e-adam", "local-adam", "e2e-adamw", "e2e-schedulefree"],
)
def test_sigkill_and_resume_is_bitwise_identical(tmp_path, small_gpt2_dir, preset, extra):
    config = ROOT / f"configs/tiny/{preset}.yaml"
    ref = tmp_path / "ref"
    r = subprocess.run(
        cli("train", config, *overrides(small_gpt2_dir), *extra, "--out", ref, "--quiet"),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr

    run = tmp_path / "run"
    proc = subprocess.Popen(
        cli("train", config, *overrides(small_gpt2_dir), *extra, "--out", run, "--quiet"),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    # wait until a couple of checkpoints exist, then kill at whatever point the run has reached
    deadline = time.time() + 300
    while time.time() < deadline:
        if len(list((run / "checkpoints").glob("step_*"))) >= 2 or proc.poll() is not None:
            break
        time.sleep(0.05)
    time.sleep(0.3)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "eval.json").exists()

    r = subprocess.run(cli("train", "--resume", run, "--quiet"), env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr

    a, b = sae_weights(ref), sae_weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].equal(b[k]), k
    assert logged_steps(run) == logged_steps(ref) == list(range(1, 33))
    assert logged_steps(run, "eval") == logged_steps(ref, "eval")
    assert json.loads((run / "eval.json").read_text()) == json.loads((ref / "eval.json").read_text())
    assert len(list((run / "checkpoints").glob("step_*"))) <= 3


def test_resume_falls_back_past_a_damaged_checkpoint(tmp_path, small_gpt2_dir):
    config = ROOT / "configs/tiny/e2e.yaml"
    ref, run = tmp_path / "ref", tmp_path / "run"
    base = overrides(small_gpt2_dir)
    for out in (ref, run):
        r = subprocess.run(
            cli("train", config, *base, "--out", out, "--quiet"), env=ENV, capture_output=True, text=True, timeout=600
        )
        assert r.returncode == 0, r.stderr
    # pretend the run died after its last checkpoint, and that checkpoint got truncated
    for f in ("eval.json",):
        (run / f).unlink()
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    newest = ckpts[-1] / "optimizer.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    r = subprocess.run(cli("train", "--resume", run, "--quiet"), env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "falling back to the previous checkpoint" in r.stderr
    a, b = sae_weights(ref), sae_weights(run)
    for k in a:
        assert a[k].equal(b[k]), k
    assert logged_steps(run) == list(range(1, 33))


def test_sigterm_writes_a_checkpoint_and_resume_matches(tmp_path, small_gpt2_dir):
    config = ROOT / "configs/tiny/local.yaml"
    base = [*overrides(small_gpt2_dir), "train.checkpoint_every_tokens=null"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    r = subprocess.run(cli("train", config, *base, "--out", ref, "--quiet"), env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    proc = subprocess.Popen(
        cli("train", config, *base, "--out", run, "--quiet"),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "resume with: e2edict train --resume" in err
    assert len(list((run / "checkpoints").glob("step_*"))) == 1
    r = subprocess.run(cli("train", "--resume", run, "--quiet"), env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    a, b = sae_weights(ref), sae_weights(run)
    for k in a:
        assert a[k].equal(b[k]), k
    assert logged_steps(run) == list(range(1, 33))


def test_non_finite_loss_stops_with_step_and_term(tmp_path, small_gpt2_dir, monkeypatch):
    import torch

    import e2edict.step as step_mod
    import e2edict.trainer as train_mod
    from e2edict.config import load_config
    from e2edict.errors import E2EDictError

    real = step_mod.training_forward_from
    calls = []

    def poisoned(*args, **kw):
        out = real(*args, **kw)
        calls.append(1)
        if len(calls) == 11:  # step 6 (two micro-batches a step)
            out.terms["kl"] = out.terms["kl"] * float("nan")
        return out

    monkeypatch.setattr(step_mod, "training_forward_from", poisoned)
    cfg = load_config(ROOT / "configs/tiny/e2e.yaml", overrides(small_gpt2_dir))
    with pytest.raises(E2EDictError, match=r"NaN or Inf in the loss term 'kl' at step 6.*step_000000004"):
        train_mod.train(cfg, out=tmp_path / "run", progress=False)
    assert torch.isfinite(
        next(iter(load_file(str(sorted((tmp_path / "run" / "checkpoints").glob("step_*"))[-1] / "saes.safetensors")).values()))
    ).all()


def test_restore_refuses_optimizer_state_of_another_shape(tmp_path):
    """A checkpoint from an SAE with the encoder in the other layout (or any other shape) must not
    load into the optimizer: torch would accept it, and fused Adam would then update garbage."""
    import torch

    from e2edict.checkpoint import read_checkpoint, restore, save_checkpoint
    from e2edict.errors import E2EDictError
    from e2edict.optim import make_optimizer
    from e2edict.saes import registry

    def setup():
        torch.manual_seed(0)
        saes = {"h": registry["relu"](8, 32, "h")}
        opt = make_optimizer(list(saes["h"].parameters()), 1e-3)
        return saes, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    saes, opt, sched = setup()
    saes["h"](torch.randn(5, 8))[0].square().sum().backward()
    opt.step()
    path = save_checkpoint(tmp_path, 1, saes, opt, sched, {})
    doc, sae_t, opt_t = read_checkpoint(path)
    saes2, opt2, sched2 = setup()
    restore((doc, sae_t, opt_t), saes2, opt2, sched2)  # the round trip: same weights and Adam moments
    for p, q in zip(saes["h"].parameters(), saes2["h"].parameters(), strict=True):
        assert p.equal(q) and opt.state[p]["exp_avg"].equal(opt2.state[q]["exp_avg"])
    names = [n for n, _ in saes["h"].named_parameters()]
    i = names.index("W_enc_T")
    opt_t[f"{i}::exp_avg"] = opt_t[f"{i}::exp_avg"].T.contiguous()
    with pytest.raises(E2EDictError, match=f"optimizer state {i}::exp_avg is misshapen"):
        restore((doc, sae_t, opt_t), *setup())
