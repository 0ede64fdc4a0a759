"""The shared-prefix step against a naive reference: two full forward passes, losses by hand."""

import pytest
import torch
import torch.nn.functional as F

from e2edict.losses import kl_loss
from e2edict.saes import ReLUSAE
from e2edict.splice import LossWeights, evaluation_forward, training_forward


def make_saes(backbone, positions, ratio=4, seed=0):
    torch.manual_seed(seed)
    shapes = backbone.hook_shapes()
    return {h: ReLUSAE(shapes[h][0], ratio * shapes[h][0], h) for h in positions}


def naive_loss(model, saes, tokens, w: LossWeights):
    """What the reference implementation does: a full clean pass and a full spliced pass."""
    clean = {}
    with torch.no_grad():
        logits_clean = model.run_with_hooks(
            tokens, fwd_hooks=[(h, lambda a, hook: clean.__setitem__(hook.name, a.clone())) for h in w.downstream_positions]
        )
    store, spliced = {}, {}

    def splice(act, hook):
        sae = saes[hook.name]
        c = torch.relu(act @ sae.W_enc + sae.b_enc)
        D = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
        out = c @ D + sae.b_dec
        store[hook.name] = (act, out, c)
        return out

    if not w.kl and not w.downstream:
        # Local SAEs each read the clean activation: one full clean pass, SAEs applied beside it.
        acts = {}
        with torch.no_grad():
            model.run_with_hooks(tokens, fwd_hooks=[(h, lambda a, hook: acts.__setitem__(hook.name, a)) for h in saes])
        for h in saes:

            class _Hook:
                name = h

            splice(acts[h], _Hook)
    hooks = [(h, splice) for h in saes] + [(h, lambda a, hook: spliced.__setitem__(hook.name, a)) for h in w.downstream_positions]
    logits = model.run_with_hooks(tokens, fwd_hooks=hooks) if (w.kl or w.downstream) else None
    total = 0.0
    for h, (a, out, c) in store.items():
        total = total + w.sparsity[h] * c.abs().sum(-1).mean() / a.shape[-1]
        total = total + w.local * ((out - a) ** 2).mean()
    if w.kl:
        lp_c = F.log_softmax(logits_clean, -1).flatten(0, 1)
        lp_s = F.log_softmax(logits, -1).flatten(0, 1)
        total = total + w.kl * F.kl_div(lp_s, lp_c, log_target=True, reduction="batchmean")
    if w.downstream:
        k = len(w.downstream_positions)
        total = total + w.downstream / k * sum(((spliced[h] - clean[h]) ** 2).mean() for h in w.downstream_positions)
    return total


CASES = {
    "local": dict(local=1.0),
    "e2e": dict(kl=1.0),
    "e2e+ds": dict(kl=0.5, downstream=2.5),
}


@pytest.mark.parametrize("preset", list(CASES))
@pytest.mark.parametrize(
    "positions",
    [["blocks.1.hook_resid_pre"], ["blocks.0.hook_mlp_out", "blocks.1.hook_resid_post"], ["blocks.1.hook_resid_post"]],
)
def test_shared_prefix_matches_naive(small_backbone, preset, positions):
    model = small_backbone.model.double()
    try:
        saes = {h: s.double() for h, s in make_saes(small_backbone, positions).items()}
        ds = small_backbone.resid_hooks_after(small_backbone.last_position(positions)) if preset == "e2e+ds" else []
        w = LossWeights(sparsity={h: 0.3 + i for i, h in enumerate(positions)}, downstream_positions=ds, **CASES[preset])
        tokens = torch.randint(0, 4096, (3, 16), generator=torch.Generator().manual_seed(0))

        ours = training_forward(small_backbone, saes, tokens, w).loss
        ours.backward()
        g_ours = {n: p.grad.clone() for h, s in saes.items() for n, p in s.named_parameters(prefix=h)}
        for s in saes.values():
            s.zero_grad()
        ref = naive_loss(model, saes, tokens, w)
        ref.backward()
        g_ref = {n: p.grad.clone() for h, s in saes.items() for n, p in s.named_parameters(prefix=h)}

        assert ours.item() == pytest.approx(ref.item(), abs=1e-6, rel=1e-6)
        for n in g_ref:
            torch.testing.assert_close(g_ours[n], g_ref[n], atol=1e-6, rtol=1e-6)
            assert g_ref[n].abs().sum() > 0
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.float()


def identity_sae(d: int, hook: str) -> ReLUSAE:
    sae = ReLUSAE(d, 2 * d, hook)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.b_enc.zero_()
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_dec.zero_()
    return sae


def test_identity_sae_leaves_logits_unchanged(small_backbone):
    h = "blocks.1.hook_resid_pre"
    saes = {h: identity_sae(32, h)}
    tokens = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(1))
    w = LossWeights(sparsity={h: 1.0}, kl=1.0)
    full = evaluation_forward(small_backbone, saes, tokens, [])  # logits, as evaluation takes them
    torch.testing.assert_close(full.logits_spliced, small_backbone.model(tokens), atol=1e-5, rtol=1e-5)
    assert kl_loss(full.logits_clean, full.logits_spliced).item() == pytest.approx(0.0, abs=1e-6)
    out = training_forward(small_backbone, saes, tokens, w)  # training: the fused head's KL
    assert out.logits_spliced is None and out.terms["kl"].item() == pytest.approx(0.0, abs=1e-6)


def test_model_gets_no_gradient_and_local_stops_early(small_backbone):
    h = "blocks.0.hook_resid_post"
    saes = make_saes(small_backbone, [h])
    seen = []
    model = small_backbone.model
    handles = [
        model.blocks[2].register_forward_hook(lambda *a: seen.append("block2")),
        model.ln_final.register_forward_hook(lambda *a: seen.append("final norm")),
    ]
    try:
        tokens = torch.randint(0, 4096, (2, 16))
        out = training_forward(small_backbone, saes, tokens, LossWeights(sparsity={h: 1.0}, local=1.0))
        out.loss.backward()
        assert seen == []  # local training ran nothing past the SAE's block
        assert out.logits_spliced is None
        training_forward(small_backbone, saes, tokens, LossWeights(sparsity={h: 1.0}, kl=1.0)).loss.backward()
        assert seen == ["block2", "final norm", "block2", "final norm"]  # clean and spliced continuations
    finally:
        for hd in handles:
            hd.remove()
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert saes[h].W_enc_T.grad is not None


def test_prefix_runs_without_graph(small_backbone):
    h = "blocks.2.hook_resid_pre"
    saes = make_saes(small_backbone, [h])
    out = evaluation_forward(small_backbone, saes, torch.randint(0, 4096, (2, 8)), [])
    assert not out.inputs[h].requires_grad  # the SAE input came from the no-graph prefix
    assert out.logits_clean is not None and not out.logits_clean.requires_grad
    assert out.logits_spliced.requires_grad


def test_bf16_autocast_step_keeps_fp32_master_weights(small_backbone):
    h = "blocks.1.hook_resid_pre"
    saes = make_saes(small_backbone, [h])
    tokens = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(2))
    w = LossWeights(sparsity={h: 1.0}, kl=1.0)
    ref = training_forward(small_backbone, saes, tokens, w).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = training_forward(small_backbone, saes, tokens, w)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and out.terms["kl"].dtype == torch.float32
    assert out.loss.item() == pytest.approx(ref.item(), rel=0.05)  # bf16 forward, fp32 loss
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in saes[h].parameters())


@pytest.mark.parametrize("arch,shift", [("topk", 0.0), ("relu", 0.15), ("jumprelu", 0.1)])
def test_bf16_autocast_through_the_sparse_paths(small_backbone, arch, shift):
    """Under bf16 autocast the sparse backwards get bf16 gradients against fp32 weights; the SAE's
    gradients come back fp32 and point where the fp32 step's do (bf16 rounding may swap a latent
    at TopK's k-th place, so not equal)."""
    from e2edict.saes import registry

    h = "blocks.1.hook_resid_pre"
    d = small_backbone.hook_shapes()[h][0]
    torch.manual_seed(0)
    kw = {"topk": {"k": 8}, "jumprelu": {"init_threshold": 0.05, "bandwidth": 0.05}}.get(arch, {})
    sae = registry[arch](d, 16 * d, h, **kw)
    with torch.no_grad():
        sae.b_enc.sub_(shift)  # some tens of active latents per token
    sae.sparse_decode = True
    tokens = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(2))
    w = LossWeights(sparsity={h: 1.0}, kl=1.0)
    grads = []
    for bf16 in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = training_forward(small_backbone, {h: sae}, tokens, w)
        assert 5 < (out.codes[h] != 0).sum(-1).float().mean() < 100
        grads.append(torch.autograd.grad(out.loss, [sae.W_enc_T, sae.W_dec]))
    for g32, g16 in zip(*grads, strict=True):
        assert g16.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0) > 0.95


def test_keep_freed_memory_serves_large_tensors_from_the_heap():
    """After `keep_freed_memory`, a 100 MB tensor is no longer its own mapping (glibc's mallinfo2
    counts the bytes in mmapped blocks); run in a child process, as the setting is process-wide."""
    import subprocess
    import sys

    code = """
import ctypes, torch
from e2edict.precision import keep_freed_memory
class Info(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(n, ctypes.c_size_t) for n in names.split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
def mapped_while_alive():
    before = libc.mallinfo2().hblkhd
    t = torch.ones(25_000_000)
    return libc.mallinfo2().hblkhd - before
print(mapped_while_alive() > 90e6, keep_freed_memory(), mapped_while_alive() > 90e6)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True", "False"]


def _graph(t: torch.Tensor) -> set:
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            todo += [f for f, _ in fn.next_functions]
    return seen


def test_zero_weighted_terms_are_logged_but_not_in_the_loss(small_backbone):
    """A term whose coefficient is 0 is reported but adds nothing to the loss, so no backward runs
    through it: the loss's graph does not reach the term's node (it does at a coefficient > 0)."""
    h = "blocks.1.hook_resid_pre"
    sae = make_saes(small_backbone, [h])[h]
    tokens = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(3))
    out = training_forward(small_backbone, {h: sae}, tokens, LossWeights(sparsity={h: 0.0}, local=1.0))
    assert out.terms[f"sparsity/{h}"].item() > 0
    assert torch.equal(out.loss, out.terms[f"local/{h}"])
    assert out.terms[f"sparsity/{h}"].grad_fn not in _graph(out.loss)
    out = training_forward(small_backbone, {h: sae}, tokens, LossWeights(sparsity={h: 0.0}, local=0.0, kl=1.0))
    assert torch.equal(out.loss, out.terms["kl"]) and out.loss.requires_grad
    assert out.terms[f"sparsity/{h}"].grad_fn not in _graph(out.loss)
    out = training_forward(small_backbone, {h: sae}, tokens, LossWeights(sparsity={h: 0.5}, local=1.0))
    assert out.terms[f"sparsity/{h}"].grad_fn in _graph(out.loss)
