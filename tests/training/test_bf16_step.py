"""The bf16 training step, checked on the CPU: the fused head's KL stays fp32 at small KL, no
fp32 activation of MLP or dictionary width is made, nothing is read back to the host (meta
device), no work is done twice (FLOP counts), and the model handed to users is TransformerLens's own."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from e2edict import losses
from e2edict.saes import registry
from e2edict.splice import LossWeights, training_forward


def _big_vocab_backbone():
    """A 2-layer GPT-2 with GPT-2's vocabulary (50,257) and a GPT-2-like logit spread (std ~4)."""
    from conftest import random_gpt2

    from e2edict.backbones import HFBackbone

    model = random_gpt2(0, vocab_size=50257, n_positions=64, n_embd=256, n_layer=2, n_head=4, tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.25)  # logits ~ N(0, 4^2) over the vocabulary
    for p in model.parameters():
        p.requires_grad_(False)
    return HFBackbone(model, None, "gpt2-vocab")


def _kl64(h_c, h_s, W):
    lc, ls = F.log_softmax(h_c @ W, -1), F.log_softmax(h_s @ W, -1)
    return (lc.exp() * (lc - ls)).sum(-1).mean()


def test_bf16_head_kl_and_gradient_equal_fp32_at_small_kl():
    """With the model held in bf16, the fused head's KL near 1e-3 is within 1% of the float64 KL of
    the same hidden states, and its gradient points the same way (cosine >= 0.995): the head keeps
    the fp32 unembedding and the final norm's output is not rounded to bf16."""
    bb = _big_vocab_backbone()
    W = bb.unembed().detach().double().clone()
    tokens = torch.randint(0, 50257, (2, 48), generator=torch.Generator().manual_seed(1))
    resid = bb.embed_to(tokens, 1)
    bb.cast(torch.bfloat16)
    try:
        assert bb.head().W.dtype == torch.float32
        with torch.no_grad():
            h_c = bb.run_from(resid.bfloat16(), 1, {}, hidden=True)
        assert h_c.dtype == torch.float32  # the final norm ran in fp32
        assert (h_c.double() @ W).std() > 3  # GPT-2-like logit spread
        noise = torch.randn(h_c.shape, generator=torch.Generator().manual_seed(2))
        probe = _kl64(h_c.double(), (h_c + 0.01 * noise).double(), W).item()
        h_s = (h_c + 0.01 * (1e-3 / probe) ** 0.5 * noise).requires_grad_()
        ours = losses.head_kl_loss(bb.head(), h_c, h_s)
        (g_ours,) = torch.autograd.grad(ours, h_s)
        h_s64 = h_s.detach().double().requires_grad_()
        ref = _kl64(h_c.double(), h_s64, W)
        (g_ref,) = torch.autograd.grad(ref, h_s64)
    finally:
        bb.restore_dtype()
    assert 5e-4 < ref.item() < 2e-3
    assert ours.dtype == torch.float32
    assert ours.item() == pytest.approx(ref.item(), rel=0.01)
    assert F.cosine_similarity(g_ours.double().flatten(), g_ref.flatten(), dim=0) >= 0.995


@pytest.mark.parametrize("backend", ["transformer_lens", "huggingface"])
def test_bf16_final_hidden_states_are_fp32_and_close_to_the_fp32_model(small_gpt2_dir, backend):
    from e2edict.run import open_backbone

    bb = open_backbone(str(small_gpt2_dir), backend=backend)
    tokens = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))
    resid = bb.embed_to(tokens, 1)
    with torch.no_grad():
        ref = bb.run_from(resid, 1, {}, hidden=True)
        bb.cast(torch.bfloat16)
        got = bb.run_from(resid.bfloat16(), 1, {}, hidden=True)
    bb.restore_dtype()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=0.1, rtol=0.05)


class _DtypeTrace(TorchDispatchMode):
    """Every op's floating-point outputs: (op, dtype, shape)."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, torch.dtype, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            materialized = isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() >= t.numel() * t.element_size()
            if materialized and t.is_floating_point():  # a broadcast view (expand) holds no memory
                self.seen.append((str(func), t.dtype, tuple(t.shape)))
        return out


SAE_KW = {"topk": {"k": 8}, "batchtopk": {"k": 8}, "jumprelu": {"init_threshold": 0.05}}


@pytest.mark.parametrize("backend", ["transformer_lens", "huggingface"])
@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu", "gated"])
@pytest.mark.parametrize("preset", ["e2e", "e2e+ds", "local"])
def test_bf16_step_makes_no_fp32_tensor_of_mlp_or_dictionary_width(small_gpt2_dir, backend, arch, preset):
    """Forward and backward of a step on the bf16-held model: no fp32 [tokens, d_mlp] or
    [tokens, d_sae] tensor (the model's MLP and the SAE's codes stay bf16; the weights' fp32
    gradients have other shapes), and the loss and the SAE's gradients are fp32."""
    from e2edict.run import open_backbone

    bb = open_backbone(str(small_gpt2_dir), backend=backend)
    h = "blocks.1.hook_resid_pre" if backend == "transformer_lens" else "transformer.h.1:input"
    d_sae, d_mlp, n_tok = 224, 128, 3 * 16
    torch.manual_seed(0)
    sae = registry[arch](32, d_sae, h, **SAE_KW.get(arch, {}))
    ds = bb.resid_hooks_after(h) if preset == "e2e+ds" else []
    coeffs = {"e2e": dict(kl=1.0), "e2e+ds": dict(kl=0.5, downstream=2.5), "local": dict(local=1.0)}[preset]
    w = LossWeights(sparsity={h: 1.0}, downstream_positions=ds, **coeffs)
    tokens = torch.randint(0, 4096, (3, 16), generator=torch.Generator().manual_seed(1))
    bb.cast(torch.bfloat16)
    try:
        trace = _DtypeTrace()
        with trace:
            out = training_forward(bb, {h: sae}, tokens, w)
            out.loss.backward()
    finally:
        bb.restore_dtype()

    def is_wide(dt, shape):
        return dt == torch.float32 and shape and shape[-1] in (d_mlp, d_sae) and torch.Size(shape).numel() == n_tok * shape[-1]

    wide = [(op, shape) for op, dt, shape in trace.seen if is_wide(dt, shape)]
    assert not wide, wide[:5]
    assert any(dt == torch.bfloat16 and shape[-1] == d_sae for _, dt, shape in trace.seen if shape)  # codes in bf16
    assert out.loss.dtype == torch.float32
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in sae.parameters())
    assert sae.W_dec.grad is not None and torch.isfinite(sae.W_dec.grad).all()


def _meta_step(bb, sae, h, w):
    out = training_forward(bb, {h: sae}, torch.zeros(2, 16, dtype=torch.long, device="meta"), w)
    out.loss.backward()
    return out


@pytest.mark.parametrize("variant", ["matryoshka-drawn", "topk-auxk", "batchtopk-auxk"])
@pytest.mark.parametrize("preset", ["e2e", "local"])
def test_step_reads_nothing_back_with_matryoshka_drawn_and_auxk(small_gpt2_dir, variant, preset):
    """On the meta device any read back to the host raises: the Matryoshka draw and AuxK's dead
    latents stay on the device."""
    from e2edict.run import open_backbone

    bb = open_backbone(str(small_gpt2_dir), backend="transformer_lens")
    bb.hook_shapes()
    bb.model.to("meta")
    h = "blocks.1.hook_resid_pre"
    if variant == "matryoshka-drawn":
        sae = registry["matryoshka_batchtopk"](32, 256, h, k=4, prefixes=[32, 128, 256])
    else:
        sae = registry[variant.split("-")[0]](32, 256, h, k=4, auxk_coeff=1 / 32, dead_tokens=1)
    sae = sae.to("meta")
    coeffs = dict(kl=1.0) if preset == "e2e" else dict(local=1.0)
    w = LossWeights(sparsity={h: 1.0}, **coeffs)
    out = _meta_step(bb, sae, h, w)
    assert sae.W_dec.grad is not None and sae.W_dec.grad.device.type == "meta"
    if variant != "matryoshka-drawn" and preset == "local":
        assert f"aux/{h}" in out.terms


def test_auxk_without_reading_back_equals_the_hand_computation():
    """AuxK on static shapes: the top auxk_k pre-activations among dead latents (live ones at
    -inf) reconstruct the error; zero when no latent is dead."""
    torch.manual_seed(0)
    sae = registry["topk"](8, 40, "h", k=2, auxk_coeff=0.5, auxk_k=6, dead_tokens=5)
    x = torch.randn(7, 8)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[[1, 4, 9, 30]] = True  # fewer dead latents than auxk_k
    sae.tokens_since_fired.copy_(torch.where(dead, 10, 0))
    x_hat = torch.randn(7, 8)
    got = sae.aux_loss(x, x_hat, None)
    with torch.no_grad():
        pre = x @ sae.W_enc + sae.b_enc
        sub = torch.relu(pre[:, dead])
        err_hat = sub @ sae.normalized_decoder()[dead]
        err = x - x_hat
        ref = 0.5 * (err_hat - err).pow(2).mean() / err.pow(2).mean()
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    sae.tokens_since_fired.zero_()
    assert sae.aux_loss(x, x_hat, None).item() == 0.0


def _flops(sae, x) -> tuple[int, int]:
    """FLOPs of the forward with its sparsity term, and of the backward, of one SAE call."""
    fwd, bwd = FlopCounterMode(display=False), FlopCounterMode(display=False)
    with fwd:
        x_hat, c = sae(x)
        loss = (x_hat - x).square().mean() + sae.sparsity_loss(x, c, 1.0)
    with bwd:
        loss.backward()
    return fwd.get_total_flops(), bwd.get_total_flops()


@pytest.mark.parametrize("arch", ["jumprelu", "gated"])
def test_jumprelu_and_gated_cost_what_relu_costs(arch):
    """One encoder GEMM per step (JumpReLU's L0 term and Gated's gate reuse the forward's
    pre-activations) and no zero gradient backpropagated through it."""
    torch.manual_seed(0)
    x = torch.randn(64, 32)
    relu = registry["relu"](32, 512, "h")
    relu.sparse_decode = False
    other = registry[arch](32, 512, "h")
    other.sparse_decode = False
    assert _flops(other, x) == _flops(relu, x)


def test_jumprelu_l0_term_reuses_the_forward_but_not_a_stale_one():
    torch.manual_seed(0)
    sae = registry["jumprelu"](8, 32, "h", init_threshold=0.05, bandwidth=0.1)
    x = torch.randn(5, 8)
    _, c = sae(x)
    l0 = sae.sparsity_loss(x, c, 1.0)
    with torch.no_grad():
        z = torch.relu(x @ sae.W_enc + sae.b_enc)
        assert l0.item() == pytest.approx(((z > sae.threshold).sum(-1).float().mean() / 8).item())
        sae.b_enc.add_(1.0)  # the next forward must not read the previous pre-activations
    _, c2 = sae(x)
    assert not torch.equal(c2, c)


def test_load_model_gives_transformer_lens_own_model_and_evaluate_hands_it_back():
    """`load_model` returns the HookedTransformer as TransformerLens made it (no attention forward
    replaced on the object), and `evaluate` leaves it that way."""
    import e2edict

    model = e2edict.load_model("tiny")
    assert all("forward" not in b.attn.__dict__ for b in model.blocks)
    d = model.cfg.d_model
    saes = {"blocks.1.hook_resid_pre": registry["relu"](d, 2 * d, "blocks.1.hook_resid_pre")}
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    result = e2edict.evaluate(model, saes, tokens, batch_size=2, alive_tokens=32)
    assert math.isfinite(result["ce_loss_increase"]) and result["tokens"] == 2 * 16
    assert all("forward" not in b.attn.__dict__ for b in model.blocks)
