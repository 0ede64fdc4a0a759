"""The memory plan (`e2edict.plan`, ``e2edict plan``) against what a real training step holds on
the CPU: the activations autograd keeps for backward (every saved tensor that is not a weight,
each storage once, counted through ``saved_tensors_hooks`` around the step's forward) within
25%, the SAE and optimizer state exactly; the 27B and 70B weights against a hand count of the
architectures' parameters; bad input and the refusal before a model loads."""

import subprocess
import sys

import pytest
from conftest import ENV, ROOT, cli_cmd, random_gpt2

from e2edict.config import load_config
from e2edict.errors import E2EDictError
from e2edict.plan import check_memory, memory_plan

sys.path.insert(0, str(ROOT / "benchmarks"))
from memory_plan import measure  # noqa: E402

CFG = ROOT / "configs/tiny/e2e.yaml"
ACTIVATIONS = ("activations", "final hidden")


def measured(cfg, out) -> tuple[int, int, int]:
    """(bytes kept for backward by one real step's forward, SAE weight and buffer bytes, Adam state
    bytes after a step): the benchmark's measurement (`benchmarks/memory_plan.py`)."""
    got = measure(cfg, out)
    return got["activations"], got["sae_bytes"], got["optimizer_state"]


def planned(cfg, what) -> int:
    return sum(line.bytes for line in memory_plan(cfg).lines if line.what.startswith(what))


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["train.activation_checkpointing=true"],
        ["model.backend=huggingface", "saes.positions=[transformer.h.2:input]"],
        ["saes.architecture=topk", "saes.k=32"],
        ["saes.architecture=jumprelu"],
        ["saes.kind=transcoder", "saes.positions=[blocks.1.mlp]"],
        ["saes.positions=[blocks.0.hook_resid_pre,blocks.2.hook_resid_pre]", "loss.preset=e2e+ds"],
        ["train.precision=bf16"],
        ["loss.preset=local"],
    ],
    ids=["relu", "checkpointing", "hf", "topk", "jumprelu", "transcoder", "two-saes-ds", "bf16", "local"],
)
def test_the_plan_is_within_a_quarter_of_what_a_step_keeps(tmp_path, extra):
    cfg = load_config(CFG, ["train.batch_size=8", *extra])
    kept, sae_bytes, adam = measured(cfg, tmp_path / "run")
    plan = planned(cfg, ACTIVATIONS)
    assert 0.75 * kept <= plan <= 1.25 * kept, (plan, kept)
    assert planned(cfg, "SAE weights") == sae_bytes
    assert planned(cfg, "optimizer state") == adam


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_plan_of_a_gpt2_shaped_model(tmp_path, checkpointing):
    """GPT-2 small's shape (12 layers, d_model 768, vocabulary 50,257) from a config, random weights."""
    from transformers import AutoTokenizer

    from e2edict.assets import TINY_MODEL_DIR

    folder = tmp_path / "gpt2-shape"
    random_gpt2(0, n_layer=12, n_embd=768, n_head=12, n_positions=128).save_pretrained(folder)
    AutoTokenizer.from_pretrained(TINY_MODEL_DIR).save_pretrained(folder)  # the embedded corpus's tokens
    over = [f"model.name={folder}", "data.n_ctx=128", "train.batch_size=4", "saes.positions=[blocks.6.hook_resid_pre]",
            "saes.architecture=topk", "saes.k=32", "saes.dict_ratio=16",
            f"train.activation_checkpointing={checkpointing}"]  # fmt: skip
    cfg = load_config(CFG, over)
    kept, sae_bytes, adam = measured(cfg, tmp_path / "run")
    plan = planned(cfg, ACTIVATIONS)
    assert 0.75 * kept <= plan <= 1.25 * kept, (plan, kept)
    assert (planned(cfg, "SAE weights"), planned(cfg, "optimizer state")) == (sae_bytes, adam)
    weights = planned(cfg, "model weights")  # TransformerLens holds its own unembedding beside the embedding
    by_hand = 4 * (12 * (12 * 768 * 768 + 13 * 768) + 2 * 50257 * 768 + 128 * 768 + 2 * 768 + 50257)
    assert weights == by_hand


def _llama_params(d, ff, layers, heads, kv, vocab, tied, hd=None):
    hd = hd or d // heads
    block = d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * ff + 2 * d
    return vocab * d * (1 if tied else 2) + layers * block + d


def test_the_large_model_plans_count_every_weight():
    """Gemma-2-27B over 4 GPUs and Llama-3.1-70B over 8, from the configs shipped beside their
    training configs (no weights): each GPU's share of the bf16 weights by a hand count."""
    models = ROOT / "configs/models"
    gemma = load_config(ROOT / "configs/gemma-2-27b/e2e-layer23.yaml", [f"model.name={models}/gemma-2-27b"])
    g = memory_plan(gemma, 4)
    params = _llama_params(4608, 36864, 46, 32, 16, 256000, True, hd=128) + 46 * 2 * 4608  # 2 more norms a block
    assert params == 27_227_128_320 and g.lines[0].bytes == -(-2 * params // 4)
    llama = load_config(ROOT / "configs/llama-3.1-70b/e2e-layer40.yaml", [f"model.name={models}/llama-3.1-70b"])
    m = memory_plan(llama, 8)
    params = _llama_params(8192, 28672, 80, 64, 8, 128256, False)
    assert params == 70_553_706_496 and m.lines[0].bytes == 2 * params // 8
    assert g.total() < 80 * 2**30 and m.total() < 80 * 2**30 and g.sharded and m.sharded


def test_a_run_that_cannot_fit_is_refused_with_what_would_fit():
    """Refused before the model loads, naming a batch size whose own plan does fit."""
    cfg = load_config(CFG)  # 16 sequences a step
    plan = memory_plan(cfg)
    limit = plan.total() - 3 * plan.per_sequence - 1
    with pytest.raises(E2EDictError, match=r"more than the .* there are: try .*train.batch_size=12 ") as e:
        check_memory(cfg, 1, limit, show=False)
    assert "\n" not in str(e.value)
    assert memory_plan(load_config(CFG, ["train.batch_size=12"])).total() <= limit
    check_memory(cfg, 1, plan.total(), show=False)


def test_the_plan_command(tmp_path):
    r = subprocess.run(cli_cmd("plan", CFG, "--gpu-memory", "80"), env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "activations: blocks after the SAE" in r.stdout and "fits:" in r.stdout
    r = subprocess.run(cli_cmd("plan", CFG, "--gpu-memory", "0.001"), env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "more than the 1.0 MiB there are" in r.stdout
    for bad, fragment in ((["saes.positions=[nope]"], "cannot tell the width of position 'nope'"),
                          (["model.name=" + str(tmp_path / "none")], "cannot read the config of model")):  # fmt: skip
        r = subprocess.run(cli_cmd("plan", CFG, *bad), env=ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and fragment in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_checkpointing_with_no_block_after_the_saes_is_refused_before_the_model_loads():
    from e2edict.preparation import check_before_model

    for position in ("blocks.3.hook_resid_post", "blocks.3.mlp"):  # the embedded model has 4 blocks
        cfg = load_config(CFG, [f"saes.positions=[{position}]", "train.activation_checkpointing=true"])
        with pytest.raises(E2EDictError, match="no block of the model's 4 runs after the SAEs"):
            check_before_model(cfg)
    for position in ("blocks.3.hook_resid_pre", "blocks.0.hook_resid_pre"):
        check_before_model(load_config(CFG, [f"saes.positions=[{position}]", "train.activation_checkpointing=true"]))
