"""e2edict: end-to-end sparse dictionary learning.

The data flow, one module a step: `config` -> `backbones` (model) + `saes` -> `data` ->
`splice` (the shared-prefix forward) and `losses` -> `trainer` -> run directory -> `evaluation`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from e2edict.version import __version__

__all__ = ["__version__", "evaluate", "interp", "load_config", "load_model", "load_saes", "train"]


def load_model(name_or_path: str = "tiny", device: str = "cpu", backend: str = "transformer_lens"):
    """A frozen model: ``"tiny"`` (the embedded model), a model folder, or a hub name.

    ``backend="transformer_lens"`` gives a `HookedTransformer` (folders must hold a GPT-2-architecture
    model); ``backend="huggingface"`` gives the ``transformers`` causal LM itself."""
    from e2edict.run import open_backbone

    # TransformerLens's own attention: the fused path stays inside e2edict's training and evaluation
    kw = {"fused_attention": False} if backend == "transformer_lens" else {}
    return open_backbone(name_or_path, backend, device, **kw).model


def load_saes(source: str | Path, device: str = "cpu", model=None) -> dict[str, Any]:
    """``{hook_name: SAE}`` from anything ``saes.init_from`` accepts: a run directory (its
    ``saes/``), an SAE folder in the SAELens layout, a sparsify folder (one hook point, or one
    folder per hook point), or ``"sae_lens:RELEASE/SAE_ID"`` (through sae_lens's registry). In eval
    mode (inference behaviour: a BatchTopK threshold is used as saved, not moved).

    Keys are the hook names the source gives (a sparsify folder's module paths, ``h.2``). With
    ``model`` (a `HookedTransformer` or a ``transformers`` causal LM) they are that model's hook
    names: sparsify's module paths matched to its hooks, the other backend's names mapped where
    the mapping is unambiguous, and each SAE's width checked against the model."""
    from e2edict.run import adopt_source
    from e2edict.saes.pretrained import load_source

    saes, kind = load_source(str(source), what="SAE source")
    if model is not None:
        with _as_backbone(model) as backbone:
            saes = adopt_source(saes, kind, backbone)
            backbone.check_saes(saes)
    return {h: sae.to(device).eval() for h, sae in saes.items()}


def evaluate(
    model,
    saes: dict[str, Any],
    tokens,
    batch_size: int = 16,
    alive_tokens: int | None = None,
    n_ctx: int = 128,
    tokenizer=None,
    progress: bool = False,
) -> dict[str, Any]:
    """The metrics of method §5 (eval.json's shape) for ``saes`` spliced into ``model`` (a
    `HookedTransformer` or a ``transformers`` causal LM).

    ``tokens``: ``[N, n_ctx]`` token ids used as they are; a 1-D token stream (e.g.
    ``numpy.load("val_tokens.npy")``, any integer dtype); or texts. Streams and texts are packed
    as runs pack them: windows of ``n_ctx - 1`` tokens, each after the BOS token (texts each
    after a BOS too), so a run's eval data gives its eval.json. Texts use ``tokenizer``, or the
    TransformerLens model's own. SAEs trained on the other backend's hook names are mapped where
    the mapping is unambiguous (residual stream, MLP output)."""
    import torch

    from e2edict.evaluation import evaluate_saes
    from e2edict.sources import user_sequences

    def run(backbone):
        seqs = user_sequences(tokens, n_ctx, backbone.bos_token_id, tokenizer or backbone.tokenizer)
        mapped = backbone.adopt_saes(saes)
        result = evaluate_saes(
            backbone, mapped, torch.from_numpy(seqs), batch_size=batch_size, alive_tokens=alive_tokens, progress=progress
        )
        if _is_bridge(model):  # a bridge's user knows its TransformerLens names: reported under the names given
            given = {id(sae): name for name, sae in saes.items()}
            result["saes"] = {given[id(mapped[h])]: figures for h, figures in result["saes"].items()}
        return result

    with _as_backbone(model, tokenizer) as backbone:
        return run(backbone)


def _is_bridge(model) -> bool:
    """TransformerLens 3's ``TransformerBridge``: a ``transformers`` model behind TransformerLens's names."""
    return type(model).__name__ == "TransformerBridge" and hasattr(model, "original_model")


@contextlib.contextmanager
def _as_backbone(model, tokenizer=None):
    """A `HookedTransformer`, a ``transformers`` causal LM or TransformerLens 3's `TransformerBridge`
    (its ``original_model`` on the Hugging Face backbone, whose names map TransformerLens's residual
    stream and MLP output hooks) as e2edict's backbone, for the duration of the block; a
    TransformerLens model is handed back as it came."""
    from e2edict.backbones import HFBackbone, TLBackbone

    if _is_bridge(model):
        hf = model.original_model
        yield HFBackbone(hf, tokenizer or getattr(model, "tokenizer", None), getattr(hf.config, "name_or_path", "bridge"))
    elif hasattr(model, "cfg") and hasattr(model, "run_with_hooks"):
        from e2edict.backbones.tl_attention import fused_attention_inside

        with fused_attention_inside(model):
            yield TLBackbone(model, model.cfg.model_name)
    else:
        yield HFBackbone(model, tokenizer, getattr(model.config, "name_or_path", type(model).__name__))


def interp(
    model,
    saes: dict[str, Any],
    tokens,
    metrics: tuple[str, ...] | list[str] | None = None,
    n_ctx: int = 128,
    tokenizer=None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    **options,
) -> dict[str, Any]:
    """Interpretability metrics (interp.json's shape) of ``saes`` read on ``model`` (a
    `HookedTransformer` or a ``transformers`` causal LM): sparse probing, absorption, n-gram
    explanations, and autointerp where ``llm=AutointerpConfig(url=..., model=...)`` is given.

    ``tokens``: held-out text for the explanations, as `evaluate` takes it (rows, a 1-D stream or
    texts). ``options``: the fields of `e2edict.interpret.InterpOptions` (``latents``, ``tasks``,
    ``task_data``, ``probe_train``, ...). ``cache_dir``: where autointerp caches its calls
    (needed with ``llm``). Each SAE is read at its own hook, under the name it was given. See
    docs/interpretability.md."""
    import torch

    from e2edict.interpret import METRICS, InterpOptions, interpret_saes
    from e2edict.interpret.reading import Reader
    from e2edict.sources import user_sequences

    opts = InterpOptions(metrics=tuple(metrics or METRICS), **options).check()
    with _as_backbone(model, tokenizer) as backbone:
        seqs = torch.from_numpy(user_sequences(tokens, n_ctx, backbone.bos_token_id, tokenizer or backbone.tokenizer))
        mapped = backbone.adopt_saes(saes)
        reader = Reader(backbone, mapped, batch_size=opts.batch_size)
        cache = Path(cache_dir) / "autointerp.jsonl" if cache_dir is not None else None
        result = interpret_saes(reader, seqs, opts, cache, progress=progress, quiet=not progress)
    # reported under the names the SAEs were given (a TransformerLens name read on a Hugging Face model, say)
    given = {id(sae): name for name, sae in saes.items()}
    result["saes"] = {given[id(sae)]: result["saes"][h] for h, sae in mapped.items()}
    return result


def load_config(path: str | Path, overrides: list[str] | None = None):
    from e2edict.config import load_config as _load

    return _load(path, overrides)


def train(
    config, overrides: list[str] | None = None, out: str | Path | None = None, overwrite: bool = False, progress: bool = True
) -> Path:
    """Train from a `Config`, a mapping, or a YAML path, with ``dotted.key=value`` overrides as
    on the command line (``["train.tokens=100000"]``); return the run directory. Without ``out``
    the run goes to ``out/runs/<name>``, its name following the overrides (`config.run_name_for`)."""
    from e2edict.config import Config, config_from_dict
    from e2edict.config import load_config as _load
    from e2edict.overrides import apply_overrides, run_name_for
    from e2edict.trainer import train as _train

    overrides = list(overrides or [])
    if isinstance(config, (str, Path)):
        config = _load(config, overrides)
    else:
        raw = config.to_dict() if isinstance(config, Config) else dict(config)
        config = config_from_dict(apply_overrides(raw, overrides)) if overrides or not isinstance(config, Config) else config
    if out is None and overrides:
        config.name = run_name_for(config.name, overrides)
    return _train(config, out=out, overwrite=overwrite, progress=progress)
