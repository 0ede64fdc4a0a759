"""Each architecture's own behaviour: BatchTopK's batch selection and threshold, JumpReLU's
straight-through gradients, AuxK, evaluation with inference behaviour, released pre-activations."""

from pathlib import Path

import pytest
import torch

from e2edict.saes import BatchTopKSAE, JumpReLUSAE, TopKSAE, registry

ROOT = Path(__file__).resolve().parents[2]

def test_batchtopk_keeps_k_times_batch_and_learns_a_threshold():
    torch.manual_seed(0)
    sae = BatchTopKSAE(16, 128, k=6, momentum=0.5)
    with torch.no_grad():
        sae.b_enc.add_(5.0)
    x = torch.randn(4, 5, 16)
    sae.train()
    _, c = sae(x)
    assert (c != 0).sum().item() == 6 * 20
    assert (c != 0).sum(-1).float().std() > 0  # per-token counts vary: the selection is over the batch
    kept_min = c[c > 0].min()
    assert sae.threshold.item() == pytest.approx(kept_min.item())
    _, c2 = sae(x * 1.1)
    assert sae.threshold.item() == pytest.approx(0.5 * kept_min.item() + 0.5 * c2[c2 > 0].min().item())
    sae.eval()
    _, c_inf = sae(x)
    z = torch.relu(x @ sae.W_enc + sae.b_enc)
    torch.testing.assert_close(c_inf, z * (z > sae.threshold))

def test_jumprelu_threshold_gets_the_ste_gradient():
    torch.manual_seed(0)
    eps = 0.5
    sae = JumpReLUSAE(8, 32, bandwidth=eps, init_threshold=0.3)
    x = torch.randn(50, 8)
    _, c = sae(x)
    z = torch.relu(x @ sae.W_enc + sae.b_enc)
    assert torch.equal(c, z * (z > 0.3))
    loss = sae.sparsity_loss(x, c, 1.0)
    (g,) = torch.autograd.grad(loss, [sae.log_threshold])
    theta = sae.threshold.detach()
    in_window = ((z - theta).abs() < eps / 2).float()
    # d/dtheta of mean_t sum_i H(z - theta) / d_in, then the chain rule through theta = exp(log_theta)
    expected = -(in_window / eps).sum(0) / 50 / 8 * theta
    torch.testing.assert_close(g, expected.detach(), atol=1e-6, rtol=1e-5)
    assert g.abs().sum() > 0
    (g2,) = torch.autograd.grad(c.sum(), [sae.log_threshold])
    torch.testing.assert_close(g2, (-(theta / eps) * in_window).sum(0) * theta, atol=1e-5, rtol=1e-5)

def test_jumprelu_sparse_decode_keeps_the_threshold_gradient_of_zero_codes():
    """A sparse decode must cover the latents inside θ's straight-through window, not only the
    active ones: their codes are 0 but the reconstruction's gradient reaches θ through them."""
    torch.manual_seed(0)
    eps = 0.5
    sae = JumpReLUSAE(16, 512, bandwidth=eps, init_threshold=0.5).double()
    with torch.no_grad():
        sae.b_enc.sub_(1.2)
    x = torch.randn(4, 9, 16, dtype=torch.float64)
    z = torch.relu(x @ sae.W_enc + sae.b_enc).detach()
    theta = sae.threshold.detach()
    silent = ((z - theta).abs() < eps / 2) & (z <= theta)
    assert silent.any()  # zero codes whose θ-gradient the test is about
    params = [sae.W_enc_T, sae.W_dec, sae.b_enc, sae.b_dec, sae.log_threshold]
    grads = {}
    for mode in (True, False):
        sae.sparse_decode = mode
        a, c = sae(x)
        grads[mode] = torch.autograd.grad((a - x).square().sum() + sae.sparsity_loss(x, c, 1.0), params)
    for u, v in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(u, v, atol=1e-10, rtol=1e-10)
    assert grads[True][-1].abs().sum() > 0

def test_batchtopk_evaluates_with_its_threshold(small_backbone):
    from e2edict.evaluation import evaluate_saes

    torch.manual_seed(0)
    sae = BatchTopKSAE(32, 128, "blocks.1.hook_resid_pre", k=4)
    seqs = torch.randint(0, 4096, (4, 16))
    sae.train()
    sae(torch.randn(64, 32) * 0.05)
    thr = sae.threshold.clone()
    evaluate_saes(small_backbone, {"blocks.1.hook_resid_pre": sae}, seqs)
    assert sae.training and torch.equal(sae.threshold, thr)  # evaluation neither trains nor moves the threshold

def test_auxk_trains_dead_latents_on_the_residual_error():
    torch.manual_seed(0)
    sae = TopKSAE(8, 32, k=2, auxk_coeff=0.5, auxk_k=3, dead_tokens=10)
    x = torch.randn(4, 5, 8)
    x_hat, c = sae(x)  # 20 tokens seen
    fired = (c != 0).flatten(0, 1).any(0)
    assert torch.equal(sae.tokens_since_fired == 0, fired) and (sae.tokens_since_fired[~fired] == 20).all()
    aux = sae.aux_loss(x, x_hat, c)
    dead = ~fired
    pre = (x @ sae.W_enc + sae.b_enc).masked_fill(~dead, float("-inf"))
    vals, idx = pre.topk(3, dim=-1)
    code = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
    err = (x - x_hat).detach()
    expected = 0.5 * ((code @ sae.normalized_decoder() - err) ** 2).mean() / (err**2).mean()
    torch.testing.assert_close(aux, expected)
    grads = torch.autograd.grad(aux, [sae.W_enc_T])[0]  # one row per latent
    assert grads[fired].abs().sum() == 0 and grads[dead].abs().sum() > 0  # only dead latents learn from it
    assert TopKSAE(8, 32, k=2).aux_loss(x, x_hat, c) is None  # off by default

@pytest.mark.parametrize("arch", ["jumprelu", "gated"])
@pytest.mark.parametrize("preset", ["e2e", "local"])
def test_pre_activations_kept_for_the_loss_terms_are_released_after_them(small_backbone, arch, preset):
    """JumpReLU and Gated keep their forward's pre-activations for the sparsity (and auxiliary)
    term; once the terms are computed nothing of the step stays on the SAE."""
    from e2edict.splice import LossWeights, training_forward

    h = "blocks.1.hook_resid_pre"
    sae = registry[arch](32, 64, h)
    w = LossWeights(sparsity={h: 1.0}, **({"kl": 1.0} if preset == "e2e" else {"local": 1.0}))
    out = training_forward(small_backbone, {h: sae}, torch.randint(0, 4096, (2, 8)), w)
    assert f"sparsity/{h}" in out.terms and sae._pre_cache is None
    out.loss.backward()
