"""The Hugging Face backbone: hook names by module path, the shared prefix, and agreement with the
TransformerLens backbone (an independent implementation of the same model) on losses, gradients
and the metrics of a trained run."""

import json

import numpy as np
import pytest
import torch
from conftest import ROOT
from support import run_cli

from e2edict.backbones import HFBackbone, TLBackbone, load_hf_causal_lm
from e2edict.errors import E2EDictError
from e2edict.saes.relu import ReLUSAE
from e2edict.splice import LossWeights, training_forward


@pytest.fixture(scope="module")
def hf_tiny():
    model, tok = load_hf_causal_lm("tiny")
    return HFBackbone(model, tok, "tiny")


@pytest.fixture(scope="module")
def tl_tiny(tiny_model):
    return TLBackbone(tiny_model, "tiny")


def _tokens(n=3, t=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 4096, (n, t), generator=g)
    x[:, 0] = 0
    return x


def test_hook_names_and_widths(hf_tiny):
    shapes = hf_tiny.hook_shapes()
    assert hf_tiny.blocks_path == "transformer.h" and hf_tiny.n_layers == 4
    assert shapes["transformer.h.2:input"] == (128,) and shapes["transformer.h.3"] == (128,)
    assert shapes["transformer.h.1.mlp.act"] == (512,) and shapes["transformer.h.0.attn.c_attn"] == (384,)
    assert "transformer.ln_f" in shapes and "lm_head" not in shapes and "transformer.wte" not in shapes
    names = list(shapes)  # forward order
    assert names.index("transformer.h.1") < names.index("transformer.h.2:input") < names.index("transformer.h.2.ln_1")
    assert hf_tiny.resid_hooks_after("transformer.h.1:input") == [
        "transformer.h.2:input",
        "transformer.h.3:input",
        "transformer.h.3",
    ]
    assert hf_tiny.resid_hooks_after("transformer.h.1") == ["transformer.h.3:input", "transformer.h.3"]
    with pytest.raises(E2EDictError, match="not inside a transformer block"):
        hf_tiny.block_of("transformer.ln_f")
    with pytest.raises(E2EDictError, match="unknown hook"):
        hf_tiny.check_hooks(["transformer.h.9:input"])


def test_activations_and_logits_equal_transformer_lens(hf_tiny, tl_tiny):
    x = _tokens()
    pairs = {
        "transformer.h.2:input": "blocks.2.hook_resid_pre",
        "transformer.h.2": "blocks.2.hook_resid_post",
        "transformer.h.2.mlp": "blocks.2.hook_mlp_out",
        "transformer.h.2.mlp.act": "blocks.2.mlp.hook_post",
    }
    got_hf, got_tl = {}, {}

    def keep(store, name):
        def fn(act):
            store[name] = act

        return fn

    assert hf_tiny.shared_prefix
    with torch.no_grad():
        lh = hf_tiny.run_from(hf_tiny.embed_to(x, 1), 1, {h: keep(got_hf, h) for h in pairs})
        lt = tl_tiny.run_from(tl_tiny.embed_to(x, 1), 1, {t: keep(got_tl, h) for h, t in pairs.items()})
        full = hf_tiny.model(input_ids=x).logits
    torch.testing.assert_close(lh, full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lh, lt, atol=1e-4, rtol=1e-4)
    for h in pairs:
        torch.testing.assert_close(got_hf[h], got_tl[h], atol=1e-4, rtol=1e-4)


def _loss_and_grads(bb, sae, x, w) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = training_forward(bb, {sae.hook_name: sae}, x, w)
    out.loss.backward()
    return out.loss.detach(), {n: q.grad.clone() for n, q in sae.named_parameters()}


def _assert_same(a, b, atol: float, rtol_loss: float, rtol_grad: float) -> None:
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=rtol_loss)
    for n in a[1]:
        torch.testing.assert_close(a[1][n], b[1][n], atol=atol, rtol=rtol_grad)


@pytest.mark.parametrize("preset", ["local", "e2e", "e2e+ds"])
def test_splice_losses_and_gradients_equal_transformer_lens(hf_tiny, tl_tiny, preset):
    from e2edict.presets import PRESETS

    x = _tokens(seed=1)
    torch.manual_seed(0)
    sae_hf = ReLUSAE(128, 256, hook_name="transformer.h.1:input")
    sae_tl = ReLUSAE(128, 256, hook_name="blocks.1.hook_resid_pre")
    sae_tl.load_state_dict(sae_hf.state_dict())
    p = PRESETS[preset]
    results = []
    for bb, sae, hook in ((hf_tiny, sae_hf, "transformer.h.1:input"), (tl_tiny, sae_tl, "blocks.1.hook_resid_pre")):
        ds = bb.resid_hooks_after(hook) if p.downstream else []
        w = LossWeights(sparsity={hook: 0.5}, local=p.local, kl=p.kl, downstream=p.downstream, downstream_positions=ds)
        results.append(_loss_and_grads(bb, sae, x, w))
    _assert_same(*results, atol=1e-5, rtol_loss=1e-4, rtol_grad=1e-3)


@pytest.mark.parametrize("preset", ["local", "e2e", "e2e+ds"])
def test_block_output_hook_runs_its_block_once(hf_tiny, monkeypatch, preset):
    """A hook at a block's output fires at the next block's input, so the shared prefix runs that
    block once, not the clean and the spliced run each: the same loss and gradients as with the
    hook at the block itself (the path TransformerLens agreement was shown on), one call of the block."""
    from e2edict.presets import PRESETS

    hook = "transformer.h.1"
    assert (hf_tiny.block_of(hook), hf_tiny.start_block(hook)) == (1, 2)
    assert hf_tiny.start_block("transformer.h.3") == 3  # the last block's output feeds the final norm
    assert hf_tiny.start_block("transformer.h.1:input") == 1 and hf_tiny.start_block("transformer.h.1.mlp") == 1
    x = _tokens(seed=3)
    p = PRESETS[preset]
    ds = hf_tiny.resid_hooks_after(hook) if p.downstream else []
    w = LossWeights(sparsity={hook: 0.5}, local=p.local, kl=p.kl, downstream=p.downstream, downstream_positions=ds)
    calls = []
    handle = hf_tiny.blocks[1].register_forward_hook(lambda m, a, o: calls.append(1))
    results = []
    try:
        for alias in (True, False):
            monkeypatch.setattr(hf_tiny, "_outputs_feed_next", alias)
            torch.manual_seed(0)
            sae = ReLUSAE(128, 256, hook_name=hook)
            calls.clear()
            out = training_forward(hf_tiny, {hook: sae}, x, w)
            out.loss.backward()
            results.append((out.loss.detach(), {n: q.grad.clone() for n, q in sae.named_parameters()}, len(calls)))
    finally:
        handle.remove()
    (loss_a, grads_a, calls_a), (loss_b, grads_b, calls_b) = results
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=1e-6)
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], atol=1e-6, rtol=1e-5)
    assert calls_a == 1 and calls_b == (1 if preset == "local" else 2)


def test_a_moved_output_hook_runs_before_the_next_inputs_own(hf_tiny, tl_tiny, monkeypatch):
    """Block 1's output hook and block 2's input hook sit on the same tensor once the first is
    moved (`Backbone.at_block_inputs`); whatever the order of the dict, the output's hook runs first
    and the input's sees its replacement, as when it ran at block 1 itself."""
    x = _tokens(seed=4)

    def run(bb, out_hook, in_hook, first_is_input):
        seen = {}

        def double(act):
            return act * 2.0

        def keep(act):
            seen["in"] = act

        hooks = {in_hook: keep, out_hook: double} if first_is_input else {out_hook: double, in_hook: keep}
        with torch.no_grad():
            logits = bb.run_from(bb.embed_to(x, 1), 1, hooks)
        return seen["in"], logits

    for bb, out_hook, in_hook in ((hf_tiny, "transformer.h.1", "transformer.h.2:input"),
                                  (tl_tiny, "blocks.1.hook_resid_post", "blocks.2.hook_resid_pre")):  # fmt: skip
        assert bb.start_block(out_hook) == 2
        ref_logits = None
        with torch.no_grad():
            plain = bb.run_from(bb.embed_to(x, 2), 2, {})
        for first_is_input in (True, False):
            got_in, logits = run(bb, out_hook, in_hook, first_is_input)
            torch.testing.assert_close(got_in, 2.0 * bb.embed_to(x, 2), atol=1e-5, rtol=1e-5)
            assert not torch.allclose(logits, plain, atol=1e-3)
            if ref_logits is not None:
                torch.testing.assert_close(logits, ref_logits, atol=1e-6, rtol=1e-6)
            ref_logits = logits
    monkeypatch.setattr(hf_tiny, "_outputs_feed_next", False)  # at block 1 itself: the same
    got_in, logits = run(hf_tiny, "transformer.h.1", "transformer.h.2:input", True)
    torch.testing.assert_close(got_in, 2.0 * hf_tiny.embed_to(x, 2), atol=1e-5, rtol=1e-5)


def test_block_output_stays_at_the_block_when_something_runs_between_blocks():
    """A model that changes the residual stream between blocks (here a pre-hook on block 1) keeps
    block outputs at their block: block 0's output is not block 1's input there."""
    model, tok = load_hf_causal_lm("tiny")
    model.transformer.h[1].register_forward_pre_hook(lambda m, args: (args[0] * 2.0, *args[1:]) if args else None)
    bb = HFBackbone(model, tok, "tiny")
    assert not bb._outputs_feed_next and bb.start_block("transformer.h.0") == 0
    assert not bb.plain  # calling the blocks in turn would miss what runs between them


def test_without_block_removal_the_numbers_are_the_same(hf_tiny):
    """Where a model does not allow removing blocks the prefix runs again: same logits."""
    x = _tokens(seed=2)

    def halve(act):
        return act * 0.5

    with torch.no_grad():
        resid = hf_tiny.embed_to(x, 2)
        a = hf_tiny._run_from(resid, 2, {"transformer.h.2.mlp": halve}, True, remove=True)
        b = hf_tiny._run_from(resid, 2, {"transformer.h.2.mlp": halve}, True, remove=False)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert len(hf_tiny.blocks) == 4 and hf_tiny.model.transformer.h is hf_tiny.blocks  # restored


@pytest.fixture(scope="module")
def small_llama_dir(tmp_path_factory):
    """A random 3-layer Llama (rotary positions, RMSNorm, gated MLP), built from a config in code."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    cfg = LlamaConfig(
        vocab_size=4096,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    path = tmp_path_factory.mktemp("small_llama")
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


def _family(kind: str):
    """A random 3-layer causal LM of each kind whose blocks take different arguments: GPT-2
    (learned positions), Llama (rotary embeddings passed to every block), Gemma 2 (a sliding-window
    mask on every other block, logit soft-capping)."""
    from conftest import random_gpt2
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    common = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0)  # fmt: skip
    if kind == "gpt2":
        return random_gpt2(7, vocab_size=512, n_positions=64, n_embd=32, n_layer=3, n_head=4), "transformer.h"
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval(), "model.layers"
    cfg = Gemma2Config(**common, head_dim=8, sliding_window=4, attn_implementation="eager")
    return Gemma2ForCausalLM(cfg).eval(), "model.layers"


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gemma2"])
@pytest.mark.parametrize("preset", ["local", "e2e", "e2e+ds"])
@pytest.mark.parametrize("where", ["input", "output"])
def test_blocks_called_in_turn_equal_the_models_own_forward(kind, preset, where, monkeypatch):
    """Residual-stream hooks run the blocks one after the other with the arguments recorded from
    the model's forward (`HFBackbone._run_plain`); the loss and every gradient equal the hooked
    forward of the model itself, at two sequence lengths (each records its own arguments)."""
    from e2edict.presets import PRESETS

    model, blocks = _family(kind)
    bb = HFBackbone(model, None, kind)
    assert bb.plain
    # Gemma 2 gives each block its mask by its index in the list: removing one block swaps them
    assert bb.shared_prefix == (kind != "gemma2") == bb._check_block_removal(1) and bb._check_block_removal(2)
    hook = f"{blocks}.1" + (":input" if where == "input" else "")
    p = PRESETS[preset]
    ds = bb.resid_hooks_after(hook) if p.downstream else []
    w = LossWeights(sparsity={hook: 0.5}, local=p.local, kl=p.kl, downstream=p.downstream, downstream_positions=ds)
    for t in (12, 7):
        x = torch.randint(1, 512, (3, t), generator=torch.Generator().manual_seed(t))
        results = []
        for plain in (True, False):
            monkeypatch.setattr(bb, "plain", plain)
            torch.manual_seed(0)
            results.append(_loss_and_grads(bb, ReLUSAE(32, 64, hook_name=hook), x, w))
        _assert_same(*results, atol=1e-6, rtol_loss=1e-5, rtol_grad=1e-4)
    assert bb._blocks_in_turn.lengths() >= {12, 7}


def test_the_hooked_forward_from_a_block_not_yet_checked_gives_the_final_hidden_states():
    """The hooked forward (an MLP hook) from a block whose removal check has not run yet: the check
    runs first, outside the run's own hooks, and the run gives the model's final hidden states."""
    model, tok = load_hf_causal_lm("tiny")
    bb = HFBackbone(model, tok, "tiny")
    assert 1 not in bb._removable
    x = _tokens(seed=8)
    got = []
    handle = model.lm_head.register_forward_pre_hook(lambda m, a: got.append(a[0]))
    try:
        with torch.no_grad():
            model(input_ids=x)
    finally:
        handle.remove()
    with torch.no_grad():
        hidden = bb.run_from(bb.embed_to(x, 1), 1, {"transformer.h.1.mlp": lambda a: None}, hidden=True)
    assert bb._removable[1] and not model.lm_head._forward_pre_hooks
    torch.testing.assert_close(hidden, got[0], atol=1e-5, rtol=1e-5)


def test_no_block_is_called_through_a_registered_hook_when_called_in_turn(hf_tiny, monkeypatch):
    """The spliced run of residual-stream hooks registers nothing on the model and does not enter
    the model's own forward (its mask building, the packed-sequence check): only the blocks run."""
    entered, registered = [], []
    handle = hf_tiny.model.transformer.register_forward_pre_hook(lambda m, a, k: entered.append(1), with_kwargs=True)
    x = _tokens(seed=6)
    try:
        resid = hf_tiny.embed_to(x, 1)  # the prefix is the model's forward, stopped at block 1
        entered.clear()
        for name in ("register_forward_hook", "register_forward_pre_hook"):
            real = getattr(torch.nn.Module, name)
            monkeypatch.setattr(torch.nn.Module, name, lambda *a, _real=real, **k: registered.append(1) or _real(*a, **k))
        with torch.no_grad():
            hidden = hf_tiny.run_from(resid, 1, {"transformer.h.2:input": lambda a: a}, hidden=True)
        monkeypatch.undo()
    finally:
        handle.remove()
    assert entered == [] and registered == []
    got = []
    h2 = hf_tiny.model.lm_head.register_forward_pre_hook(lambda m, a: got.append(a[0]))
    try:
        with torch.no_grad():
            hf_tiny.model(input_ids=x)
    finally:
        h2.remove()
    torch.testing.assert_close(hidden, got[0], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_llama_shared_prefix_and_e2e_training(small_llama_dir, tmp_path):
    model, tok = load_hf_causal_lm(str(small_llama_dir))
    bb = HFBackbone(model, tok, "llama")
    assert bb.blocks_path == "model.layers" and bb.shared_prefix and tok is None
    shapes = bb.hook_shapes()
    assert shapes["model.layers.1:input"] == (32,) and shapes["model.layers.1.mlp.down_proj:input"] == (64,)
    x = _tokens(2, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(bb.run_from(bb.embed_to(x, 2), 2, {}), model(input_ids=x).logits, atol=1e-5, rtol=1e-5)
    # The CLI trains e2e+ds at the input of layer 1 from token data (this model has no tokenizer).
    rng = np.random.default_rng(0)
    np.save(tmp_path / "train.npy", rng.integers(1, 4096, 40_000).astype(np.int32))
    np.save(tmp_path / "val.npy", rng.integers(1, 4096, 4_000).astype(np.int32))
    out = tmp_path / "run"
    r = run_cli(
        "train",
        ROOT / "configs/tiny/e2e-ds.yaml",
        "--out",
        out,
        "--quiet",
        f"model.name={small_llama_dir}",
        "model.backend=huggingface",
        "saes.positions=[model.layers.1:input]",
        f"data.train={tmp_path / 'train.npy'}",
        f"data.eval={tmp_path / 'val.npy'}",
        "data.n_ctx=32",
        "train.tokens=4096",
        "train.batch_size=8",
        "eval.tokens=1024",
        "eval.alive_tokens=1024",
    )
    assert r.returncode == 0, r.stderr
    ev = json.loads((out / "eval.json").read_text())
    sae = ev["saes"]["model.layers.1:input"]
    assert sae["d_sae"] == 256 and set(sae["downstream_explained_variance"]) == {"model.layers.2:input", "model.layers.2"}


@pytest.mark.slow
def test_cli_metrics_equal_transformer_lens(tmp_path):
    """The same config trained through both backends on the embedded model gives the same metrics."""
    common = [
        "--quiet",
        "train.tokens=8192",
        "train.batch_size=8",
        "train.warmup_tokens=0",
        "eval.tokens=4096",
        "eval.alive_tokens=4096",
    ]
    runs = {}
    for backend, hook in (("transformer_lens", "blocks.2.hook_resid_pre"), ("huggingface", "transformer.h.2:input")):
        out = tmp_path / backend
        r = run_cli(
            "train",
            ROOT / "configs/tiny/e2e-ds.yaml",
            "--out",
            out,
            f"model.backend={backend}",
            f"saes.positions=[{hook}]",
            *common,
        )
        assert r.returncode == 0, r.stderr
        ev = json.loads((out / "eval.json").read_text())
        runs[backend] = (ev, ev["saes"][hook])
    (a, sa), (b, sb) = runs["transformer_lens"], runs["huggingface"]
    for key in ("ce_loss_clean", "ce_loss_spliced", "ce_loss_increase", "kl"):
        assert a[key] == pytest.approx(b[key], rel=2e-3, abs=2e-4), key
    for key in ("l0", "explained_variance", "mse", "ce_loss_score", "norm_ratio_pos_gt0"):
        assert sa[key] == pytest.approx(sb[key], rel=2e-3, abs=2e-4), key
    assert sa["alive"] == sb["alive"]
    ev_a = list(sa["downstream_explained_variance"].values())
    ev_b = list(sb["downstream_explained_variance"].values())
    assert ev_a == pytest.approx(ev_b, rel=2e-3, abs=2e-4)


@pytest.mark.slow
def test_hooks_command_lists_both_backends():
    r = run_cli("hooks", "tiny", "--backend", "huggingface")
    assert r.returncode == 0, r.stderr
    lines = dict(line.split("\t") for line in r.stdout.strip().splitlines())
    assert lines["transformer.h.2:input"] == "128" and lines["transformer.h.3.mlp.c_fc"] == "512"
    r = run_cli("hooks", "tiny")
    lines = dict(line.split("\t") for line in r.stdout.strip().splitlines())
    assert lines["blocks.2.hook_resid_pre"] == "128"
    r = run_cli("hooks", "/no/such/model", "--backend", "huggingface")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("e2edict: error: cannot load")


def test_trust_remote_code_is_off_by_default(small_gpt2_dir, monkeypatch):
    import transformers

    seen = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*a, **k):
        seen.update(k)
        return real(*a, **k)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    load_hf_causal_lm(str(small_gpt2_dir))
    assert seen["trust_remote_code"] is False


def test_load_model_and_evaluate_api_take_a_hf_model(hf_tiny):
    import e2edict

    model = e2edict.load_model("tiny", backend="huggingface")
    assert type(model).__name__ == "GPT2LMHeadModel"
    torch.manual_seed(0)
    sae = ReLUSAE(128, 256, hook_name="transformer.h.2:input")
    res = e2edict.evaluate(model, {"transformer.h.2:input": sae}, _tokens(4, 32), batch_size=2)
    assert res["tokens"] == 128 and res["saes"]["transformer.h.2:input"]["d_sae"] == 256


@pytest.mark.slow
def test_unknown_hf_position_is_one_line_error(tmp_path):
    r = run_cli(
        "train",
        ROOT / "configs/tiny/e2e.yaml",
        "--out",
        tmp_path / "bad",
        "model.backend=huggingface",
        "saes.positions=[transformer.h.7:input]",
    )
    assert r.returncode == 2 and "unknown hook name" in r.stderr and not (tmp_path / "bad").exists()
