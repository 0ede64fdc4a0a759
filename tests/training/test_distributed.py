"""torchrun with 2 processes on gloo: the same SAE as one process with twice the batch, exact
resume under the same world size, and a failing rank ends the whole run."""

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import ENV, ROOT, logged_steps, sae_weights
from conftest import cli_cmd as single
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # torchrun runs in child processes
HOOK = "blocks.1.hook_resid_pre"


def overrides(model_dir, batch):
    return [
        f"model.name={model_dir}",
        "data.n_ctx=32",
        f"saes.positions=[{HOOK}]",
        "saes.dict_ratio=4",
        "train.tokens=8192",
        f"train.batch_size={batch}",
        "train.log_every=1",
        "train.eval_every_tokens=null",
        "train.warmup_tokens=1024",
        "eval.tokens=1024",
        "eval.alive_tokens=1024",
        "train.dist_timeout_s=120",
    ]


def torchrun(*args, n=2):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={n}",
        "-m",
        "e2edict",
        *map(str, args),
    ]


@pytest.mark.parametrize(
    "preset, extra", [("e2e", []), ("local", []), ("e2e", ["adapter.rank=2"])], ids=["e2e", "local", "adapter"]
)
def test_two_ranks_equal_one_rank_with_twice_the_batch(tmp_path, small_gpt2_dir, preset, extra):
    """An adapter's gradients are averaged over ranks like the SAEs' (`DistContext.average_grads`)."""
    cfg = ROOT / f"configs/tiny/{preset}.yaml"
    one, two = tmp_path / "one", tmp_path / "two"
    r = subprocess.run(
        single("train", cfg, *overrides(small_gpt2_dir, 8), *extra, "--out", one, "--quiet"),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        torchrun("train", cfg, *overrides(small_gpt2_dir, 4), *extra, "--out", two, "--quiet"),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = sae_weights(one), sae_weights(two)
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-5, k
    assert logged_steps(two) == logged_steps(one) == list(range(1, 33))  # rank 0 alone logs
    rows1 = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    rows2 = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    # the logged loss is the mean over ranks, i.e. the loss of the whole global batch
    assert rows2[0]["loss"] == pytest.approx(rows1[0]["loss"], rel=1e-5)
    expected = ["config.yaml", "eval.json", "metrics.jsonl", "saes"]
    if extra:
        a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (one, two))
        assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-5 for k in a)
        assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)  # it trained
        expected = ["adapter", *expected]
    assert sorted(p.name for p in two.iterdir()) == expected


@pytest.mark.parametrize("sharded", [False, True], ids=["ddp", "sharded"])
def test_resume_under_torchrun_and_world_size_check(tmp_path, small_gpt2_dir, sharded):
    """Under ``train.shard_model`` too: the checkpoint holds the SAEs alone, the model is never saved."""
    cfg = ROOT / "configs/tiny/e2e.yaml"
    base = [*overrides(small_gpt2_dir, 4), "train.checkpoint_every_tokens=1024", "train.tokens=16384"]
    base += ["train.shard_model=true"] if sharded else []
    ref, run = tmp_path / "ref", tmp_path / "run"
    r = subprocess.run(
        torchrun("train", cfg, *base, "--out", ref, "--quiet"), env=ENV, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    proc = subprocess.Popen(
        torchrun("train", cfg, *base, "--out", run, "--quiet"),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and len(list((run / "checkpoints").glob("step_*"))) < 2:
        time.sleep(0.05)
    workers = psutil.Process(proc.pid).children(recursive=True)
    for w in [proc, *workers]:  # a preemption kills every process at once
        try:
            w.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)
    assert not (run / "eval.json").exists()

    r = subprocess.run(single("train", "--resume", run, "--quiet"), env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and ("train.shard_model" if sharded else "resume it with 2, not 1") in r.stderr
    r = subprocess.run(torchrun("train", "--resume", run, "--quiet"), env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = sae_weights(ref), sae_weights(run)
    for k in a:
        assert a[k].equal(b[k]), k
    assert logged_steps(run) == logged_steps(ref) == list(range(1, 65))


def test_a_failing_rank_ends_the_whole_run(tmp_path, small_gpt2_dir):
    cfg = ROOT / "configs/tiny/e2e.yaml"
    run = tmp_path / "run"
    base = [*overrides(small_gpt2_dir, 4), "train.tokens=400000", "train.dist_timeout_s=30"]
    proc = subprocess.Popen(
        torchrun("train", cfg, *base, "--out", run, "--quiet"), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.05)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "e2edict" in " ".join(p.cmdline())]
    assert len(workers) == 2
    workers[-1].send_signal(signal.SIGKILL)  # one rank dies mid-run
    start = time.time()
    rc = proc.wait(timeout=180)
    assert rc != 0 and time.time() - start < 180
    assert not (run / "eval.json").exists()
