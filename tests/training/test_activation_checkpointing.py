"""``train.activation_checkpointing``: the blocks after the first SAE keep only their input for
backward and run again there, so the gradients are those of the plain step while the activations
kept for backward shrink; blocks with an SAE inside (a transcoder's MLP) are not recomputed."""

import pytest
import torch

from e2edict.config import config_from_dict
from e2edict.errors import E2EDictError
from e2edict.saes import Writes, registry
from e2edict.splice import LossWeights, training_forward


@pytest.fixture(scope="module")
def hf_small(small_gpt2_dir):
    from e2edict.run import open_backbone

    return open_backbone(str(small_gpt2_dir), backend="huggingface")


def step(bb, saes, tokens, weights, checkpointed: bool, blocks):
    """Loss, the SAEs' gradients, the bytes autograd saved for backward, and how often each of
    ``blocks`` ran (forward and recomputation)."""
    for s in saes.values():
        s.zero_grad()
    calls = [0] * len(blocks)
    # a pre-hook: a recomputation stops as soon as it has what backward needs, before a block's end
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1)) for i, b in enumerate(blocks)]
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    bb.checkpoint_blocks = checkpointed
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = training_forward(bb, saes, tokens, weights)
        out.loss.backward()
    finally:
        bb.checkpoint_blocks = False
        for h in handles:
            h.remove()
    grads = {f"{h}.{n}": p.grad.clone() for h, s in saes.items() for n, p in s.named_parameters()}
    return out.loss.item(), grads, saved[0], calls


@pytest.mark.parametrize("backend", ["transformer_lens", "huggingface"])
@pytest.mark.parametrize("preset", ["e2e", "e2e+ds"])
def test_checkpointed_blocks_give_the_same_gradients_and_keep_less(small_backbone, hf_small, backend, preset):
    tl = backend == "transformer_lens"
    bb, hook = (small_backbone, "blocks.1.hook_resid_pre") if tl else (hf_small, "transformer.h.1:input")
    blocks = list(bb.model.blocks) if backend == "transformer_lens" else list(bb.blocks)
    torch.manual_seed(0)
    saes = {hook: registry["relu"](32, 64, hook)}
    tokens = torch.randint(0, 4096, (4, 16), generator=torch.Generator().manual_seed(1))
    ds = bb.resid_hooks_after(hook) if preset == "e2e+ds" else []
    w = LossWeights(sparsity={hook: 1.0}, kl=1.0 if preset == "e2e" else 0.5, downstream=0.0 if preset == "e2e" else 2.5,
                    downstream_positions=ds)  # fmt: skip
    step(bb, saes, tokens, w, False, blocks)  # the Hugging Face backbone records its block arguments once per length
    loss_a, grads_a, saved_a, calls_a = step(bb, saes, tokens, w, False, blocks)
    loss_b, grads_b, saved_b, calls_b = step(bb, saes, tokens, w, True, blocks)
    assert loss_a == pytest.approx(loss_b, rel=1e-7)
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-6, atol=1e-6)
    # blocks 1 and 2 (after the SAE) run once more, in backward; block 0 (the shared prefix) does not
    assert [b - a for a, b in zip(calls_a, calls_b, strict=True)] == [0, 1, 1], (calls_a, calls_b)
    assert saved_b < 0.5 * saved_a, (saved_a, saved_b)


def test_a_block_with_an_sae_inside_is_not_recomputed(small_backbone):
    """A transcoder at block 1's MLP: block 1 runs as it is (recomputing it would run the
    transcoder again), block 2 is recomputed; the gradients are the plain step's."""
    src, dst = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
    torch.manual_seed(0)
    saes = {src: registry["relu"](32, 64, src, writes=Writes(32, dst))}
    small_backbone.keep_hooks([src, dst])
    tokens = torch.randint(0, 4096, (4, 16), generator=torch.Generator().manual_seed(2))
    w = LossWeights(sparsity={src: 1.0}, kl=1.0)
    blocks = list(small_backbone.model.blocks)
    try:
        loss_a, grads_a, _, calls_a = step(small_backbone, saes, tokens, w, False, blocks)
        loss_b, grads_b, _, calls_b = step(small_backbone, saes, tokens, w, True, blocks)
    finally:
        small_backbone.release_hooks()
    assert [b - a for a, b in zip(calls_a, calls_b, strict=True)] == [0, 0, 1], (calls_a, calls_b)
    assert loss_a == pytest.approx(loss_b, rel=1e-7)
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-6, atol=1e-6)


def test_checkpointing_with_nothing_after_the_saes_is_refused():
    raw = {"saes": {"positions": ["blocks.1.hook_resid_pre"]}, "loss": {"preset": "local"},
           "train": {"activation_checkpointing": True}}  # fmt: skip
    with pytest.raises(E2EDictError, match="activation_checkpointing: no loss term reads past the SAEs"):
        config_from_dict(raw)


def test_a_run_with_checkpointing_trains_the_same_saes(tmp_path, small_gpt2_dir):
    from conftest import ROOT
    from safetensors.torch import load_file

    from e2edict.config import load_config
    from e2edict.trainer import train

    over = [f"model.name={small_gpt2_dir}", "data.n_ctx=32", "saes.positions=[blocks.1.hook_resid_pre]", "train.tokens=2048",
            "train.batch_size=8", "train.warmup_tokens=0", "eval.tokens=512", "eval.alive_tokens=512"]  # fmt: skip
    runs = {}
    for flag in ("false", "true"):
        cfg = load_config(ROOT / "configs/tiny/e2e.yaml", [*over, f"train.activation_checkpointing={flag}"])
        run = train(cfg, out=tmp_path / flag, progress=False)
        runs[flag] = load_file(run / "saes/blocks.1.hook_resid_pre/sae_weights.safetensors")
    for k, v in runs["false"].items():
        torch.testing.assert_close(runs["true"][k], v, rtol=1e-5, atol=1e-6)
