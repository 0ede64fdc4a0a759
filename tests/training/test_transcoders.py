"""Transcoders: a transcoder that reproduces its MLP leaves the model unchanged; local and
shared-prefix e2e losses and gradients against hand / naive computations (float64, both
backbones, one and several transcoders); SAELens round trips; bad positions."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from e2edict.config import load_config
from e2edict.errors import E2EDictError
from e2edict.losses import kl_loss
from e2edict.saes import Writes, load_sae, registry, save_sae
from e2edict.splice import LossWeights, evaluation_forward, training_forward

W = {"e2e": dict(kl=1.0), "e2e+ds": dict(kl=0.5, downstream=2.5), "local": dict(local=1.0)}


@pytest.fixture(scope="module")
def relu_tl():
    """A 3-layer TransformerLens model built in code whose MLPs use ReLU."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from e2edict.backbones import TLBackbone

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=3, d_model=16, n_heads=2, d_head=8, d_mlp=24, d_vocab=50, n_ctx=16, act_fn="relu",
        normalization_type="LN", seed=0,
    )  # fmt: skip
    model = HookedTransformer(cfg)
    with torch.no_grad():  # non-trivial LayerNorm affines, so the transcoder must absorb them
        for b in model.blocks:
            b.ln2.w.uniform_(0.5, 1.5)
            b.ln2.b.normal_(0, 0.3)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return TLBackbone(model, "relu-tl")


@pytest.fixture(scope="module")
def linear_hf(tmp_path_factory):
    """A 3-layer GPT-2 whose MLP activation is the identity (a linear MLP), Hugging Face backbone."""
    from conftest import random_gpt2

    from e2edict.run import open_backbone

    model = random_gpt2(
        1, vocab_size=50, n_positions=16, n_embd=16, n_layer=3, n_head=2, n_inner=24, activation_function="linear"
    )
    path = tmp_path_factory.mktemp("linear_gpt2")
    model.save_pretrained(path, safe_serialization=True)
    return open_backbone(str(path), backend="huggingface")


def tl_mlp_transcoder(bb, layer: int):
    """A ReLU transcoder equal to block ``layer``'s MLP (LayerNorm affine and decoder norms absorbed)."""
    blk = bb.model.blocks[layer]
    W_in = blk.ln2.w[:, None] * blk.mlp.W_in  # reads ln2.hook_normalized, before the LN's affine
    b_in = blk.ln2.b @ blk.mlp.W_in + blk.mlp.b_in
    r = blk.mlp.W_out.norm(dim=1)
    tc = registry["relu"](16, 24, f"blocks.{layer}.ln2.hook_normalized", writes=Writes(16, f"blocks.{layer}.hook_mlp_out"))
    with torch.no_grad():
        tc.W_enc.copy_(W_in * r)
        tc.b_enc.copy_(b_in * r)
        tc.W_dec.copy_(blk.mlp.W_out)
        tc.b_dec.copy_(blk.mlp.b_out)
    return tc


def test_transcoders_reproducing_relu_mlps_leave_logits_unchanged(relu_tl):
    tcs = {tc.hook_name: tc for tc in (tl_mlp_transcoder(relu_tl, i) for i in range(3))}
    tokens = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(0))
    out = evaluation_forward(relu_tl, tcs, tokens, [])
    torch.testing.assert_close(out.logits_spliced, relu_tl.model(tokens), atol=1e-5, rtol=1e-5)
    assert kl_loss(out.logits_clean, out.logits_spliced).item() == pytest.approx(0.0, abs=1e-6)
    for h in tcs:  # each one's output equals the MLP output it replaced
        torch.testing.assert_close(out.recons[h], out.targets[h], atol=1e-5, rtol=1e-5)


def test_linear_mlp_reproduced_by_transcoder_and_by_skip_transcoder(linear_hf):
    """A linear MLP ``x A W_out + ...`` as a ReLU transcoder (codes relu(±(xA + a))) and as a skip
    transcoder (the skip path alone, every latent off): logits unchanged either way."""
    tokens = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(2))
    ref = linear_hf.model(input_ids=tokens).logits
    mlp = linear_hf.model.transformer.h[1].mlp
    A, a, Wo, bo = mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight, mlp.c_proj.bias
    h = "transformer.h.1.mlp:input"
    plain = registry["relu"](16, 48, h, writes=Writes(16, "transformer.h.1.mlp"))
    skip = registry["relu"](16, 8, h, writes=Writes(16, "transformer.h.1.mlp", skip=True))
    with torch.no_grad():
        # decoder rows of unit norm (the normalisation leaves them be); the codes carry the row norms
        n = Wo.norm(dim=1)
        plain.W_enc.copy_(torch.cat([A * n, -A * n], 1))
        plain.b_enc.copy_(torch.cat([a * n, -a * n]))
        plain.W_dec.copy_(torch.cat([Wo / n[:, None], -Wo / n[:, None]], 0))
        plain.b_dec.copy_(bo)
        skip.W_skip.copy_((A @ Wo).T)
        skip.b_enc.fill_(-1e4)  # every latent off
        skip.b_dec.copy_(a @ Wo + bo)
    for tc in (plain, skip):
        out = evaluation_forward(linear_hf, {h: tc}, tokens, [])
        torch.testing.assert_close(out.logits_spliced, ref, atol=1e-4, rtol=1e-4)


def test_local_loss_equals_hand_computation(relu_tl):
    torch.manual_seed(3)
    h, out_hook = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
    tc = registry["relu"](16, 40, h, writes=Writes(16, out_hook))
    tokens = torch.randint(0, 50, (2, 12))
    got = training_forward(relu_tl, {h: tc}, tokens, LossWeights(sparsity={h: 0.7}, local=1.0))
    _, cache = relu_tl.model.run_with_cache(tokens)
    x, y = cache[h], cache[out_hook]
    c = torch.relu(x @ tc.W_enc + tc.b_enc)
    pred = c @ (tc.W_dec / tc.W_dec.norm(dim=1, keepdim=True)) + tc.b_dec
    mse = ((pred - y) ** 2).mean()
    sparsity = c.abs().sum(-1).mean() / 16
    assert got.terms[f"local/{h}"].item() == pytest.approx(mse.item(), rel=1e-5)
    assert got.loss.item() == pytest.approx((mse + 0.7 * sparsity).item(), rel=1e-5)


def naive_tl(model, tcs, tokens, w, ds):
    """Two full passes: clean, then with every transcoder's input read and its output written."""
    clean_acts = {}
    logits_clean = model.run_with_hooks(tokens, fwd_hooks=[(d, lambda a, hook: clean_acts.__setitem__(hook.name, a)) for d in ds])
    store, spliced_acts, hooks = {}, {}, []
    for h, tc in tcs.items():
        hooks.append((h, lambda a, hook, h=h: store.__setitem__(h, tcs[h](a)) or None))
        hooks.append((tc.hook_name_out, lambda a, hook, h=h: store[h][0]))
    hooks += [(d, lambda a, hook: spliced_acts.__setitem__(hook.name, a)) for d in ds]
    logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    return _naive_total(logits_clean, logits, store, tcs, w, clean_acts, spliced_acts, ds)


def naive_hf(model, tcs, tokens, w, ds):
    def run(replace: bool, acts: dict):
        handles, store = [], {}
        if replace:
            for h in tcs:
                mod = model.get_submodule(h.removesuffix(":input"))
                handles.append(mod.register_forward_pre_hook(lambda m, args, h=h: store.__setitem__(h, tcs[h](args[0])) or None))
                handles.append(mod.register_forward_hook(lambda m, args, o, h=h: store[h][0]))
        for d in ds:
            mod = model.get_submodule(d.removesuffix(":input"))
            if d.endswith(":input"):
                handles.append(
                    mod.register_forward_pre_hook(
                        lambda m, args, kw, d=d: acts.__setitem__(d, args[0] if args else kw["hidden_states"]), with_kwargs=True
                    )
                )
            else:
                handles.append(
                    mod.register_forward_hook(lambda m, args, o, d=d: acts.__setitem__(d, o[0] if isinstance(o, tuple) else o))
                )
        try:
            return model(input_ids=tokens).logits, store
        finally:
            for hd in handles:
                hd.remove()

    clean_acts, spliced_acts = {}, {}
    with torch.no_grad():
        logits_clean, _ = run(False, clean_acts)
    logits, store = run(True, spliced_acts)
    return _naive_total(logits_clean, logits, store, tcs, w, clean_acts, spliced_acts, ds)


def _naive_total(logits_clean, logits, store, tcs, w, clean_acts, spliced_acts, ds):
    lc, ls = F.log_softmax(logits_clean.detach(), -1), F.log_softmax(logits, -1)
    total = w.kl * (lc.exp() * (lc - ls)).sum(-1).mean()
    for h, tc in tcs.items():
        total = total + w.sparsity[h] * store[h][1].norm(p=1, dim=-1).mean() / tc.d_in
    if ds:
        total = total + w.downstream / len(ds) * sum(((spliced_acts[d] - clean_acts[d].detach()) ** 2).mean() for d in ds)
    return total


@pytest.mark.parametrize("preset", ["e2e", "e2e+ds"])
@pytest.mark.parametrize("layers", [[1], [0, 2]])
@pytest.mark.parametrize("backend", ["transformer_lens", "huggingface"])
def test_shared_prefix_matches_naive_two_pass(relu_tl, linear_hf, backend, layers, preset):
    bb = relu_tl if backend == "transformer_lens" else linear_hf
    model = bb.model.double()
    try:
        torch.manual_seed(4)
        tcs = {}
        for i in layers:
            src, dst = bb.mlp_pairs()[f"blocks.{i}.mlp" if backend == "transformer_lens" else f"transformer.h.{i}.mlp"]
            tcs[src] = registry["relu"](16, 40, src, writes=Writes(16, dst)).double()
        ds = (
            bb.resid_hooks_after(max((tc.hook_name_out for tc in tcs.values()), key=bb.block_order)) if preset == "e2e+ds" else []
        )
        w = LossWeights(sparsity={h: 0.5 + i for i, h in enumerate(tcs)}, downstream_positions=ds, **W[preset])
        tokens = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(5))
        ours = training_forward(bb, tcs, tokens, w).loss
        ours.backward()
        g_ours = {n: p.grad.clone() for h, s in tcs.items() for n, p in s.named_parameters(prefix=h)}
        for s in tcs.values():
            s.zero_grad()
        ref = (naive_tl if backend == "transformer_lens" else naive_hf)(model, tcs, tokens, w, ds)
        ref.backward()
        g_ref = {n: p.grad.clone() for h, s in tcs.items() for n, p in s.named_parameters(prefix=h)}
        assert ours.item() == pytest.approx(ref.item(), rel=1e-9)
        for n in g_ref:
            torch.testing.assert_close(g_ours[n], g_ref[n], rtol=1e-7, atol=1e-10)
            assert g_ref[n].abs().sum() > 0
    finally:
        model.float()


@pytest.mark.parametrize(
    "arch,skip", [("relu", False), ("relu", True), ("jumprelu", False), ("jumprelu", True), ("batchtopk", False)]
)
def test_saelens_loads_transcoders_and_computes_the_same(tmp_path, arch, skip):
    sae_lens = pytest.importorskip("sae_lens")
    torch.manual_seed(0)
    writes = Writes(24, "blocks.1.hook_mlp_out", skip=skip)
    tc = registry[arch](16, 64, "blocks.1.ln2.hook_normalized", writes=writes, **({"k": 4} if arch == "batchtopk" else {}))
    x = torch.randn(30, 16)
    with torch.no_grad():
        if skip:
            tc.W_skip.normal_()
        if arch == "jumprelu":
            tc.log_threshold.fill_(-1.0)
        tc.train()
        tc(x)  # BatchTopK: sets the threshold
    tc.eval()
    save_sae(tc, tmp_path / "t")
    cfg = json.loads((tmp_path / "t/cfg.json").read_text())
    want = {"relu": "transcoder", "jumprelu": "jumprelu_transcoder", "batchtopk": "jumprelu_transcoder"}[arch]
    assert cfg["architecture"] == (want.replace("transcoder", "skip_transcoder") if skip else want)
    assert cfg["d_out"] == 24 and cfg["hook_name_out"] == "blocks.1.hook_mlp_out"
    assert cfg["metadata"]["hook_name"] == "blocks.1.ln2.hook_normalized"
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "t"))
    with torch.no_grad():
        ours, codes = tc(x)
        torch.testing.assert_close(theirs.encode(x), codes, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs(x), ours, atol=1e-5, rtol=1e-5)
        mine = load_sae(tmp_path / "t").eval()
        assert (mine.hook_name_out, mine.d_out, mine.kind) == (tc.hook_name_out, 24, tc.kind)
        torch.testing.assert_close(mine(x)[0], ours, atol=1e-6, rtol=1e-6)


def test_topk_transcoder_round_trip_in_e2edict(tmp_path):
    torch.manual_seed(0)
    tc = registry["topk"](16, 64, "a", k=4, writes=Writes(24, "b", skip=True))
    with torch.no_grad():
        tc.W_skip.normal_()
    save_sae(tc, tmp_path / "t")
    assert json.loads((tmp_path / "t/cfg.json").read_text())["architecture"] == "topk_skip_transcoder"
    x = torch.randn(7, 16)
    torch.testing.assert_close(load_sae(tmp_path / "t")(x)[0], tc(x)[0], atol=1e-6, rtol=1e-6)


def cfg_with(positions, kind="transcoder", **saes):
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    over = [f"saes.positions={json.dumps(positions)}", f"saes.kind={kind}", "train.tokens=4096", "eval.tokens=2048"]
    over += [f"saes.{k}={v}" for k, v in saes.items()]
    return load_config(root / "configs/tiny/e2e.yaml", over)


@pytest.mark.parametrize(
    "positions,kind,extra,message",
    [
        (["blocks.1.hook_mlp_out -> blocks.1.ln2.hook_normalized"], "transcoder", {}, "does not come after its input"),
        (["blocks.1.ln2.hook_normalized -> blocks.1.nonsense"], "transcoder", {}, "unknown hook name"),
        (["blocks.1.attn"], "transcoder", {}, "must be 'INPUT_HOOK -> OUTPUT_HOOK' or an MLP"),
        (["blocks.1.ln2.hook_normalized -> blocks.1.hook_mlp_out"], "sae", {}, "names a pair of hooks"),
        (["blocks.1.mlp"], "transcoder", {"architecture": "gated"}, "transcoders take relu"),
        (["blocks.1.mlp", "blocks.1.ln2.hook_normalized -> blocks.2.hook_mlp_out"], "transcoder", {}, "both read"),
    ],
)
def test_bad_transcoder_positions_end_in_one_clear_error(positions, kind, extra, message):
    from e2edict.run import setup_run

    with pytest.raises(E2EDictError, match=message) as e:
        setup_run(cfg_with(positions, kind, **extra))
    assert "\n" not in str(e.value)


def test_loaded_transcoder_whose_width_does_not_fit_is_refused(tmp_path):
    from e2edict.run import open_backbone

    bb = open_backbone("tiny")
    tc = registry["relu"](128, 256, "blocks.1.ln2.hook_normalized", writes=Writes(64, "blocks.1.hook_mlp_out"))
    with pytest.raises(E2EDictError, match="writes d_out=64 but 'blocks.1.hook_mlp_out' has width 128"):
        bb.check_saes({"blocks.1.ln2.hook_normalized": tc})


@pytest.mark.slow
def test_transcoder_runs_through_cli_eval_compare_report_and_init_from(tmp_path):
    """Local transcoders at two MLPs, then an e2e fine-tune from them (init_from); eval.json's
    transcoder metrics; compare (per-run table, mean-L0 plot) and report take the runs."""
    from e2edict.cli import main as cli_main

    base = [
        "configs/tiny/e2e.yaml",
        'saes.positions=["blocks.1.mlp", "blocks.2.ln2.hook_normalized -> blocks.2.hook_mlp_out"]',
        "saes.kind=transcoder",
        "train.tokens=8192",
        "train.log_every=1",
        "eval.tokens=4096",
        "eval.alive_tokens=4096",
        "--quiet",
    ]
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    base[0] = str(root / base[0])
    assert cli_main(["train", *base, "loss.preset=local", "--out", str(tmp_path / "local")]) == 0
    ev = json.loads((tmp_path / "local/eval.json").read_text())
    m = ev["saes"]["blocks.1.ln2.hook_normalized"]
    assert m["kind"] == "transcoder" and m["hook_name_out"] == "blocks.1.hook_mlp_out"
    assert {"ce_loss_mean_ablation", "ce_loss_score", "explained_variance", "l0", "alive"} <= set(m)
    assert "ce_loss_zero_ablation" not in m and m["ce_loss_mean_ablation"] > ev["ce_loss_clean"]
    cfg = json.loads((tmp_path / "local/saes/blocks.2.ln2.hook_normalized/cfg.json").read_text())
    assert cfg["architecture"] == "transcoder" and cfg["hook_name_out"] == "blocks.2.hook_mlp_out"
    rc = cli_main(["train", *base, "loss.preset=e2e", f"saes.init_from={tmp_path / 'local'}", "--out", str(tmp_path / "e2e")])
    assert rc == 0
    bad = ["train", *base, "saes.kind=skip_transcoder", f"saes.init_from={tmp_path / 'local'}", "--out", str(tmp_path / "x")]
    assert cli_main(bad) == 2 and not (tmp_path / "x").exists()
    assert cli_main(["compare", str(tmp_path / "local"), str(tmp_path / "e2e"), "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp/mean_l0_vs_ce.png").stat().st_size > 0
    table = (tmp_path / "cmp/per_run.md").read_text().splitlines()
    assert len(table) == 4 and all("| tiny-e2e" in row for row in table[2:])  # one row per run, two SAEs each
    assert cli_main(["report", str(tmp_path / "e2e"), "--tokens", "2048"]) == 0
    assert "blocks.1.ln2.hook_normalized" in (tmp_path / "e2e/report/index.html").read_text()


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu"])
@pytest.mark.parametrize("preset", ["local", "e2e", "e2e+ds"])
@pytest.mark.parametrize("skip", [False, True])
def test_every_activation_trains_as_transcoder_with_every_loss(relu_tl, arch, preset, skip):
    """One step of every activation x loss x kind: finite loss, a gradient for every parameter,
    and the transcoder's output (not its input) judged by the local term."""
    torch.manual_seed(6)
    src, dst = relu_tl.mlp_pairs()["blocks.1.mlp"]
    tc = registry[arch](16, 48, src, writes=Writes(16, dst, skip=skip), **({"k": 4} if "topk" in arch else {}))
    ds = relu_tl.resid_hooks_after(dst) if preset == "e2e+ds" else []
    w = LossWeights(sparsity={src: 0.1}, downstream_positions=ds, **W[preset])
    out = training_forward(relu_tl, {src: tc}, torch.randint(0, 50, (2, 10)), w)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert out.recons[src].shape[-1] == 16 and out.targets[src] is not out.inputs[src]
    for n, p in tc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    if skip:
        assert tc.W_skip.grad.abs().sum() > 0


def test_clean_inputs_feed_each_transcoder_the_original_models_activation(relu_tl):
    """loss.transcoder_input: clean: every transcoder reads the clean run's activation, its output
    still replaces its MLP's in the spliced run; loss and gradients against two hand-made passes."""
    model = relu_tl.model.double()
    try:
        torch.manual_seed(6)
        tcs = {}
        for i in (0, 2):
            src, dst = relu_tl.mlp_pairs()[f"blocks.{i}.mlp"]
            tcs[src] = registry["relu"](16, 40, src, writes=Writes(16, dst)).double()
        w = LossWeights(sparsity={h: 0.3 for h in tcs}, local=1.0, kl=0.7, clean_inputs=True)
        tokens = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(7))
        out = training_forward(relu_tl, tcs, tokens, w)
        out.loss.backward()
        ours = {n: p.grad.clone() for h, s in tcs.items() for n, p in s.named_parameters(prefix=h)}
        for s in tcs.values():
            s.zero_grad()
        with torch.no_grad():
            logits_clean, cache = model.run_with_cache(tokens)
        made = {h: tc(cache[h]) for h, tc in tcs.items()}  # the clean inputs, not the spliced run's
        hooks = [(tc.hook_name_out, lambda a, hook, h=h: made[h][0]) for h, tc in tcs.items()]
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
        lc, ls = F.log_softmax(logits_clean, -1), F.log_softmax(logits, -1)
        total = 0.7 * (lc.exp() * (lc - ls)).sum(-1).mean()
        for h, tc in tcs.items():
            total = total + ((made[h][0] - cache[tc.hook_name_out]) ** 2).mean() + 0.3 * made[h][1].abs().sum(-1).mean() / 16
        total.backward()
        assert out.loss.item() == pytest.approx(total.item(), rel=1e-9)
        for h in tcs:
            torch.testing.assert_close(out.inputs[h], cache[h])
        for n, p in ((n, p) for h, s in tcs.items() for n, p in s.named_parameters(prefix=h)):
            torch.testing.assert_close(ours[n], p.grad, rtol=1e-7, atol=1e-10)
            assert p.grad.abs().sum() > 0
    finally:
        model.float()


def test_normalized_local_loss_is_the_fraction_of_variance_unexplained(relu_tl):
    torch.manual_seed(8)
    h, out_hook = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
    tc = registry["relu"](16, 40, h, writes=Writes(16, out_hook))
    tokens = torch.randint(0, 50, (2, 12))
    got = training_forward(relu_tl, {h: tc}, tokens, LossWeights(sparsity={h: 0.0}, local=1.0, local_normalize=True))
    _, cache = relu_tl.model.run_with_cache(tokens)
    y = cache[out_hook].reshape(-1, 16)
    pred = tc(cache[h])[0].reshape(-1, 16)
    fvu = ((pred - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    assert got.terms[f"local/{h}"].item() == pytest.approx(fvu.item(), rel=1e-5)
    got.loss.backward()  # the variance is a constant: the gradient is the MSE's over it
    grad = tc.b_dec.grad.clone()
    tc.zero_grad()
    (((tc(cache[h])[0].reshape(-1, 16) - y) ** 2).mean() / ((y - y.mean(0)) ** 2).mean().detach()).backward()
    torch.testing.assert_close(grad, tc.b_dec.grad)


def test_clean_inputs_are_for_transcoders_only():
    from pathlib import Path

    with pytest.raises(E2EDictError, match="loss.transcoder_input: clean is for transcoders"):
        load_config(Path(__file__).resolve().parents[2] / "configs/tiny/e2e.yaml", ["loss.transcoder_input=clean"])
