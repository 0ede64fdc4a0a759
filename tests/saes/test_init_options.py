"""How new SAEs start and how the optimizer steps: each option does what it says, against an
independent computation (`e2edict.initialization`, `e2edict.optim`, `saes.decoder_norm`)."""

import json

import pytest
import torch
from conftest import random_gpt2

from e2edict.config import SAEsConfig, TrainConfig, config_from_dict
from e2edict.errors import E2EDictError
from e2edict.initialization import b_dec_from_data, geometric_median, initialize
from e2edict.optim import averaged_weights, make_optimizer
from e2edict.saes import registry, save_sae


def new_sae(arch: str, **keys):
    cfg = SAEsConfig(positions=["blocks.0.hook_resid_pre"], architecture=arch, **({"k": 4} if "topk" in arch else {}), **keys)
    torch.manual_seed(0)
    sae = registry[arch].from_config(16, 64, "blocks.0.hook_resid_pre", cfg)
    initialize({"h": sae}, cfg)
    return sae


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu", "gated"])
def test_tied_init_is_the_dictionary_transposed_with_zero_encoder_bias(arch):
    sae = new_sae(arch, init="tied")
    D = sae.normalized_decoder().detach()
    assert torch.allclose(D.norm(dim=1), torch.ones(64), atol=1e-6)
    assert sae.W_enc.detach().equal(D.T)
    for name in ("b_enc", "b_gate", "b_mag"):
        if hasattr(sae, name):
            assert not getattr(sae, name).detach().any(), name
    # not what the default draws
    other = new_sae(arch)
    assert not torch.allclose(other.W_enc.detach(), other.normalized_decoder().detach().T, atol=1e-2)


def test_uniform_init_and_the_legacy_orthogonal_init_key():
    assert SAEsConfig(positions=["h"], orthogonal_init=False).init == "uniform"
    assert SAEsConfig(positions=["h"], orthogonal_init=True).init == "orthogonal"
    with pytest.raises(ValueError, match="contradicts"):
        SAEsConfig(positions=["h"], orthogonal_init=False, init="orthogonal")
    D = new_sae("relu").W_dec.detach()
    assert torch.allclose(D.T @ D, torch.eye(16), atol=1e-5)  # orthogonal: orthonormal columns
    U = new_sae("relu", init="uniform").W_dec.detach()
    assert not torch.allclose(U.T @ U, torch.eye(16) * (U.T @ U)[0, 0], atol=1e-2)


def test_zero_b_dec_and_project_start_with_unit_rows():
    sae = new_sae("topk", b_dec_init="zero", decoder_norm="project")
    assert not sae.b_dec.detach().any()
    assert torch.allclose(sae.W_dec.detach().norm(dim=1), torch.ones(64), atol=1e-6)


def test_b_dec_mean_and_median_equal_the_first_batch_computed_by_transformer_lens():
    from e2edict.backbones import TLBackbone, load_hooked_transformer

    model = random_gpt2(7, vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        tl = load_hooked_transformer(d)
    backbone = TLBackbone(tl, "t")
    torch.manual_seed(1)
    batches = [torch.randint(0, 50, (3, 16)), torch.randint(0, 50, (2, 16))]
    _, cache = tl.run_with_cache(torch.cat(batches), names_filter=["blocks.1.hook_resid_mid"])
    acts = cache["blocks.1.hook_resid_mid"].reshape(-1, 16).double()
    for how in ("mean", "geometric_median"):
        sae = registry["relu"](16, 32, "blocks.1.hook_resid_mid")
        b_dec_from_data({"blocks.1.hook_resid_mid": sae}, backbone, batches, how)
        want = acts.mean(0) if how == "mean" else geometric_median(acts)
        assert torch.allclose(sae.b_dec.detach().double(), want, atol=1e-5), how


def test_geometric_median_minimises_the_sum_of_distances():
    # one dimension: the median of an odd count of points
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0], [50.0]])
    assert geometric_median(x).item() == pytest.approx(2.0, abs=1e-6)
    torch.manual_seed(0)
    pts = torch.cat([torch.randn(200, 5), torch.randn(20, 5) * 30 + 100]).double()  # outliers pull the mean
    gm = geometric_median(pts)

    def cost(m):
        return (pts - m).norm(dim=1).sum()

    assert cost(gm) < cost(pts.mean(0))
    for _ in range(50):
        assert cost(gm) <= cost(gm + 1e-3 * torch.randn(5, dtype=torch.float64)) + 1e-9


def test_projection_removes_exactly_the_parallel_component_and_keeps_rows_unit():
    sae = new_sae("relu", decoder_norm="project")
    W = sae.W_dec.detach().double().clone()
    G = torch.randn(64, 16, dtype=torch.float64)
    sae.W_dec.grad = G.float().clone()
    sae.project_decoder_grad()
    want = G - (G * W).sum(1, keepdim=True) / (W * W).sum(1, keepdim=True) * W
    assert torch.allclose(sae.W_dec.grad.double(), want, atol=1e-6)
    assert (sae.W_dec.grad.double() * W).sum(1).abs().max() < 1e-5
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(64, 1) + 0.5)
    sae.renormalize_decoder()
    assert torch.allclose(sae.W_dec.detach().norm(dim=1), torch.ones(64), atol=1e-6)


def test_training_step_with_projection_keeps_rows_unit(small_backbone):
    from e2edict.distributed import DistContext
    from e2edict.optim import make_schedule
    from e2edict.splice import LossWeights
    from e2edict.step import TrainStep

    torch.manual_seed(0)
    sae = registry["relu"](32, 64, "blocks.1.hook_resid_pre")
    saes = {"blocks.1.hook_resid_pre": sae}
    opt = make_optimizer(list(sae.parameters()), 5e-2)
    sched = make_schedule(opt, TrainConfig(), 10, 0)
    w = LossWeights(sparsity={"blocks.1.hook_resid_pre": 1.0}, p=1.0, kl=1.0, local=0.0, downstream=0.0)
    step = TrainStep(small_backbone, saes, saes, w, opt, sched, DistContext(), None, project_decoders=True)
    for _ in range(3):
        step([torch.randint(0, 4096, (2, 16))])
    assert torch.allclose(sae.W_dec.detach().norm(dim=1), torch.ones(64), atol=1e-6)


def test_schedule_free_averaged_weights_are_x_and_training_weights_come_back_bitwise():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(10))
    opt = make_optimizer([p], 0.1, "schedulefree", warmup_steps=2)
    for _ in range(5):
        p.grad = torch.randn(10)
        opt.step()
    y, z = p.detach().clone(), opt.state[p]["z"].clone()
    beta1 = opt.param_groups[0]["betas"][0]
    with averaged_weights(opt):
        x = p.detach().clone()
    assert torch.allclose(x, (y - (1 - beta1) * z) / beta1, atol=1e-6)  # y = (1 - beta1) z + beta1 x
    assert not x.equal(y)
    assert p.detach().equal(y) and opt.param_groups[0]["train_mode"]
    p.grad = torch.randn(10)
    opt.step()  # still in train mode


def test_adam_and_adamw_take_the_configured_betas_and_decay():
    p = torch.nn.Parameter(torch.ones(3))
    opt = make_optimizer([p], 1e-2, "adamw", weight_decay=0.1, betas=(0.8, 0.9))
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["betas"] == (0.8, 0.9)
    p.grad = torch.zeros(3)
    opt.step()  # a zero gradient: only the decoupled decay moves p
    assert torch.allclose(p.detach(), torch.full((3,), 1 - 1e-2 * 0.1))


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"train": {"optimizer": "schedulefree", "schedule": "cosine"}}, "takes no decay schedule"),
        ({"train": {"weight_decay": 0.1}}, "use optimizer=adamw"),
        ({"train": {"betas": [0.9, 1.0]}}, "each beta"),
        ({"saes": {"init_from": "somewhere", "init": "tied"}}, "describe new SAEs"),
        ({"saes": {"init_from": "somewhere", "b_dec_init": "mean"}}, "describe new SAEs"),
        ({"saes": {"kind": "transcoder", "init": "tied", "positions": ["blocks.0.mlp"]}}, "is for SAEs"),
        ({"saes": {"init": "transposed"}}, "init"),
    ],
)
def test_bad_option_combinations_are_one_line_errors(keys, message):
    raw = {"saes": {"positions": ["blocks.0.hook_resid_pre"]}}
    for block, vals in keys.items():
        raw.setdefault(block, {}).update(vals)
    with pytest.raises(E2EDictError, match=message) as e:
        config_from_dict(raw)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_apply_b_dec_to_input_file_gives_saelens_the_same_latents(tmp_path, arch):
    sae_lens = pytest.importorskip("sae_lens")
    sae = new_sae(arch, apply_b_dec_to_input=True, b_dec_init="zero")
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(16) * 3)  # large enough that subtracting it changes the codes
    save_sae(sae, tmp_path / "sae")
    assert json.loads((tmp_path / "sae" / "cfg.json").read_text())["apply_b_dec_to_input"] is True
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"))
    x = torch.randn(40, 16) * 2
    with torch.no_grad():
        ours_c = sae.encode(x)
        assert torch.allclose(theirs.encode(x), ours_c, atol=1e-5)
        assert torch.allclose(theirs.decode(theirs.encode(x)), sae(x)[0], atol=1e-5)
        plain = new_sae(arch, b_dec_init="zero")
        plain.load_state_dict(sae.state_dict())
        assert not torch.allclose(plain.encode(x), ours_c, atol=1e-3)  # the subtraction mattered
