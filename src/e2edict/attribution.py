"""Attribution graphs of a transcoder set, and circuit-tracer's replacement and completeness scores.

Why: a transcoder set is made for circuit tracing (Ameisen et al. 2025, "Circuit Tracing"; the
circuit-tracer library, decoderesearch/circuit-tracer). A graph explains a prompt's next-token
logits by the transcoders' features, and what the transcoders miss becomes an *error node* per layer
and position. Transcoders that keep the model's output while computing something other than their
MLPs (e2e transcoders can) would explain through errors. circuit-tracer measures this on the graph
itself with two scores; this module builds the graph as circuit-tracer does, from the transcoders as
its loader reads them (`e2edict.saes.circuit_tracer_format.transcoder_set`), so a run's eval.json
says how its transcoders will trace.

The local replacement model (circuit-tracer's ``ReplacementModel``, TransformerLens backend): the
attention patterns and every normalisation's scale frozen at their values on the prompt, each MLP's
output its transcoder's reconstruction plus a constant error (a skip path stays linear in the MLP's
input). The residual stream is then linear in the nodes' values, and the direct effect of a source
on a target is a gradient contracted with a vector:

- nodes, in circuit-tracer's order: each active feature (layer, position, latent) of the clean run;
  an error per (layer, position); a token embedding per position; the logits at the last position
  with the largest probabilities, until they hold 0.95 (at most 10);
- a feature writes ``a_f d_f`` (its activation times its decoder row) at ``blocks.l.hook_mlp_out``,
  an error ``mlp_out - transcoder(x)``, a token its embedding at ``hook_embed``;
- a feature reads ``w_f · x`` at ``blocks.L.ln2.hook_normalized`` (its encoder row), a logit
  ``(u_t - mean_t u_t) · ln_final(x)`` at the last position (its demeaned unembedding);
- position 0 (the BOS) has neither features nor an error (circuit-tracer zeroes them); position
  embeddings and biases are constants, not nodes.

`graph_scores` is circuit-tracer's ``compute_graph_scores`` (`docs/transcoders.md`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from e2edict.errors import E2EDictError
from e2edict.saes.circuit_tracer_format import activation, transcoder_set

MAX_LOGITS, LOGIT_PROBABILITY = 10, 0.95  # circuit-tracer's defaults for the logit nodes
_FROZEN = ("hook_pattern", "hook_scale")  # attention patterns and normalisation scales


class TooManyFeatures(E2EDictError):
    """A prompt whose graph would exceed the feature budget."""


@dataclass
class Graph:
    """A prompt's direct-effect matrix (rows: targets, columns: sources) over the nodes in
    circuit-tracer's order: features, errors (layer-major), tokens, logits."""

    adjacency: torch.Tensor
    features: torch.Tensor  # [n_features, 3]: each feature node's (layer, position, latent)
    n_errors: int
    n_tokens: int
    logit_probabilities: torch.Tensor

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def n_logits(self) -> int:
        return len(self.logit_probabilities)


def graph_scores(graph: Graph) -> tuple[float, float]:
    """(replacement score, completeness score) of a graph, as circuit-tracer's ``compute_graph_scores``:
    the tokens' share of the logit-weighted influence that tokens and errors have (through paths of
    any length on the row-normalised |A|), and the non-error share of each node's inputs averaged
    with weights of its influence plus its logit weight."""
    A = graph.adjacency.abs()  # the one copy of the N x N matrix this makes
    A /= A.sum(dim=1, keepdim=True).clamp(min=1e-10)
    weights = torch.zeros(A.shape[0], dtype=A.dtype)
    weights[A.shape[0] - graph.n_logits :] = graph.logit_probabilities.to(A.dtype)
    reach = influence(A, weights)
    errors = slice(graph.n_features, graph.n_features + graph.n_errors)
    tokens = reach[errors.stop : errors.stop + graph.n_tokens].sum()
    replacement = tokens / (tokens + reach[errors].sum())
    weight = reach + weights
    completeness = ((1 - A[:, errors].sum(dim=1)) * weight).sum() / weight.sum()
    return float(replacement), float(completeness)


def influence(A: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``w (A + A^2 + ...)``: each node's influence on the weighted targets through paths of any
    length. A graph's edges run forward in the model, so the series ends within its node count."""
    step = weights @ A
    total = step.clone()
    for _ in range(A.shape[0]):
        if not bool(step.any()):
            return total
        step = step @ A
        total += step
    raise E2EDictError("the attribution graph has a cycle: its influence does not converge")


@dataclass
class _Layer:
    """One layer's transcoder on the clean prompt: its active features and its error."""

    positions: torch.Tensor  # [n] position of each active feature
    latents: torch.Tensor  # [n] its latent
    encoder: torch.Tensor  # [n, d] encoder rows (what each feature reads)
    decoder: torch.Tensor  # [n, d] activation times decoder row (what each feature writes)
    error: torch.Tensor  # [P, d] the MLP's output less the transcoder's
    skip: torch.Tensor | None  # W_skip [d, d]


def attribution_graph(model, config: dict[str, Any], layers: dict[int, dict[str, torch.Tensor]],
                      tokens: torch.Tensor, batch_size: int = 256, max_features: int | None = None) -> Graph:  # fmt: skip
    """The graph of ``tokens`` ([P], starting with BOS) for a TransformerLens ``model`` with the
    transcoder set ``(config, layers)`` (`transcoder_set`) replacing its MLPs. A prompt with more
    than ``max_features`` active features is refused (the dense matrix grows with their square)."""
    hooks = (config["feature_input_hook"], config["feature_output_hook"])
    check_model(model, hooks, len(layers))
    with _frozen_parameters(model):
        x_in, mlp_out, logits = _clean_run(model, tokens, hooks)
        found = [_features(config, layers[i], x_in[i], mlp_out[i]) for i in range(len(layers))]
        active = sum(len(f.positions) for f in found)
        if max_features is not None and active > max_features:
            raise TooManyFeatures(f"{active:,} active features, more than {max_features:,}")
        probs, logit_vecs = _salient_logits(logits, model.W_U)
        targets = [(len(layers), len(tokens) - 1, v) for v in logit_vecs]
        targets += [(i, int(p), w) for i, f in enumerate(found) for p, w in zip(f.positions, f.encoder, strict=True)]
        n_logits, P = len(probs), len(tokens)
        n = active + (len(layers) + 1) * P + n_logits
        A = torch.zeros(n, n)
        row = torch.cat([torch.arange(n - n_logits, n), torch.arange(active)])  # each target's row: logits last
        for start, rows in _rows(model, tokens, hooks, found, targets, batch_size):
            A[row[start : start + len(rows)], : rows.shape[1]] = rows
    features = torch.cat([torch.stack([torch.full_like(f.positions, i), f.positions, f.latents], 1) for i, f in enumerate(found)])
    return Graph(A, features.cpu(), len(layers) * P, P, probs.cpu())


def check_model(model, hooks: tuple[str, str], n_layers: int) -> None:
    """The hooks the graph needs, each named in the error where the model lacks it."""
    if n_layers != model.cfg.n_layers:
        raise E2EDictError(f"the transcoder set has {n_layers} layers, the model {model.cfg.n_layers}")
    need = ["hook_embed", "ln_final.hook_normalized", *(f"blocks.0.{h}" for h in (*hooks, "attn.hook_pattern"))]
    missing = [h for h in need if h not in model.hook_dict]
    if missing:
        raise E2EDictError(f"an attribution graph needs the model's hook {missing[0]!r}, which it does not have")


@contextlib.contextmanager
def _frozen_parameters(model):
    """No gradient for the model's weights inside (only the nodes' values carry one); and
    TransformerLens's own attention forward (e2edict's fused one skips the pattern hook)."""
    from e2edict.backbones.tl_attention import fused_attention_inside, use_unfused_attention

    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        with fused_attention_inside(model):
            use_unfused_attention(model)
            for p, _ in flags:
                p.requires_grad_(False)
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@torch.no_grad()
def _clean_run(model, tokens: torch.Tensor, hooks: tuple[str, str]):
    """Each layer's transcoder input and MLP output [L, P, d] and the last position's logits."""
    cache: dict[str, torch.Tensor] = {}

    def keep(act, hook):
        cache[hook.name] = act[0].float()

    names = {f"blocks.{i}.{h}" for i in range(model.cfg.n_layers) for h in hooks}
    logits = model.run_with_hooks(tokens[None], fwd_hooks=[(lambda n: n in names, keep)])
    stack = [torch.stack([cache[f"blocks.{i}.{h}"] for i in range(model.cfg.n_layers)]) for h in hooks]
    return stack[0], stack[1], logits[0, -1].float()


def _features(config: dict[str, Any], t: dict[str, torch.Tensor], x: torch.Tensor, mlp_out: torch.Tensor) -> _Layer:
    """The transcoder on the clean input ``x`` [P, d]: active features (none at position 0) and the error."""
    t = {k: v.to(x.device) for k, v in t.items()}
    acts = activation(x @ t["W_enc"].T + t["b_enc"], config, t)
    acts[0] = 0
    recon = acts @ t["W_dec"] + t["b_dec"]
    skip = t.get("W_skip")
    if skip is not None:
        recon = recon + x @ skip.T
    error = mlp_out - recon
    error[0] = 0
    pos, latent = acts.nonzero(as_tuple=True)
    return _Layer(pos, latent, t["W_enc"][latent], acts[pos, latent, None] * t["W_dec"][latent], error, skip)


def _salient_logits(logits: torch.Tensor, W_U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The probabilities of the most likely next tokens until they hold 0.95 (at most 10), and
    their demeaned unembedding vectors [k, d]."""
    top = torch.topk(torch.softmax(logits, dim=-1), min(MAX_LOGITS, len(logits)))
    keep = int(torch.searchsorted(torch.cumsum(top.values, 0), LOGIT_PROBABILITY)) + 1
    idx = top.indices[:keep]
    W = W_U.detach().float()
    return top.values[:keep], (W[:, idx] - W.mean(dim=1, keepdim=True)).T


def _rows(model, tokens, hooks, found: list[_Layer], targets: list, batch_size: int):
    """Each target's direct effects from every feature, error and token, as (first target, rows):
    one forward pass of ``batch_size`` copies of the prompt through the frozen model, one backward
    pass per batch of targets."""
    B = min(batch_size, len(targets))
    run = _FrozenRun(model, tokens, hooks, found, B)
    for i in range(0, len(targets), B):
        yield i, run.rows(targets[i : i + B])


class _FrozenRun:
    """The local replacement model's forward pass on ``B`` copies of the prompt, kept for backward:
    each layer's transcoder input and the final norm's output are the targets' read locations, a
    zero leaf at each MLP output and at the embedding the sources' write locations."""

    def __init__(self, model, tokens: torch.Tensor, hooks: tuple[str, str], found: list[_Layer], B: int):
        self.found = found
        self.reads: dict[int, torch.Tensor] = {}
        dtype, device = model.W_E.dtype, model.W_E.device
        P, d, L = len(tokens), model.cfg.d_model, model.cfg.n_layers
        self.writes = [torch.zeros(B, P, d, dtype=dtype, device=device, requires_grad=True) for _ in range(L + 1)]
        with model.hooks(fwd_hooks=self._hooks(hooks, L)):
            resid = model(tokens[None].expand(B, -1).to(device), stop_at_layer=L)
            self.reads[L] = model.ln_final(resid)
        self.embedding = model.W_E.detach()[tokens.to(device)].float()

    def _hooks(self, hooks: tuple[str, str], L: int) -> list:
        def frozen(act, hook):
            return act.detach()

        def embed(act, hook):
            return act.detach() + self.writes[L]

        def read(layer):
            def fn(act, hook):
                self.reads[layer] = act

            return fn

        def write(layer):
            def fn(act, hook):
                skip = self.found[layer].skip
                linear = self.reads[layer] @ skip.to(act).T if skip is not None else torch.zeros_like(act)
                return (act - linear).detach() + linear + self.writes[layer]

            return fn

        out = [(lambda n: n.endswith(_FROZEN), frozen), ("hook_embed", embed)]
        for i in range(L):
            out += [(f"blocks.{i}.{hooks[0]}", read(i)), (f"blocks.{i}.{hooks[1]}", write(i))]
        return out

    def rows(self, targets: list) -> torch.Tensor:
        """The rows [n, features + errors + tokens] of ``targets`` (layer, position, read vector)."""
        n = len(targets)
        copy, layer = torch.arange(n), torch.tensor([t[0] for t in targets])
        pos, vecs = torch.tensor([t[1] for t in targets]), torch.stack([t[2] for t in targets])
        at = {i: layer == i for i in layer.unique().tolist()}  # copy b of the prompt carries target b
        objective = sum((self.reads[i][copy[m], pos[m]] * vecs[m].to(self.reads[i])).sum() for i, m in at.items())
        grads = torch.autograd.grad(objective, self.writes, retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, self.writes, strict=True)]
        feats, errors = [], []
        for g, f in zip(grads[:-1], self.found, strict=True):
            g = g[:n].float()
            feats.append((g @ f.decoder.T)[:, f.positions, torch.arange(len(f.positions))])
            errors.append((g * f.error).sum(-1))
        tokens = (grads[-1][:n].float() * self.embedding).sum(-1)
        return torch.cat([*feats, *errors, tokens], dim=1).cpu()


def run_graph_scores(
    backbone, saes: dict, sequences: torch.Tensor, prompts: int, tokens: int, max_features: int | None = None
) -> dict[str, Any]:
    """eval.json's ``graph`` of a transcoder run: the replacement and completeness scores of the
    graphs of ``prompts`` prompts (the first ``tokens`` tokens of the first sequences), their
    means and the mean number of feature nodes; ``{"skipped": why}`` where no graph can be built
    (or a prompt has more than ``max_features`` active features)."""
    why = untraceable(backbone, saes)
    if why is not None:
        return {"skipped": why}
    try:
        config, layers = transcoder_set(saes, backbone.name, backbone.n_layers)
    except E2EDictError as e:
        return {"skipped": str(e)}
    scores, features = [], []
    for i, seq in enumerate(sequences[:prompts]):
        try:
            graph = attribution_graph(backbone.model, config, layers, seq[:tokens], max_features=max_features)
        except TooManyFeatures as e:
            return {"skipped": f"prompt {i} has {e} (eval.graph_max_features)"}
        scores.append(graph_scores(graph))
        features.append(graph.n_features)
    n = len(scores)
    return {
        "prompts": n,
        "prompt_tokens": int(min(tokens, sequences.shape[1])),
        "replacement_score": sum(s[0] for s in scores) / n,
        "completeness_score": sum(s[1] for s in scores) / n,
        "features": sum(features) / n,
        "replacement_scores": [s[0] for s in scores],
        "completeness_scores": [s[1] for s in scores],
    }


def untraceable(backbone, saes: dict) -> str | None:
    """Why a run's graph cannot be built here, or None."""
    from torch.distributed.fsdp import FSDPModule

    from e2edict.backbones.transformer_lens import TLBackbone

    if not isinstance(backbone, TLBackbone):
        return "attribution graphs are built on the transformer_lens backend (circuit-tracer's)"
    if backbone.adapter is not None:
        return "the model carries an adapter, which circuit-tracer's replacement model does not"
    if any(isinstance(m, FSDPModule) for m in backbone.model.modules()):
        return "the model is sharded (train.shard_model); run e2edict eval on one device for the graph"
    return None
