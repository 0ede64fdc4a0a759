"""Hooks inside blocks (an MLP's output; a transcoder's input and output) kept registered by
`Backbone.keep_hooks`, so the runs call the blocks in turn there too (a compiled step is one graph,
`test_compile.py`): the losses and gradients of hooks registered per run, no effect between runs,
a local run that stops after their block, and nothing left after `release_hooks`."""

from __future__ import annotations

import pytest
import torch

from e2edict.saes import Writes, registry
from e2edict.splice import LossWeights, hooked_positions, training_forward

PRESETS = {"e2e": dict(kl=1.0), "e2e+ds": dict(kl=0.5, downstream=2.5), "local": dict(local=1.0)}
CASES = [  # (backend, kind, position): an SAE at an MLP's output, a transcoder over an MLP
    ("transformer_lens", "sae", "blocks.1.hook_mlp_out"),
    ("transformer_lens", "transcoder", "blocks.1.mlp"),
    ("huggingface", "sae", "transformer.h.1.mlp"),
    ("huggingface", "transcoder", "transformer.h.1.mlp"),
]


@pytest.fixture(scope="module")
def bbs(small_gpt2_dir):
    """Backbones of their own: the hooks these tests keep stay off the shared ones."""
    from e2edict.backbones import TLBackbone, load_hooked_transformer
    from e2edict.run import open_backbone

    hf = open_backbone(str(small_gpt2_dir), backend="huggingface")
    assert hf.plain
    return {"transformer_lens": TLBackbone(load_hooked_transformer(str(small_gpt2_dir)), "small"), "huggingface": hf}


def make_saes(bb, kind: str, position: str) -> dict:
    torch.manual_seed(0)
    if kind == "sae":
        return {position: registry["relu"](32, 128, position)}
    src, dst = bb.mlp_pairs()[position]
    return {src: registry["relu"](32, 128, src, writes=Writes(32, dst))}


def loss_weights(bb, saes: dict, preset: str) -> LossWeights:
    last = max((s.hook_name_out or h for h, s in saes.items()), key=bb.block_order)
    ds = bb.resid_hooks_after(last) if preset == "e2e+ds" else []
    return LossWeights(sparsity=dict.fromkeys(saes, 1.0), downstream_positions=ds, **PRESETS[preset])


def loss_and_grads(bb, saes: dict, w: LossWeights, tokens: torch.Tensor):
    out = training_forward(bb, saes, tokens, w)
    params = [p for s in saes.values() for p in s.parameters()]
    return out.loss.detach(), torch.autograd.grad(out.loss, params)


def no_per_run_hooks(bb, monkeypatch) -> None:
    """Make the path that registers hooks per run fail, so a pass proves the kept path ran."""

    def registered(*args, **kwargs):
        raise AssertionError("hooks registered per run")

    from e2edict.backbones import HFBackbone

    if isinstance(bb, HFBackbone):  # Hugging Face: the model's own forward
        monkeypatch.setattr(bb, "_run_from", registered)
    else:  # TransformerLens: its hook context
        monkeypatch.setattr(bb.model, "hooks", registered)


@pytest.mark.parametrize(("backend", "kind", "position"), CASES)
@pytest.mark.parametrize("preset", list(PRESETS))
def test_kept_hooks_give_the_losses_and_gradients_of_hooks_registered_per_run(bbs, monkeypatch, backend, kind, position, preset):
    bb = bbs[backend]
    saes = make_saes(bb, kind, position)
    w = loss_weights(bb, saes, preset)
    tokens = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(3))
    want_loss, want_grads = loss_and_grads(bb, saes, w, tokens)
    bb.keep_hooks(hooked_positions(saes, w))
    try:
        with monkeypatch.context() as m:
            no_per_run_hooks(bb, m)
            loss, grads = loss_and_grads(bb, saes, w, tokens)
    finally:
        bb.release_hooks()
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-7)
    for g, want in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-7)


def _point(bb, name: str) -> torch.nn.Module:
    return bb.model.hook_dict[name] if hasattr(bb.model, "hook_dict") else bb._module(name)[0]


@pytest.mark.parametrize(("backend", "position", "last_block"), [
    ("transformer_lens", "blocks.0.hook_mlp_out", "blocks.2"), ("huggingface", "transformer.h.0.mlp", "transformer.h.2"),
])  # fmt: skip
def test_kept_hooks_do_nothing_between_runs_and_a_local_run_stops_after_their_block(bbs, backend, position, last_block):
    bb = bbs[backend]
    tokens = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(4))

    def logits():
        with torch.no_grad():
            out = bb.model(tokens)
            return out if torch.is_tensor(out) else out.logits

    before = logits()
    bb.keep_hooks([position])
    try:
        assert len(_point(bb, position)._forward_hooks) == 1
        torch.testing.assert_close(logits(), before, rtol=0, atol=0)  # an empty slot changes nothing
        calls, seen = [], []
        handle = bb.model.get_submodule(last_block).register_forward_hook(lambda *a: calls.append(1))
        try:
            with torch.no_grad():
                bb.run_from(bb.embed_to(tokens, 0), 0, {position: seen.append}, logits=False)
            assert len(seen) == 1 and seen[0].shape == (2, 16, 32) and not calls  # stopped after block 0
            assert bb._kept.active == {}
            bb.run_from(bb.embed_to(tokens, 0), 0, {position: seen.append}, logits=False, hidden=True)
            assert len(seen) == 2 and len(calls) == 1  # with hidden states the run goes on to the end
        finally:
            handle.remove()
    finally:
        bb.release_hooks()
    assert len(_point(bb, position)._forward_hooks) == 0
    torch.testing.assert_close(logits(), before, rtol=0, atol=0)


@pytest.mark.parametrize(("backend", "kind", "position"), CASES)
@pytest.mark.parametrize("preset", ["e2e", "local"])
def test_a_step_with_kept_hooks_reads_nothing_back(small_gpt2_dir, monkeypatch, backend, kind, position, preset):
    """The forward and backward on the meta device, where any read of a value to the host raises
    (as `test_speed_paths.test_step_reads_nothing_back_from_the_device` at residual positions)."""
    from e2edict.run import open_backbone

    bb = open_backbone(str(small_gpt2_dir), backend=backend)
    saes = {h: s.to("meta") for h, s in make_saes(bb, kind, position).items()}
    w = loss_weights(bb, saes, preset)
    bb.keep_hooks(hooked_positions(saes, w))
    bb.model.to("meta")
    no_per_run_hooks(bb, monkeypatch)
    out = training_forward(bb, saes, torch.zeros(2, 16, dtype=torch.long, device="meta"), w)
    out.loss.backward()
    sae = next(iter(saes.values()))
    assert sae.W_dec.grad is not None and sae.W_dec.grad.device.type == "meta"
