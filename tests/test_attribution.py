"""Attribution graphs and circuit-tracer's graph scores (`e2edict.attribution`): the scores of a
hand-made graph worked out by hand and by the matrix inverse; a real graph's edges on the embedded
model against forward perturbations of a frozen copy (attention patterns and norm scales replaced by
the clean run's, each MLP's output by its clean value plus the skip path's change), which is linear,
so adding a source's vector moves a target by exactly its direct effect; circuit-tracer's own
``attribute`` and ``compute_graph_scores`` (0.5.0, in its own environment) on the same transcoders
and prompt; eval.json's ``graph`` and compare's columns for a trained run; what cannot be traced
says why."""

import json
import subprocess

import pytest
import torch
from conftest import ENV, ROOT, circuit_tracer_python, cli_cmd
from safetensors.torch import load_file, save_file

from e2edict.attribution import Graph, attribution_graph, graph_scores, influence
from e2edict.saes import registry
from e2edict.saes.base import Writes
from e2edict.saes.circuit_tracer_format import export_circuit_tracer, transcoder_set


def test_scores_of_a_hand_made_graph():
    # nodes: feature f, error e, token t, logit; the logit reads f (3) and e (-2), f reads t (5)
    A = torch.zeros(4, 4)
    A[3, 0], A[3, 1], A[0, 2] = 3.0, -2.0, 5.0
    g = Graph(A, torch.tensor([[0, 1, 7]]), n_errors=1, n_tokens=1, logit_probabilities=torch.tensor([1.0]))
    replacement, completeness = graph_scores(g)
    # |A| row-normalised: logit <- f 0.6, e 0.4; f <- t 1. Influence: f 0.6, e 0.4, t 0.6 (through f)
    assert replacement == pytest.approx(0.6 / (0.6 + 0.4))
    # non-error share of each row's inputs (1, 1, 1, 0.6) weighted by influence + logit weight (0.6, 0.4, 0.6, 1)
    assert completeness == pytest.approx((0.6 + 0.4 + 0.6 + 0.6) / 2.6)


def test_influence_is_the_sum_over_paths_of_every_length():
    torch.manual_seed(0)
    n = 9
    A = torch.rand(n, n).tril(-1) * (torch.rand(n, n) > 0.4)  # a DAG: edges from earlier nodes only
    w = torch.rand(n)
    expected = w @ (torch.linalg.inv(torch.eye(n) - A) - torch.eye(n))
    torch.testing.assert_close(influence(A, w), expected, rtol=1e-5, atol=1e-6)


def random_transcoders(d: int, skip: bool, arch: str = "relu", seed: int = 0, **kw) -> dict:
    torch.manual_seed(seed)
    out = {}
    for layer in range(4):
        writes = Writes(d, f"blocks.{layer}.hook_mlp_out", skip)
        sae = registry[arch](d, 64, f"blocks.{layer}.ln2.hook_normalized", writes=writes, **kw)
        with torch.no_grad():
            for p in sae.parameters():
                p.add_(0.05 * torch.randn_like(p))
        out[sae.hook_name] = sae.eval()
    return out


def prompt(model, n: int = 10) -> torch.Tensor:
    toks = model.to_tokens("The cat sat on the mat because it was", prepend_bos=True)[0][:n]
    return toks


def perturbed_read(model, cache, saes, tokens, where: str, delta: torch.Tensor, read: tuple) -> float:
    """Target ``read`` = (hook, position, vector) in the frozen copy with ``delta`` [d] added at
    ``where`` = (hook, position)."""
    hook_add, pos_add = where
    skips = {f"blocks.{i}.hook_mlp_out": s for i, s in enumerate(saes.values())}
    got = {}

    def fix(act, hook):
        return cache[hook.name]

    def mlp(act, hook):
        x_now, x_clean = (
            got[hook.name.replace("hook_mlp_out", "ln2.hook_normalized")],
            cache[hook.name.replace("hook_mlp_out", "ln2.hook_normalized")],
        )
        W = skips[hook.name].W_skip
        out = cache[hook.name].clone()
        if W is not None:
            out = out + (x_now - x_clean) @ W.T
        return out

    def keep(act, hook):
        got[hook.name] = act

    def add(act, hook):
        act = act.clone()
        act[0, pos_add] += delta
        return act

    def read_at(name: str) -> bool:
        return name.endswith("ln2.hook_normalized") or name == "unembed.hook_in"  # the final norm's output

    frozen = (lambda n: n.endswith(("hook_pattern", "hook_scale")), fix)
    hooks = [frozen, (read_at, keep), (lambda n: n.endswith("hook_mlp_out"), mlp), (hook_add, add)]
    with torch.no_grad():
        model.run_with_hooks(tokens[None], fwd_hooks=hooks)
    hook, pos, vec = read
    return float(got[hook][0, pos] @ vec)


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
def test_each_edge_is_the_direct_effect_in_the_frozen_model(tiny_model, skip):
    model = tiny_model
    saes = random_transcoders(model.cfg.d_model, skip)
    config, layers = transcoder_set(saes, "tiny", 4)
    tokens = prompt(model)
    g = attribution_graph(model, config, layers, tokens)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens[None])
        recon = {i: s(cache[f"blocks.{i}.ln2.hook_normalized"][0])[0] for i, s in enumerate(saes.values())}
        codes = {i: s.encode(cache[f"blocks.{i}.ln2.hook_normalized"][0]) for i, s in enumerate(saes.values())}
    # the feature nodes: every positive code but at position 0, in (layer, position, latent) order
    expected = []
    for layer, c in codes.items():
        for pos, latent in c.nonzero().tolist():
            if pos > 0:
                expected.append([layer, pos, latent])
    assert g.features.tolist() == expected
    assert g.n_features > 50
    P = len(tokens)

    def source(k: int):  # (write hook, position, vector) of node k
        if k < g.n_features:
            layer, pos, latent = g.features[k].tolist()
            return f"blocks.{layer}.hook_mlp_out", pos, codes[layer][pos, latent] * layers[layer]["W_dec"][latent]
        if k < g.n_features + 4 * P:
            layer, pos = divmod(k - g.n_features, P)
            err = cache[f"blocks.{layer}.hook_mlp_out"][0, pos] - recon[layer][pos]
            return f"blocks.{layer}.hook_mlp_out", pos, err if pos > 0 else torch.zeros_like(err)
        pos = k - g.n_features - 4 * P
        return "hook_embed", pos, model.W_E[tokens[pos]]

    late = [k for k in range(g.n_features) if g.features[k, 0] == 3 and g.features[k, 1] == P - 1][0]
    layer, pos, latent = g.features[late].tolist()
    logit_vec = model.W_U[:, model(tokens[None])[0, -1].argmax()] - model.W_U.mean(dim=1)
    targets = [(late, (f"blocks.{layer}.ln2.hook_normalized", pos, layers[layer]["W_enc"][latent])),
               (g.adjacency.shape[0] - g.n_logits, ("unembed.hook_in", P - 1, logit_vec))]  # fmt: skip
    base = {
        t: perturbed_read(model, cache, saes, tokens, ("hook_embed", 0), torch.zeros(model.cfg.d_model), r) for t, r in targets
    }
    torch.manual_seed(1)
    feats = [k for k in torch.randperm(g.n_features).tolist() if g.features[k, 0] < 3][:12]
    sources = feats + [g.n_features + 1 * P + 4, g.n_features + 2 * P + P - 1, g.n_features + 4 * P + 3, g.n_features + 4 * P]
    checked = 0
    for t, r in targets:
        for k in sources:
            hook, pos, vec = source(k)
            effect = perturbed_read(model, cache, saes, tokens, (hook, pos), vec, r) - base[t]
            assert g.adjacency[t, k].item() == pytest.approx(effect, rel=2e-3, abs=2e-4), (t, k)
            checked += abs(effect) > 1e-3
    assert checked > 10  # most of them are real edges, not zeros on both sides


CIRCUIT_TRACER_GRAPH = """
import sys, json, torch, yaml
import huggingface_hub.constants as hc
hc.HF_HUB_ENABLE_HF_TRANSFER = getattr(hc, "HF_HUB_ENABLE_HF_TRANSFER", False)  # newer hubs dropped it; unused here
from safetensors.torch import load_file, save_file
from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
from circuit_tracer.replacement_model import ReplacementModel
from circuit_tracer.attribution.attribute import attribute
from circuit_tracer.graph import compute_graph_scores
from e2edict.backbones.transformer_lens import load_hooked_transformer
folder, tokens_file, out = sys.argv[1:]
config = yaml.safe_load(open(f"{folder}/config.yaml"))
base = load_hooked_transformer(config["model_name"], "cpu", torch.float32)
ts = load_transcoder_set({i: f"{folder}/layer_{i}.safetensors" for i in range(base.cfg.n_layers)}, scan="e2edict",
                         feature_input_hook=config["feature_input_hook"], feature_output_hook=config["feature_output_hook"],
                         device=torch.device("cpu"), lazy_encoder=False, lazy_decoder=False)
model = ReplacementModel.from_config(base.cfg, ts, backend="transformerlens", tokenizer=base.tokenizer)
names = model.state_dict().keys()
state = {}
for k, v in base.state_dict().items():  # circuit-tracer wraps each MLP and the unembedding in a module of its own
    for name in (k, k.replace(".mlp.", ".mlp.old_mlp."), k.replace("unembed.", "unembed.old_unembed.")):
        if name in names:
            state[name] = v
model.load_state_dict(state, strict=False)
graph = attribute(load_file(tokens_file)["tokens"], model, batch_size=512)
save_file({"adjacency": graph.adjacency_matrix.contiguous(), "features": graph.active_features.contiguous()}, out)
print(json.dumps(compute_graph_scores(graph)))
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch, skip, kw", [("relu", True, {}), ("jumprelu", False, {"init_threshold": 0.02})], ids=["relu-skip", "jumprelu"]
)
def test_circuit_tracers_own_graph_and_scores(tmp_path, tiny_model, arch, skip, kw):
    saes = random_transcoders(tiny_model.cfg.d_model, skip, arch, **kw)
    export_circuit_tracer(saes, "tiny", 4, tmp_path / "ct")
    tokens = prompt(tiny_model, 8)
    save_file({"tokens": tokens.contiguous()}, str(tmp_path / "tokens.safetensors"))
    (tmp_path / "graph.py").write_text(CIRCUIT_TRACER_GRAPH)
    args = [
        str(circuit_tracer_python()),
        str(tmp_path / "graph.py"),
        str(tmp_path / "ct"),
        str(tmp_path / "tokens.safetensors"),
        str(tmp_path / "g.safetensors"),
    ]
    r = subprocess.run(args, env={**ENV, "PYTHONPATH": str(ROOT / "src")}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    theirs = load_file(str(tmp_path / "g.safetensors"))
    config, layers = transcoder_set(saes, "tiny", 4)
    ours = attribution_graph(tiny_model, config, layers, tokens)
    assert torch.equal(ours.features, theirs["features"])
    torch.testing.assert_close(ours.adjacency, theirs["adjacency"], rtol=1e-4, atol=1e-5)
    assert graph_scores(ours) == pytest.approx(json.loads(r.stdout.strip().splitlines()[-1]), abs=1e-5)


def test_a_transcoder_run_records_its_graph_scores_and_compare_shows_them(tmp_path):
    from e2edict.attribution import run_graph_scores
    from e2edict.run import load_run_dir

    run = tmp_path / "run"
    train = cli_cmd("train", ROOT / "configs/tiny/transcoders-e2e.yaml", "train.tokens=4096", "train.batch_size=8",
                    "saes.architecture=topk", "saes.k=8",
                    "eval.tokens=2048", "eval.alive_tokens=2048", "eval.graph_prompts=2", "eval.graph_tokens=12",
                    "--out", run)  # fmt: skip
    r = subprocess.run(train, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "replacement score" in r.stdout
    graph = json.loads((run / "eval.json").read_text())["graph"]
    assert graph["prompts"] == 2 and graph["prompt_tokens"] == 12 and graph["features"] > 0
    assert graph["replacement_score"] == pytest.approx(sum(graph["replacement_scores"]) / 2)
    assert all(0 < v < 1 for v in graph["replacement_scores"] + graph["completeness_scores"])
    loaded = load_run_dir(run)
    again = run_graph_scores(loaded.backbone, loaded.saes, loaded.eval_seqs, 2, 12)
    assert again["replacement_scores"] == pytest.approx(graph["replacement_scores"], abs=1e-6)
    assert again["completeness_scores"] == pytest.approx(graph["completeness_scores"], abs=1e-6)
    r = subprocess.run(cli_cmd("compare", run, "--out", tmp_path / "cmp"), env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    per_run = (tmp_path / "cmp" / "per_run.md").read_text()
    assert "replacement_score" in per_run and f"{graph['replacement_score']:.4f}" in per_run
    bad = subprocess.run(cli_cmd("eval", run, "--graph-tokens", "1"), env=ENV, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and bad.stderr.strip() == "e2edict: error: --graph-tokens must be at least 2, got 1"
    ev = cli_cmd(
        "eval", run, "--tokens", "1024", "--alive-tokens", "1024", "--graph-prompts", "1", "--graph-tokens", "8", "--quiet"
    )
    r = subprocess.run(ev, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    graph = json.loads((run / "eval.json").read_text())["graph"]
    assert graph["prompts"] == 1 and graph["prompt_tokens"] == 8


def test_what_cannot_be_graphed_says_why():
    from e2edict.attribution import run_graph_scores
    from e2edict.run import open_backbone

    backbone = open_backbone("tiny", "transformer_lens")
    seqs = torch.tensor([[0, 367, 280, 296, 1294, 352, 261, 270]])
    saes = random_transcoders(backbone.model.cfg.d_model, False)
    one = {h: s for h, s in saes.items() if h.startswith("blocks.1.")}
    assert run_graph_scores(backbone, one, seqs, 1, 8) == {
        "skipped": "circuit-tracer needs a transcoder at every layer; the run has none at layers 0, 2, 3"
    }
    few = run_graph_scores(backbone, saes, seqs, 1, 8, max_features=10)
    assert few["skipped"].startswith("prompt 0 has ") and few["skipped"].endswith("more than 10 (eval.graph_max_features)")
    assert "prompts" in run_graph_scores(backbone, saes, seqs, 1, 8)
