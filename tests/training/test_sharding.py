"""The frozen model sharded over 2 gloo ranks with FSDP2 (``train.shard_model``): the same SAEs as
one process with the whole batch, for both backbones, a transcoder and an adapter; bitwise the
DDP run without sharding; each rank holding half the model's weights between steps and after
backward (measured by the bytes each registered weight holds); bad input refused before the
model loads."""

import json
import subprocess
import sys

import pytest
from conftest import ENV, ROOT, sae_weights
from conftest import cli_cmd as single
from safetensors.torch import load_file
from test_distributed import overrides, torchrun

from e2edict.config import load_config
from e2edict.errors import E2EDictError
from e2edict.preparation import check_before_model

pytestmark = pytest.mark.slow  # torchrun runs in child processes
CFG = ROOT / "configs/tiny/e2e.yaml"
CASES = {
    "tl-e2e": (["saes.positions=[blocks.1.hook_resid_pre]"], "blocks.1.hook_resid_pre"),
    "tl-checkpointing": (
        ["saes.positions=[blocks.1.hook_resid_pre]", "train.activation_checkpointing=true"], "blocks.1.hook_resid_pre"
    ),
    "hf-e2e": (["model.backend=huggingface", "saes.positions=[transformer.h.1]"], "transformer.h.1"),
    "tl-transcoder": (["saes.kind=transcoder", "saes.positions=[blocks.1.mlp]"], "blocks.1.ln2.hook_normalized"),
    "hf-matryoshka-e2e+ds": (
        ["model.backend=huggingface", "saes.positions=[transformer.h.1]", "saes.architecture=matryoshka_batchtopk",
         "saes.k=8", "loss.preset=e2e+ds"],
        "transformer.h.1",
    ),  # fmt: skip
    "tl-adapter": (["saes.positions=[blocks.1.hook_resid_pre]", "adapter.rank=2"], "blocks.1.hook_resid_pre"),
    "hf-adapter-bf16": (
        ["model.backend=huggingface", "saes.positions=[transformer.h.1]", "adapter.rank=2", "train.precision=bf16"],
        "transformer.h.1",
    ),
}


def _train(cmd, out):
    r = subprocess.run([*cmd, "--out", str(out), "--quiet"], env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_ranks_equal_one_rank_with_the_whole_batch(tmp_path, small_gpt2_dir, case):
    extra, hook = CASES[case]
    extra = [*extra, "train.tokens=4096"]  # 16 steps: enough to tell, half the suite's time
    one, ddp, sharded = tmp_path / "one", tmp_path / "ddp", tmp_path / "sharded"
    _train(torchrun("train", CFG, *overrides(small_gpt2_dir, 4), *extra), ddp)
    _train(torchrun("train", CFG, *overrides(small_gpt2_dir, 4), *extra, "train.shard_model=true"), sharded)
    a, b = sae_weights(ddp, hook), sae_weights(sharded, hook)
    assert all(a[k].equal(b[k]) for k in a)  # sharding changes no number: the DDP run's SAEs bit for bit
    if "adapter" in case:
        _adapters_equal(ddp, sharded)
    if "bf16" in case:  # the final evaluation: a sharded model stays in bf16 (no whole fp32 copy is kept)
        return
    if "matryoshka" in case:  # BatchTopK picks its top k x N over each rank's own batch: not one process's numbers
        return
    _train(single("train", CFG, *overrides(small_gpt2_dir, 8), *extra), one)
    ref = sae_weights(one, hook)
    for k in ref:
        assert (ref[k] - b[k]).abs().max() < 1e-5, (k, (ref[k] - b[k]).abs().max())
    # every rank evaluated the sharded model together; rank 0 wrote what the DDP run's rank 0 did
    assert json.loads((sharded / "eval.json").read_text())["kl"] == json.loads((ddp / "eval.json").read_text())["kl"]


def _adapters_equal(ddp, sharded):
    x = load_file(str(ddp / "adapter" / "adapter_model.safetensors"))
    y = load_file(str(sharded / "adapter" / "adapter_model.safetensors"))
    assert all(x[k].equal(y[k]) for k in x)


@pytest.mark.parametrize("backend", ["transformer_lens", "huggingface"])
def test_each_rank_holds_half_the_model_between_steps_and_after_backward(tmp_path, small_gpt2_dir, backend):
    position = "blocks.1.hook_resid_pre" if backend == "transformer_lens" else "transformer.h.1"
    probe = ROOT / "tests/training/shard_probe.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(probe), str(CFG),
           str(tmp_path / "run"), str(tmp_path / "held"), f"model.name={small_gpt2_dir}", f"model.backend={backend}",
           f"saes.positions=[{position}]", "data.n_ctx=32", "saes.dict_ratio=4", "train.batch_size=4",
           "train.shard_model=true"]  # fmt: skip
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        held = json.loads((tmp_path / f"held.{rank}.json").read_text())
        for when in ("start", "after_backward", "after_step", "after_evaluation"):
            assert held[when] == pytest.approx(0.5, abs=0.01), (rank, when, held)
        assert held["during_step"] > 0.6  # the root's weights gathered for the step: the measure sees gathers


def test_sharding_without_torchrun_is_refused_before_the_model_loads(tmp_path, small_gpt2_dir):
    out = tmp_path / "run"
    r = subprocess.run(single("train", CFG, *overrides(small_gpt2_dir, 4), "train.shard_model=true", "--out", out),
                       env=ENV, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 2 and "train.shard_model" in r.stderr and "torchrun" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()


def test_more_ranks_than_blocks_and_compile_are_refused(small_gpt2_dir):
    cfg = load_config(CFG, [f"model.name={small_gpt2_dir}", "train.shard_model=true"])
    with pytest.raises(E2EDictError, match="4 ranks but the model has 3 blocks; use at most 3"):
        check_before_model(cfg, world=4)  # read from config.json: before the weights load
    check_before_model(cfg, world=3)
    with pytest.raises(E2EDictError, match="train.compile with train.shard_model"):
        load_config(CFG, ["train.shard_model=true", "train.compile=true"])
