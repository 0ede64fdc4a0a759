"""SAEs saved by EleutherAI's sparsify load with exactly the latents and outputs sparsify computes."""

import pytest
import torch

from e2edict.errors import E2EDictError
from e2edict.saes import load_sparsify

sparsify = pytest.importorskip("sparsify")


def saved_coder(tmp_path, **cfg):
    torch.manual_seed(0)
    coder = sparsify.SparseCoder(16, sparsify.SaeConfig(num_latents=64, k=4, **cfg))
    with torch.no_grad():  # rows of other norms than 1 and a b_dec far from 0, as trained ones have
        if coder.W_dec.abs().sum() == 0:
            coder.W_dec.normal_()
        coder.W_dec.mul_(torch.rand(64, 1) + 0.3)
        coder.b_dec.normal_().mul_(2)
        coder.encoder.bias.normal_().mul_(0.1)
        if coder.W_skip is not None:
            coder.W_skip.normal_().mul_(0.1)
    coder.save_to_disk(tmp_path / "h.2")
    return coder


def test_sparsify_sae_loads_with_its_own_latents_and_reconstruction(tmp_path):
    coder = saved_coder(tmp_path)
    sae = load_sparsify(tmp_path / "h.2", hook_name="transformer.h.2")
    assert sae.architecture == "topk" and sae.k == 4 and sae.apply_b_dec_to_input and sae.hook_name == "transformer.h.2"
    x = torch.randn(200, 16) * 3
    with torch.no_grad():
        theirs = coder(x)
        x_hat, c = sae.eval()(x)
    dense = torch.zeros(200, 64).scatter_(1, theirs.latent_indices, theirs.latent_acts)
    assert torch.equal(c != 0, dense != 0)  # the same active latents on every token
    assert torch.allclose(c, dense, atol=1e-5)
    assert torch.allclose(x_hat, theirs.sae_out, atol=1e-5)


def test_sparsify_skip_transcoder_loads_with_its_outputs(tmp_path):
    coder = saved_coder(tmp_path, transcode=True, skip_connection=True)
    sae = load_sparsify(tmp_path / "h.2", hook_name="h.2.mlp.in", hook_name_out="h.2.mlp.out")
    assert sae.kind == "skip_transcoder" and not sae.apply_b_dec_to_input and sae.hook_name_out == "h.2.mlp.out"
    x = torch.randn(100, 16)
    with torch.no_grad():
        assert torch.allclose(sae.eval()(x)[0], coder(x).sae_out, atol=1e-5)


def test_not_a_sparsify_folder_is_one_line(tmp_path):
    with pytest.raises(E2EDictError, match="not a sparsify SAE folder"):
        load_sparsify(tmp_path)
