"""The speed code paths (GPU-oriented, run on the CPU) against independent computations: the fused head KL,
SDPA attention for TransformerLens models, the model held in bf16, the step without host reads
(on the meta device, where any read back raises), and the on-device NaN/Inf guard."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from e2edict import losses
from e2edict.backbones.head import Head
from e2edict.losses import kl_loss
from e2edict.saes import registry
from e2edict.splice import LossWeights, evaluation_forward, training_forward
from e2edict.step import NonFinite, StepLog


def naive_kl(h_c, h_s, W, b, cap):
    def logits(h):
        raw = h @ W + (b if b is not None else 0)
        return cap * torch.tanh(raw / cap) if cap else raw

    lc, ls = F.log_softmax(logits(h_c), -1), F.log_softmax(logits(h_s), -1)
    return (lc.exp() * (lc - ls)).sum(-1).mean()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("cap", [0.0, 3.0])
@pytest.mark.parametrize("chunk", [None, 7])
def test_head_kl_equals_kl_of_full_logits(monkeypatch, bias, cap, chunk):
    """Value and gradient of the fused head KL (padded vocabulary, chunks, soft cap) against the KL
    of the full logits, in float64."""
    if chunk is not None:  # rows per chunk: 7 (uneven: 30 rows = 4 chunks of 7 and one of 2)
        monkeypatch.setattr(losses, "HEAD_CHUNK_ELEMENTS_CPU", chunk * 128)
    g = torch.Generator().manual_seed(0)
    d, vocab = 16, 100  # padded to 128
    W = torch.randn(d, vocab, generator=g, dtype=torch.float64)
    b = torch.randn(vocab, generator=g, dtype=torch.float64) if bias else None
    h_c = torch.randn(3, 10, d, generator=g, dtype=torch.float64)
    h_s = (h_c + 0.5 * torch.randn(3, 10, d, generator=g, dtype=torch.float64)).requires_grad_()
    head = Head.padded(W, b, cap)
    assert head.W.shape == (d, 128) and head.W.is_contiguous() and head.n_vocab == vocab
    ours = losses.head_kl_loss(head, h_c, h_s)
    (g_ours,) = torch.autograd.grad(3.0 * ours, h_s)
    ref = naive_kl(h_c, h_s, W, b, cap)
    (g_ref,) = torch.autograd.grad(3.0 * ref, h_s)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-9)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-6, atol=1e-9)
    # the padded columns carry no probability
    p = torch.softmax(head.logits(h_c.reshape(-1, d)), -1)
    assert p[:, vocab:].abs().max() == 0


def test_head_kl_equals_splice_kl_on_both_backbones(small_backbone, small_gpt2_dir):
    """Training (fused head) and evaluation (logits) give the same KL, and the HF backbone
    exposes a head only when it reproduces the model's logits."""
    from e2edict.run import open_backbone

    hf = open_backbone(str(small_gpt2_dir), backend="huggingface")
    for bb, h in ((small_backbone, "blocks.1.hook_resid_pre"), (hf, "transformer.h.1:input")):
        assert bb.head() is not None
        torch.manual_seed(0)
        sae = registry["relu"](32, 64, h)
        tokens = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(3))
        w = LossWeights(sparsity={h: 1.0}, kl=1.0)
        fused = training_forward(bb, {h: sae}, tokens, w)
        assert fused.logits_spliced is None
        full = evaluation_forward(bb, {h: sae}, tokens, [])  # the [tokens, vocab] logits, KL computed here
        assert fused.terms["kl"].item() == pytest.approx(kl_loss(full.logits_clean, full.logits_spliced).item(), rel=1e-5)


def test_fused_attention_matches_transformer_lens(tiny_model, monkeypatch):
    """SDPA attention gives TransformerLens's logits; hooking the pattern falls back to its forward."""
    from e2edict.backbones import tl_attention

    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(tl_attention.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    toks = torch.randint(0, tiny_model.cfg.d_vocab, (2, 40), generator=torch.Generator().manual_seed(0))
    tl_attention.use_unfused_attention(tiny_model)
    try:
        with torch.no_grad():
            ref = tiny_model(toks)
            assert tl_attention.use_fused_attention(tiny_model) == tiny_model.cfg.n_layers
            z_seen = []
            with tiny_model.hooks(fwd_hooks=[("blocks.1.attn.hook_z", lambda a, hook: z_seen.append(a.shape))]):
                got = tiny_model(toks)
            assert len(calls) == tiny_model.cfg.n_layers and z_seen  # fused, and hook_z still fires
            torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
            calls.clear()
            patterns = []
            with tiny_model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", lambda a, hook: patterns.append(a))]):
                hooked = tiny_model(toks)
            assert len(calls) == tiny_model.cfg.n_layers - 1 and patterns[0].shape[-1] == 40  # block 0 unfused
            torch.testing.assert_close(hooked, ref, atol=2e-5, rtol=1e-5)
    finally:
        tl_attention.use_fused_attention(tiny_model)


def test_fused_attention_rotary_model_matches():
    """A rotary (Pythia/Llama-style) model built in code: fused and unfused logits agree."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from e2edict.backbones import tl_attention

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=50, n_ctx=32, act_fn="gelu",
        positional_embedding_type="rotary", rotary_dim=8, normalization_type="LN",
    )  # fmt: skip
    model = HookedTransformer(cfg)
    toks = torch.randint(0, 50, (3, 20))
    with torch.no_grad():
        ref = model(toks)
        assert tl_attention.use_fused_attention(model) == 2
        torch.testing.assert_close(model(toks), ref, atol=2e-5, rtol=1e-5)
    unsupported = HookedTransformerConfig(**{**cfg.to_dict(), "attn_scores_soft_cap": 50.0})
    assert not tl_attention.supports_fused(unsupported)


@pytest.mark.parametrize("backend", ["transformer_lens", "huggingface"])
def test_cast_to_bf16_and_restore_exactly(small_gpt2_dir, backend):
    from e2edict.run import open_backbone

    bb = open_backbone(str(small_gpt2_dir), backend=backend)
    before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    bb.cast(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bb.model.parameters())
    assert bb.head().W.dtype == torch.float32  # the fused head keeps the fp32 unembedding (fp32 KL)
    h = next(n for n in bb.hook_shapes() if bb.block_of(n) == 1)
    sae = registry["relu"](32, 64, h)
    tokens = torch.randint(0, 4096, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = training_forward(bb, {h: sae}, tokens, LossWeights(sparsity={h: 1.0}, kl=1.0))
    out.loss.backward()  # fp32 master weights get fp32 gradients
    assert torch.isfinite(out.loss) and sae.W_dec.grad.dtype == torch.float32
    bb.restore_dtype()
    after = bb.model.state_dict()
    assert all(after[k].dtype == v.dtype and after[k].equal(v) for k, v in before.items())


@pytest.mark.parametrize("backend", ["transformer_lens", "huggingface"])
@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu"])
@pytest.mark.parametrize("preset", ["e2e", "e2e+ds", "local"])
def test_step_reads_nothing_back_from_the_device(small_gpt2_dir, backend, arch, preset):
    """The forward and backward of a step on the meta device: any read of a value to the host
    (``.item()``, ``bool()``, a data-dependent size) raises there. So on a GPU, where the automatic
    choices take the dense paths as they do on meta, the step queues without waiting. On the
    Hugging Face model this includes transformers' own packed-sequence check in the prefix's
    forward and in the one that records the blocks' arguments."""
    from e2edict.run import open_backbone

    bb = open_backbone(str(small_gpt2_dir), backend=backend)
    bb.hook_shapes()
    bb.model.to("meta")
    h = "blocks.1.hook_resid_pre" if backend == "transformer_lens" else "transformer.h.1:input"
    kw = {"k": 4} if "topk" in arch else {}
    sae = registry[arch](32, 256, h, **kw).to("meta")
    ds = bb.resid_hooks_after(h) if preset == "e2e+ds" else []
    coeffs = {"e2e": dict(kl=1.0), "e2e+ds": dict(kl=0.5, downstream=2.5), "local": dict(local=1.0)}[preset]
    w = LossWeights(sparsity={h: 1.0}, downstream_positions=ds, **coeffs)
    out = training_forward(bb, {h: sae}, torch.zeros(2, 16, dtype=torch.long, device="meta"), w)
    out.loss.backward()
    assert sae.W_dec.grad is not None and sae.W_dec.grad.device.type == "meta"


def test_batchtopk_threshold_on_device_matches_hand_computation():
    torch.manual_seed(0)
    sae = registry["batchtopk"](8, 32, "h", k=2, momentum=0.9)
    x1, x2 = torch.randn(5, 8), torch.randn(5, 8)

    def smallest_kept(x):
        z = torch.relu(sae.pre_activations(x)).flatten()
        vals = z.topk(2 * 5).values
        return vals[vals > 0].min()

    with torch.no_grad():
        m1 = smallest_kept(x1)
        sae(x1)
        assert sae.threshold.item() == pytest.approx(m1.item())
        m2 = smallest_kept(x2)
        sae(x2)
    assert sae.threshold.item() == pytest.approx(0.9 * m1.item() + 0.1 * m2.item(), rel=1e-6)
    assert sae.threshold_updates.item() == 2
    kept = sae.threshold.clone()
    with torch.no_grad():
        sae.b_enc.fill_(-1e6)  # every pre-activation negative: nothing positive is kept
        sae(x1)
    assert sae.threshold_updates.item() == 2 and sae.threshold.equal(kept)  # threshold and count unchanged


def test_step_log_names_first_bad_step_and_term():
    names = ["kl", "loss", "grad_norm", "grad_norm/h.W_dec", "grad_norm/h.b_dec", "weight_norm/h.W_dec"]
    log = StepLog()
    log.push(1, torch.tensor([1.0, 2.0, 3.0, 2.0, 1.0, 5.0]))
    log.push(2, torch.tensor([1.5, 2.5, 3.5, 2.0, 1.0, 5.0]))
    assert log.read(names) == {"kl": 1.5, "loss": 2.5, "grad_norm": 3.5}  # the newest step's values
    assert log.read(names) is None
    log.push(3, torch.tensor([1.0, 2.0, 3.0, 2.0, 1.0, 5.0]))
    log.push(4, torch.tensor([1.0, 2.0, float("inf"), 2.0, float("nan"), 5.0]))
    log.push(5, torch.tensor([float("nan")] * 6))
    with pytest.raises(NonFinite, match=r"gradient of h\.b_dec at step 4"):
        log.read(names)
    log.push(6, torch.tensor([1.0, 2.0, 3.0, 2.0, 1.0, float("nan")]))
    with pytest.raises(NonFinite, match="SAE weights after the optimizer step at step 6"):
        log.read(names)


def test_gradient_clipping_matches_torch(small_backbone):
    """The step's own clipping (per-parameter norms kept) equals clip_grad_norm_."""
    from e2edict.step import TrainStep

    torch.manual_seed(0)
    sae = registry["relu"](32, 64, "h")
    x = torch.randn(20, 32)
    sae(x)[0].square().sum().backward()
    ref = [p.grad.clone() for p in sae.parameters()]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in sae.parameters()]
    for t, g in zip(twins, ref, strict=True):
        t.grad = g.clone()
    norm_ref = torch.nn.utils.clip_grad_norm_(twins, 1.0)
    for p, g in zip(sae.parameters(), ref, strict=True):
        p.grad = g.clone()
    opt = torch.optim.Adam(sae.parameters())
    w = LossWeights(sparsity={"h": 1.0})
    step = TrainStep(small_backbone, {"h": sae}, {"h": sae}, w, opt, None, None, max_grad_norm=1.0)
    per_param, total = step.clip_gradients()
    torch.testing.assert_close(per_param, torch.stack([g.norm() for g in ref]))
    assert total.item() == pytest.approx(torch.linalg.vector_norm(torch.stack([g.norm() for g in ref])).item(), rel=1e-6)
    coef = min(1.0, 1.0 / (total.item() + 1e-6))
    for p, g, t in zip(sae.parameters(), ref, twins, strict=True):
        torch.testing.assert_close(p.grad, g * coef)
        torch.testing.assert_close(p.grad, t.grad)
    assert norm_ref.item() == pytest.approx(total.item(), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_block_norms_once_and_projects_qkv_in_one_gemm(small_backbone, dtype):
    """With the fused path in bf16 each block computes its first norm once (not three times) and
    q, k, v with one GEMM (fp32 keeps TransformerLens's three of each, bit for bit its own). Logits
    and an SAE's gradients equal TransformerLens's own forward's, and the q/k/v hooks still fire
    with TransformerLens's shapes."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from e2edict.backbones import tl_attention

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.gemms = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            gemm = func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm)
            self.gemms += gemm and out.shape[-1] == 3 * 32  # a q/k/v GEMM of all three: [tokens, 3 * d_model]
            return out

    model, h = small_backbone.model, "blocks.1.hook_resid_pre"
    tokens = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    sae = registry["relu"](32, 64, h)
    results = {}
    if dtype != torch.float32:
        small_backbone.cast(dtype)
    try:
        for fused in (False, True):
            (tl_attention.use_fused_attention if fused else tl_attention.use_unfused_attention)(model)
            norms, shapes, count = [], [], Count()
            hooks = [("blocks.2.ln1.hook_normalized", lambda a, hook, norms=norms: norms.append(1))]
            hooks += [(f"blocks.2.attn.hook_{n}", lambda a, hook, shapes=shapes: shapes.append(tuple(a.shape))) for n in "qkv"]
            with model.hooks(fwd_hooks=hooks), count:
                out = evaluation_forward(small_backbone, {h: sae}, tokens, [])  # logits: the loss written out here
                loss = sae.sparsity_loss(out.inputs[h], out.codes[h], 1.0) + kl_loss(out.logits_clean, out.logits_spliced)
                grads = torch.autograd.grad(loss, [sae.W_enc_T, sae.W_dec])
            results[fused] = (out.logits_spliced.detach().float(), grads, len(norms), shapes, count.gemms)
    finally:
        tl_attention.use_fused_attention(model)
        small_backbone.restore_dtype()
    (ref, g_ref, n_ref, s_ref, gemm_ref), (got, g_got, n_got, s_got, gemm_got) = results[False], results[True]
    tol = {} if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    torch.testing.assert_close(got, ref, **(tol or dict(atol=2e-5, rtol=1e-5)))
    for a, b in zip(g_got, g_ref, strict=True):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
        else:
            assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.98
    # clean and spliced runs: TransformerLens computes three norms each; the fused path one in bf16
    assert n_ref == 6 and n_got == (2 if dtype == torch.bfloat16 else 6)
    assert s_got == s_ref and len(s_got) == 6
    blocks_run = 1 + 2 * 2  # block 0 in the shared prefix, blocks 1 and 2 in the clean and the spliced run
    assert gemm_ref == 0 and gemm_got == (blocks_run if dtype == torch.bfloat16 else 0)  # one GEMM for q, k, v


def test_gpt2_gelu_runs_as_one_kernel_only_inside_the_backbone(tiny_model):
    """Both backbones run GPT-2's GELU formula as `F.gelu(approximate="tanh")` during their own
    passes (the same function: logits equal the model's own forward to 1e-5) and leave the model
    as its library made it afterwards, also when a pass raises."""
    from transformer_lens.utilities.activation_functions import gelu_new

    from e2edict.backbones import HFBackbone, TLBackbone, load_hf_causal_lm
    from e2edict.backbones.activations import same_function, swapped, tanh_gelu

    model, tok = load_hf_causal_lm("tiny")
    hf, tl = HFBackbone(model, tok, "tiny"), TLBackbone(tiny_model, "tiny")
    assert len(hf._gelus) == len(tl._gelus) == 4
    act = model.transformer.h[1].mlp.act
    seen = []
    x = torch.randint(1, 4096, (2, 16), generator=torch.Generator().manual_seed(5))
    x[:, 0] = 0
    with torch.no_grad():  # once before: the one-time load checks and recordings for this length
        hf.run_from(hf.embed_to(x, 1), 1, {})
    handle = act.register_forward_hook(lambda m, a, out: seen.append(torch.equal(out, tanh_gelu(a[0]))))
    try:
        with torch.no_grad():
            ours = hf.run_from(hf.embed_to(x, 1), 1, {})
            theirs = model(input_ids=x).logits
    finally:
        handle.remove()
    assert seen == [True, False]  # the backbone's pass used the kernel, the model's own forward the formula
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tl.run_from(tl.embed_to(x, 1), 1, {}), theirs, atol=1e-4, rtol=1e-4)
    assert "forward" not in act.__dict__ and all(b.mlp.act_fn is gelu_new for b in tiny_model.blocks)
    with pytest.raises(RuntimeError), swapped(hf._gelus + tl._gelus):
        assert act.forward is tanh_gelu and tiny_model.blocks[0].mlp.act_fn is tanh_gelu
        raise RuntimeError("a pass that fails")
    assert "forward" not in act.__dict__ and all(b.mlp.act_fn is gelu_new for b in tiny_model.blocks)
    assert same_function(gelu_new) and not same_function(torch.nn.functional.gelu)  # exact GELU differs
