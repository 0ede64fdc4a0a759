"""TopK, BatchTopK, JumpReLU and Gated SAEs: their defining properties, SAELens files, every preset."""

import json
from pathlib import Path

import pytest
import torch

import e2edict
from e2edict.cli import main as cli_main
from e2edict.saes import BatchTopKSAE, GatedSAE, JumpReLUSAE, TopKSAE, base, load_sae, registry, save_sae

ROOT = Path(__file__).resolve().parents[2]


def test_topk_keeps_exactly_k_and_sparse_decode_matches_dense():
    torch.manual_seed(0)
    sae = TopKSAE(16, 256, k=5, sparse_decode=True).double()  # float64: the comparison is exact
    with torch.no_grad():
        sae.b_enc.add_(10.0)  # every pre-activation positive, so ReLU removes none of the top k
    x = torch.randn(3, 7, 16, requires_grad=True, dtype=torch.float64)
    x_hat, c = sae(x)
    assert ((c != 0).sum(-1) == 5).all()
    pre = x @ sae.W_enc + sae.b_enc
    assert torch.equal(c != 0, pre >= pre.topk(5, dim=-1).values[..., -1:])
    # a dense reference written out here: dense pre-activations, top-k, dense decode
    vals, idx = pre.topk(5, dim=-1)
    c_ref = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
    x_ref = c_ref @ (sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)) + sae.b_dec
    torch.testing.assert_close(x_hat, x_ref, atol=1e-10, rtol=1e-10)
    params = [x, sae.W_dec, sae.W_enc_T, sae.b_enc, sae.b_dec]
    g_sparse = torch.autograd.grad(x_hat.square().sum() + c.sum(), params)  # sparse decode and sparse encoder backward
    g_dense = torch.autograd.grad(x_ref.square().sum() + c_ref.sum(), params)
    for a, b in zip(g_sparse, g_dense, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def _graph_ops(out: torch.Tensor) -> set[str]:
    seen, todo, names = set(), [out.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo += [f for f, _ in fn.next_functions]
    return names


def test_topk_fixed_k_path_against_dense_with_relu_zeros_b_dec_and_scale():
    """The fixed-k gather path (`TopKEncode`, then `GatherDecode` over its k pairs per token) against a dense reference written
    out here, in float64: some of the top k are negative (ReLU zeroes them, and their gradient),
    b_dec is subtracted first, the rows carry a fixed `decoder_scale`; a sparsity term on the codes
    reaches the encoder. Automatic on a CPU in fp32; ``sparse_decode=False`` keeps the dense path."""
    from e2edict.saes.sparse import TopKEncode

    torch.manual_seed(4)
    sae = TopKSAE(16, 96, k=7, apply_b_dec_to_input=True).double()
    with torch.no_grad():
        sae.b_enc.sub_(0.6)
        sae.b_dec.normal_()
        sae.decoder_scale = torch.rand(96, dtype=torch.float64) + 0.5
    x = torch.randn(4, 5, 16, requires_grad=True, dtype=torch.float64)
    x_hat, c = sae(x)
    xin = x - sae.b_dec
    pre = xin @ sae.W_enc + sae.b_enc
    vals, idx = pre.topk(7, dim=-1)
    assert (vals <= 0).any() and (vals > 0).any()  # ReLU removes some of the k
    c_ref = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
    D = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True) * sae.decoder_scale[:, None]
    x_ref = c_ref @ D + sae.b_dec
    torch.testing.assert_close(c, c_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(x_hat, x_ref, atol=1e-10, rtol=1e-10)
    params = [x, sae.W_dec, sae.W_enc_T, sae.b_enc, sae.b_dec]
    g = torch.autograd.grad(x_hat.square().sum() + 0.3 * c.sum(), params)
    g_ref = torch.autograd.grad(x_ref.square().sum() + 0.3 * c_ref.sum(), params)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
    xs = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)
    W = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(40, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x_, w_, b_: TopKEncode.apply(x_, w_, b_, 5)[0], (xs, W, b))

    auto = TopKSAE(16, 96, k=4)  # fp32 on a CPU, k / d_sae below TOPK_GATHER_FRACTION: the gather path
    assert 4 / 96 < base.TOPK_GATHER_FRACTION < 7 / 96
    assert {"TopKEncodeBackward", "GatherDecodeBackward"} <= _graph_ops(auto(torch.randn(3, 16))[0])
    auto.sparse_decode = False  # what train.compile sets
    assert "TopKEncodeBackward" not in _graph_ops(auto(torch.randn(3, 16))[0])
    assert "TopKEncodeBackward" not in _graph_ops(TopKSAE(16, 96, k=7)(torch.randn(3, 16))[0])  # k too large


def test_gather_decode_gradients_and_both_dense_decode_routes():
    """The fused gather-decode backward (gradcheck, float64, repeated ids) and the dense decode's
    two equal forms: codes scaled by inverse norms (few tokens) and the normalised dictionary."""
    from e2edict.saes import ReLUSAE
    from e2edict.saes import sparse as sparse_mod
    from e2edict.saes.sparse import GatherDecode, Pairs

    torch.manual_seed(3)
    W = torch.randn(40, 6, dtype=torch.float64, requires_grad=True)
    # ragged pairs: token 0 uses latent 2 twice, token 2 has none, token 3 has one
    pairs = Pairs(torch.tensor([0, 0, 0, 1, 1, 3, 4, 4]), torch.tensor([2, 2, 9, 5, 39, 0, 7, 2]), 5)
    vals = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, w: GatherDecode.apply(v, pairs, w), (vals, W))
    out = GatherDecode.apply(vals, pairs, W)
    D = W / W.norm(dim=1, keepdim=True)
    ref = torch.zeros(5, 6, dtype=torch.float64).index_add(0, pairs.tok, vals.unsqueeze(1) * D[pairs.lat])
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    assert out[2].abs().sum() == 0
    # more pairs than rows (the norms from every row, not from the rows used) and pairs spread over
    # several backward chunks: the same function and the same gradients as a dense reference
    W_small = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    dense_norms = Pairs(pairs.tok, pairs.lat.remainder(3), 5)  # 8 pairs over 3 rows
    assert torch.autograd.gradcheck(lambda v, w: GatherDecode.apply(v, dense_norms, w), (vals, W_small))
    many = Pairs(torch.arange(30).div(3, rounding_mode="floor"), torch.randint(0, 40, (30,)), 10)
    v30 = torch.randn(30, dtype=torch.float64, requires_grad=True)
    sparse_mod.GATHER_CHUNK_ELEMENTS, chunk = 4 * 6, sparse_mod.GATHER_CHUNK_ELEMENTS  # 4 pairs per chunk
    try:
        for w in (W, W_small):
            p = many if w is W else Pairs(many.tok, many.lat.remainder(3), 10)
            got = GatherDecode.apply(v30, p, w)
            ref = torch.zeros(10, 6, dtype=torch.float64).index_add(
                0, p.tok, v30.unsqueeze(1) * (w / w.norm(dim=1, keepdim=True))[p.lat]
            )
            g = torch.randn(10, 6, dtype=torch.float64)
            for a, b in zip(torch.autograd.grad(got, [v30, w], g), torch.autograd.grad(ref, [v30, w], g), strict=True):
                torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    finally:
        sparse_mod.GATHER_CHUNK_ELEMENTS = chunk
    sae = ReLUSAE(16, 64).double()
    for n_tok in (4, 40):  # fewer tokens than d_in: scaled codes; more: normalised dictionary
        c = torch.relu(torch.randn(n_tok, 64, dtype=torch.float64)).requires_grad_(True)
        got = sae.decode(c)
        ref = c @ (sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)) + sae.b_dec
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)
        ga = torch.autograd.grad(got.square().sum(), [c, sae.W_dec])
        gb = torch.autograd.grad(ref.square().sum(), [c, sae.W_dec])
        for a, b in zip(ga, gb, strict=True):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


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


def test_gather_decode_skipping_zero_values_is_exact_for_relu_codes():
    """``zero_is_inactive`` drops the (token, latent) pairs whose value is 0: the dictionary's
    gradient is unchanged, and the value gradient there is 0, which is what ReLU passes back."""
    from e2edict.saes import ReLUSAE

    torch.manual_seed(4)
    sae = ReLUSAE(6, 50).double()
    W = sae.W_dec
    idx = torch.randint(0, 50, (7, 5))
    pre = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(7, 6, dtype=torch.float64)
    out = {}
    for skip in (False, True):
        vals = torch.relu(pre)
        y = sae.gather_decode(vals, idx, zero_is_inactive=skip)
        out[skip] = (y, *torch.autograd.grad((y * g).sum(), [pre, W]))
    assert (torch.relu(pre) == 0).any()
    for u, v in zip(out[True], out[False], strict=True):
        torch.testing.assert_close(u, v, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu", "gated"])
def test_fused_adam_steps_equal_the_plain_adam_steps(arch):
    """torch's fused CPU Adam treats a parameter, its gradient and its state as flat memory (a
    strided parameter is slow, and wrong once its state is restored contiguous). Every parameter
    and gradient is contiguous, and the trainer's optimizer takes the same steps as plain Adam."""
    from e2edict.optim import make_optimizer

    kw = {"topk": {"k": 4}, "jumprelu": {"init_threshold": 0.1}}.get(arch, {})
    torch.manual_seed(0)
    saes = [registry[arch](16, 512, **kw) for _ in range(2)]
    saes[1].load_state_dict(saes[0].state_dict())
    if arch == "relu":
        for s in saes:
            with torch.no_grad():
                s.b_enc.sub_(1.5)
    opts = [make_optimizer(list(saes[0].parameters()), 1e-2), torch.optim.Adam(saes[1].parameters(), lr=1e-2, foreach=False)]
    x = torch.randn(6, 16)
    for _ in range(3):
        for s, o in zip(saes, opts, strict=True):
            a, c = s(x)
            ((a - x).square().mean() + s.sparsity_loss(x, c, 1.0)).backward()
            assert all(p.is_contiguous() and p.grad.is_contiguous() for p in s.parameters() if p.grad is not None)
            o.step()
            o.zero_grad(set_to_none=True)
    for (n, p), q in zip(saes[0].named_parameters(), saes[1].parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)


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


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "gated"])
@pytest.mark.parametrize("preset", ["local", "e2e", "e2e+ds"])
def test_every_architecture_trains_with_every_preset(tmp_path, arch, preset, capsys):
    """Through the CLI on the embedded model."""
    out = tmp_path / "run"
    lam = 0.0 if arch in ("topk", "batchtopk") else 0.5
    rc = cli_main(
        [
            "train",
            str(ROOT / "configs/tiny/e2e.yaml"),
            "model.name=tiny",
            "data.n_ctx=32",
            "saes.positions=[blocks.2.hook_resid_pre]",
            f"saes.architecture={arch}",
            "saes.k=8",
            "saes.dict_ratio=4",
            f"loss.preset={preset}",
            f"loss.sparsity.coeff={lam}",
            "train.tokens=2048",
            "train.batch_size=8",
            "train.log_every=1",
            "train.eval_every_tokens=null",
            "eval.tokens=1024",
            "eval.alive_tokens=1024",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6, 7, 8]
    if arch == "gated" and preset == "local":
        assert "aux/blocks.2.hook_resid_pre" in rows[0]
    m = json.loads((out / "eval.json").read_text())["saes"]["blocks.2.hook_resid_pre"]
    if arch == "topk":
        assert m["l0"] <= 8 + 1e-9
    sae = e2edict.load_saes(out)["blocks.2.hook_resid_pre"]
    assert type(sae).architecture == arch
    x = torch.randn(2, 5, 128)
    sae.eval()
    again = e2edict.load_saes(out)["blocks.2.hook_resid_pre"].eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x)[0], sae(x)[0], atol=0, rtol=0)


def test_warm_start_from_a_local_run(tmp_path, small_gpt2_dir, capsys):
    base = [
        str(ROOT / "configs/tiny/local.yaml"),
        f"model.name={small_gpt2_dir}",
        "data.n_ctx=32",
        "saes.positions=[blocks.1.hook_resid_pre]",
        "saes.dict_ratio=4",
        "train.tokens=2048",
        "train.batch_size=8",
        "train.eval_every_tokens=null",
        "eval.tokens=1024",
        "eval.alive_tokens=1024",
        "--quiet",
    ]
    assert cli_main(["train", *base, "--out", str(tmp_path / "local")]) == 0
    start = e2edict.load_saes(tmp_path / "local")["blocks.1.hook_resid_pre"]
    rc = cli_main(
        [
            "train",
            *base,
            "loss.preset=e2e",
            f"saes.init_from={tmp_path / 'local'}",
            "train.lr=1e-12",
            "--out",
            str(tmp_path / "ft"),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    ft = e2edict.load_saes(tmp_path / "ft")["blocks.1.hook_resid_pre"]
    for a, b in zip(start.parameters(), ft.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    cfg = json.loads((tmp_path / "ft/saes/blocks.1.hook_resid_pre/cfg.json").read_text())
    assert cfg["metadata"]["e2edict_loss_preset"] == "e2e"

    capsys.readouterr()
    rc = cli_main(
        ["train", *base, "saes.architecture=gated", f"saes.init_from={tmp_path / 'local'}", "--out", str(tmp_path / "bad")]
    )
    assert rc == 2 and "is a relu SAE but saes.architecture is 'gated'" in capsys.readouterr().err
    rc = cli_main(
        [
            "train",
            *base,
            "saes.positions=[blocks.2.hook_resid_pre]",
            f"saes.init_from={tmp_path / 'local'}",
            "--out",
            str(tmp_path / "bad"),
        ]
    )
    assert rc == 2 and "has no SAE at blocks.2.hook_resid_pre" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


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


@pytest.mark.parametrize("b_dec_in,chunked", [(False, False), (True, False), (True, True)])
def test_relu_sparse_path_matches_dense_exactly_in_float64(b_dec_in, chunked, monkeypatch):
    """The sparse path (top active pre-activations, sparse encoder backward, gather decode) against
    the dense formula, values and every gradient, including through b_dec on the input side, and
    with the sparse backwards working one token at a time."""
    from e2edict.saes import ReLUSAE, sparse

    if chunked:
        monkeypatch.setattr(sparse, "GATHER_CHUNK_ELEMENTS", 1)

    torch.manual_seed(1)
    sae = ReLUSAE(16, 512, apply_b_dec_to_input=b_dec_in).double()
    with torch.no_grad():
        sae.b_enc.sub_(1.5)
    x = torch.randn(3, 9, 16, dtype=torch.float64, requires_grad=True)
    sae.sparse_decode = True
    a, c = sae(x)
    params = [x, sae.W_enc_T, sae.W_dec, sae.b_enc, sae.b_dec]
    w_c = torch.rand(3, 9, 512, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    g = torch.autograd.grad(a.square().sum() + (w_c * c).sum(), params)  # a gradient into the codes that differs per entry
    xin = x - sae.b_dec if b_dec_in else x
    c_ref = torch.relu(xin @ sae.W_enc + sae.b_enc)
    a_ref = c_ref @ (sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)) + sae.b_dec
    g_ref = torch.autograd.grad(a_ref.square().sum() + (w_c * c_ref).sum(), params)
    assert 0 < (c_ref > 0).sum() < c_ref.numel() // 4  # sparse: the zero codes are most of c
    torch.testing.assert_close(a, a_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(c, c_ref, atol=1e-12, rtol=0)
    for u, v in zip(g, g_ref, strict=True):
        torch.testing.assert_close(u, v, atol=1e-9, rtol=1e-9)
    with torch.no_grad():  # the evaluation path (no graph) gives the same codes and reconstruction
        a_eval, c_eval = sae(x)
    torch.testing.assert_close(a_eval, a_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(c_eval, c_ref, atol=1e-12, rtol=0)


def test_relu_sparse_decode_matches_dense_with_gradients():
    from e2edict.saes import ReLUSAE

    torch.manual_seed(0)
    sae = ReLUSAE(16, 512)
    with torch.no_grad():
        sae.b_enc.sub_(1.5)  # low L0
    x = torch.randn(3, 9, 16)
    sae.sparse_decode = True
    a_sparse, c = sae(x)
    assert 0 < (c != 0).sum(-1).float().mean() < 512 * base.SPARSE_DECODE_FRACTION  # mean L0 decides for ReLU
    g_sparse = torch.autograd.grad(a_sparse.square().sum(), [sae.W_enc_T, sae.W_dec, sae.b_enc, sae.b_dec])
    sae.sparse_decode = False
    a_dense, _ = sae(x)
    g_dense = torch.autograd.grad(a_dense.square().sum(), [sae.W_enc_T, sae.W_dec, sae.b_enc, sae.b_dec])
    torch.testing.assert_close(a_sparse, a_dense, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_sparse, g_dense, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    sae.sparse_decode = None  # automatic: this L0 is below the crossover, so the sparse path
    a_auto = sae(x)[0]
    assert uses_gather_decode(a_auto) and not uses_gather_decode(a_dense)
    torch.testing.assert_close(a_auto, a_dense, atol=1e-5, rtol=1e-5)


def test_relu_automatic_path_at_high_l0_falls_back_to_dense_with_the_same_gradients():
    """At a high L0 the automatic path (the product formed latent-major under autograd, then the
    dense fallback) gives the dense path's codes, reconstruction and gradients."""
    from e2edict.saes import ReLUSAE

    torch.manual_seed(3)
    sae = ReLUSAE(16, 256)
    x = torch.randn(2, 7, 16)
    params = [sae.W_enc_T, sae.W_dec, sae.b_enc, sae.b_dec]
    w_c = torch.rand(2, 7, 256, generator=torch.Generator().manual_seed(5))
    results = {}
    for mode in (None, False):
        sae.sparse_decode = mode
        a, c = sae(x)
        results[mode] = (a, c, torch.autograd.grad(a.square().sum() + (w_c * c).sum(), params), uses_gather_decode(a))
    (a_auto, c_auto, g_auto, gather_auto), (a_dense, c_dense, g_dense, _) = results[None], results[False]
    assert (c_dense > 0).float().mean() > base.SPARSE_DECODE_FRACTION and not gather_auto  # dense: no gather decode
    torch.testing.assert_close(c_auto, c_dense, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a_auto, a_dense, atol=1e-5, rtol=1e-5)
    for u, v in zip(g_auto, g_dense, strict=True):
        torch.testing.assert_close(u, v, atol=1e-4, rtol=1e-4)


def test_pairs_of_a_latent_major_mask_equal_those_of_the_contiguous_mask():
    from e2edict.saes.sparse import Pairs

    mask = torch.rand(37, 200, generator=torch.Generator().manual_seed(0)) < 0.05
    mask[5] = False  # a token with no pairs
    latent_major = mask.T.contiguous().T  # the same mask, stored [d_sae, tokens]
    assert not latent_major.is_contiguous()
    got = Pairs.of_mask(latent_major)
    tok, lat = mask.nonzero(as_tuple=True)
    assert torch.equal(got.tok, tok) and torch.equal(got.lat, lat) and got.n_tokens == 37
    per_token = mask.sum(1)  # where each token's pairs start, counted here from the mask
    assert torch.equal(got.offsets, torch.cumsum(per_token, 0) - per_token)


def uses_gather_decode(out: torch.Tensor) -> bool:
    """Whether the autograd graph behind ``out`` holds the sparse gather decode."""
    seen, todo = set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if "GatherDecode" in type(fn).__name__:
            return True
        todo.extend(f for f, _ in fn.next_functions)
    return False


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
