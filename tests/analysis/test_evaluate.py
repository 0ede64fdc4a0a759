"""Evaluation metrics (method §5) against a direct computation with TransformerLens hooks."""

import pytest
import torch
import torch.nn.functional as F

from e2edict.evaluation import evaluate_saes
from e2edict.saes import ReLUSAE

HOOK = "blocks.1.hook_resid_pre"


def ce(logits, x):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).item()


def test_metrics_match_direct_computation(small_backbone):
    model = small_backbone.model
    torch.manual_seed(0)
    sae = ReLUSAE(32, 64, HOOK)
    with torch.no_grad():
        sae.b_enc[:48] = 0.0  # these fire on about half the tokens
        sae.b_enc[48:] = -1.0  # these never fire
    seqs = torch.randint(0, 4096, (10, 16), generator=torch.Generator().manual_seed(3))
    dens = {}
    res = evaluate_saes(small_backbone, {HOOK: sae}, seqs, tokens=6 * 16, alive_tokens=10 * 16, batch_size=4, densities=dens)

    x = seqs[:6]
    with torch.no_grad():
        clean, cache = model.run_with_cache(x)
        store = {}

        def splice(act, hook):
            store["a"] = act
            store["a_hat"], store["c"] = sae(act)
            return store["a_hat"]

        spliced = model.run_with_hooks(x, fwd_hooks=[(HOOK, splice)])
        zero = model.run_with_hooks(x, fwd_hooks=[(HOOK, lambda a, hook: torch.zeros_like(a))])
        codes_all = sae.encode(model.run_with_cache(seqs)[1][HOOK])
    a, a_hat, c = store["a"], store["a_hat"], store["c"]
    kl = F.kl_div(
        F.log_softmax(spliced, -1).flatten(0, 1), F.log_softmax(clean, -1).flatten(0, 1), log_target=True, reduction="batchmean"
    ).item()
    flat_a = a.reshape(-1, 32).double()
    ev = 1 - ((flat_a - a_hat.reshape(-1, 32).double()) ** 2).sum() / ((flat_a - flat_a.mean(0)) ** 2).sum()

    assert res["tokens"] == 96 and res["alive_tokens"] == 160
    assert res["ce_loss_clean"] == pytest.approx(ce(clean, x), rel=1e-5)
    assert res["ce_loss_spliced"] == pytest.approx(ce(spliced, x), rel=1e-5)
    assert res["ce_loss_increase"] == pytest.approx(ce(spliced, x) - ce(clean, x), abs=1e-5)
    assert res["kl"] == pytest.approx(kl, rel=1e-4)
    m = res["saes"][HOOK]
    assert m["l0"] == pytest.approx((c > 0).sum(-1).float().mean().item(), rel=1e-6)
    fired = (codes_all > 0).flatten(0, 1)
    assert m["alive"] == int(fired.any(0).sum()) and 0 < m["alive"] < 64 and m["dead"] == 64 - m["alive"]
    torch.testing.assert_close(dens[HOOK], fired.double().mean(0))
    expected_log = torch.log10(fired.double().mean(0) + 1e-10)
    assert m["log10_feature_density"] == pytest.approx(expected_log.tolist(), abs=1e-3)
    assert m["explained_variance"] == pytest.approx(ev.item(), rel=1e-6)
    assert m["mse"] == pytest.approx(((a - a_hat) ** 2).mean().item(), rel=1e-5)
    score = (ce(zero, x) - ce(spliced, x)) / (ce(zero, x) - ce(clean, x))
    assert m["ce_loss_score"] == pytest.approx(score, rel=2e-3)  # a ratio of small CE differences
    ratio = a_hat.norm(dim=-1) / a.norm(dim=-1)
    assert m["norm_ratio_pos0"] == pytest.approx(ratio[:, 0].mean().item(), rel=1e-5)
    assert m["norm_ratio_pos_gt0"] == pytest.approx(ratio[:, 1:].mean().item(), rel=1e-5)
    ds = m["downstream_explained_variance"]
    assert list(ds) == ["blocks.2.hook_resid_pre", "blocks.2.hook_resid_post"]
    s_act = {}
    with torch.no_grad():
        model.run_with_hooks(
            x, fwd_hooks=[(HOOK, splice), ("blocks.2.hook_resid_post", lambda act, hook: s_act.__setitem__("p", act))]
        )
    cl = cache["blocks.2.hook_resid_post"].reshape(-1, 32).double()
    sp = s_act["p"].reshape(-1, 32).double()
    expected = 1 - ((cl - sp) ** 2).sum() / ((cl - cl.mean(0)) ** 2).sum()
    assert ds["blocks.2.hook_resid_post"] == pytest.approx(expected.item(), rel=1e-6)


def test_two_saes_scores_use_each_sae_alone(small_backbone):
    torch.manual_seed(1)
    hooks = ["blocks.0.hook_resid_post", "blocks.2.hook_resid_pre"]
    saes = {h: ReLUSAE(32, 64, h) for h in hooks}
    seqs = torch.randint(0, 4096, (4, 16))
    res = evaluate_saes(small_backbone, saes, seqs)
    model = small_backbone.model
    with torch.no_grad():
        clean = model(seqs)
        alone = model.run_with_hooks(seqs, fwd_hooks=[(hooks[1], lambda a, hook: saes[hooks[1]](a)[0])])
        zero = model.run_with_hooks(seqs, fwd_hooks=[(hooks[1], lambda a, hook: torch.zeros_like(a))])
    expected = (ce(zero, seqs) - ce(alone, seqs)) / (ce(zero, seqs) - ce(clean, seqs))
    assert res["saes"][hooks[1]]["ce_loss_score"] == pytest.approx(expected, rel=2e-3)
    # the first SAE's downstream hooks stop short of the second SAE's position
    assert hooks[1] not in res["saes"][hooks[0]]["downstream_explained_variance"]
