"""Files in the SAELens layout: SAELens's own loader computes the latents e2edict computes, and
saved forms reproduce the training output."""

import json
from pathlib import Path

import pytest
import torch

from e2edict.saes import GatedSAE, load_sae, registry, save_sae

ROOT = Path(__file__).resolve().parents[2]

def test_gated_saved_form_reproduces_training_output(tmp_path):
    torch.manual_seed(0)
    sae = GatedSAE(12, 48, "h")
    with torch.no_grad():
        sae.r_mag.normal_()
        sae.W_dec.mul_(torch.rand(48, 1) + 0.5)
    x = torch.randn(5, 12)
    x_hat, c = sae(x)
    back = load_sae(save_sae(sae, tmp_path / "g"))
    x2, c2 = back(x)
    torch.testing.assert_close(x2, x_hat, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(c2, c, atol=1e-6, rtol=1e-5)
    aux = sae.aux_loss(x, x_hat, c)
    expected = ((torch.relu(x @ sae.W_enc + sae.b_gate) @ sae.normalized_decoder() + sae.b_dec - x) ** 2).mean()
    torch.testing.assert_close(aux, expected)
    (g,) = torch.autograd.grad(aux, [sae.W_dec], allow_unused=True)
    assert g is None  # the auxiliary path reconstructs through a frozen decoder

@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "gated"])
def test_saelens_computes_the_same_latents(tmp_path, arch):
    sae_lens = pytest.importorskip("sae_lens")
    torch.manual_seed(0)
    kw = {"k": 5} if arch in ("topk", "batchtopk") else {}
    sae = registry[arch](16, 64, "blocks.1.hook_resid_pre", **kw)
    x = torch.randn(30, 16)
    if arch == "batchtopk":
        sae.train()
        sae(x)  # sets the threshold
    sae.eval()
    save_sae(sae, tmp_path / "s")
    cfg = json.loads((tmp_path / "s/cfg.json").read_text())
    assert cfg["architecture"] == {"topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu", "gated": "gated"}[arch]
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "s"))
    with torch.no_grad():
        ours = sae.encode(x)
        torch.testing.assert_close(theirs.encode(x), ours, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs.decode(ours), sae.decode(ours), atol=1e-5, rtol=1e-5)
        mine = load_sae(tmp_path / "s").eval()
        torch.testing.assert_close(mine.encode(x), ours, atol=1e-6, rtol=1e-6)

@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_topk_file_with_non_unit_decoder_rows_loads_with_the_source_latents(tmp_path, arch):
    """A TopK / BatchTopK file whose decoder rows have norms 0.6-1.0 (as SAELens's and sparsify's
    do): e2edict computes the same latents and reconstruction as SAELens and as the formula
    (folding the norms into the encoder would change which latents win the top-k)."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    sae = registry[arch](16, 64, "blocks.1.hook_resid_pre", k=5)
    x = torch.randn(40, 16)
    if arch == "batchtopk":
        sae(x)  # a threshold
    sae.eval()
    save_sae(sae, tmp_path / "s")
    t = load_file(str(tmp_path / "s/sae_weights.safetensors"))
    t["W_dec"] = t["W_dec"] * (0.6 + 0.4 * torch.rand(64, 1))
    save_file(t, str(tmp_path / "s/sae_weights.safetensors"))
    mine = load_sae(tmp_path / "s").eval()
    with torch.no_grad():
        pre = torch.relu(x @ t["W_enc"] + t["b_enc"])
        if arch == "topk":
            vals, idx = pre.topk(5, dim=-1)
            ref = torch.zeros_like(pre).scatter(-1, idx, vals)
        else:
            ref = pre * (pre > t["threshold"])
        got_c = mine.encode(x)
        torch.testing.assert_close(got_c, ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(mine.decode(got_c), ref @ t["W_dec"] + t["b_dec"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mine(x)[0], ref @ t["W_dec"] + t["b_dec"], atol=1e-5, rtol=1e-5)
        sae_lens = pytest.importorskip("sae_lens")
        theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "s"))
        torch.testing.assert_close(theirs.encode(x), got_c, atol=1e-5, rtol=1e-5)
        # saved again, the file holds the same decoder rows
        save_sae(mine, tmp_path / "again")
        torch.testing.assert_close(
            load_file(str(tmp_path / "again/sae_weights.safetensors"))["W_dec"], t["W_dec"], atol=1e-6, rtol=1e-6
        )
