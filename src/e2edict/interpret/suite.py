"""Every interpretability metric of a set of SAEs, in one call: what ``e2edict interp`` and
``e2edict.interp`` run and what ``interp.json`` holds (`docs/interpretability.md`).

Order: explanations (their example pass feeds autointerp), autointerp (so an endpoint that
refuses stops the command before the slower passes), sparse probing, absorption.
"""

from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from e2edict.errors import E2EDictError
from e2edict.interpret import explain
from e2edict.interpret.absorption import AbsorptionConfig, absorption
from e2edict.interpret.autointerp import AutointerpConfig, Cache, run_autointerp
from e2edict.interpret.contexts import Examples, collect_examples, firing_stats
from e2edict.interpret.probing import K_VALUES, sparse_probing
from e2edict.interpret.reading import Reader, token_strings
from e2edict.interpret.tasks import BUILTIN_TASKS, Task, builtin_task, user_task

METRICS = ("sparse_probing", "absorption", "explanations", "autointerp")
DEFAULT_METRICS = ("sparse_probing", "absorption", "explanations", "autointerp")


@dataclass
class InterpOptions:
    metrics: tuple[str, ...] = DEFAULT_METRICS
    latents: int = 100  # latents explained per SAE (sampled among the alive ones)
    contexts: int = 20  # top contexts an n-gram explanation is built from
    tasks: tuple[str, ...] = BUILTIN_TASKS
    task_data: str | None = None  # a user's labelled data set
    text_column: str = "text"
    label_column: str = "label"
    task_split: str = "train"
    probe_train: int = 1000
    probe_test: int = 250
    absorption: AbsorptionConfig = field(default_factory=AbsorptionConfig)
    llm: AutointerpConfig | None = None  # None: autointerp skipped
    batch_size: int = 16
    seed: int = 0

    def check(self) -> InterpOptions:
        bad = [m for m in self.metrics if m not in METRICS]
        if bad:
            raise E2EDictError(f"unknown metric(s) {', '.join(map(repr, bad))}; known: {', '.join(METRICS)}")
        unknown = [t for t in self.tasks if t not in BUILTIN_TASKS]
        if unknown:
            raise E2EDictError(
                f"unknown built-in probing task(s) {', '.join(map(repr, unknown))}; known: {', '.join(BUILTIN_TASKS)}"
            )
        if self.latents <= 0 or self.contexts <= 0 or self.probe_train < 4 or self.probe_test < 4:
            raise E2EDictError("--latents and --contexts must be positive, probe sizes at least 4")
        if "sparse_probing" in self.metrics and not self.tasks and not self.task_data:
            raise E2EDictError("sparse probing needs a task: built-in --tasks or --task-data")
        if self.llm is not None and not (self.llm.url and self.llm.model):
            raise E2EDictError("autointerp needs both --llm-url and --llm-model")
        return self

    def settings(self) -> dict:
        """What interp.json records of how it was made (never the API key)."""
        from dataclasses import asdict

        out = {k: v for k, v in asdict(self).items() if k != "llm"}
        if self.llm is not None:
            out["llm"] = {k: v for k, v in asdict(self.llm).items() if k != "api_key"}
        return out

    def probing_tasks(self) -> list[Task]:
        tasks = [builtin_task(t) for t in self.tasks]
        if self.task_data:
            tasks.append(user_task(self.task_data, self.text_column, self.label_column, self.task_split))
        return tasks


def interpret_saes(
    reader: Reader,
    sequences: torch.Tensor,
    opts: InterpOptions,
    cache_file: Path | None = None,
    progress: bool = False,
    quiet: bool = False,
) -> dict:
    """interp.json's content for the SAEs of ``reader`` on held-out ``sequences`` ([N, n_ctx])."""
    opts.check()
    n_ctx = sequences.shape[1]
    result: dict = {"tokens": int(sequences.numel()), "metrics": list(opts.metrics), "settings": opts.settings(),
                    "saes": {h: {} for h in reader.saes}}  # fmt: skip
    if "explanations" in opts.metrics or "autointerp" in opts.metrics:
        if len(sequences) < 4:
            raise E2EDictError(f"explanations need at least 4 held-out sequences, got {len(sequences)}")
        for h in reader.saes:
            result["saes"][h].update(_explanations(reader, h, sequences, opts, cache_file, progress, quiet))
    if "autointerp" in opts.metrics and opts.llm is None:
        result["autointerp_skipped"] = "no endpoint given (--llm-url, --llm-model): autointerp not run"
        if not quiet:
            print(f"e2edict: {result['autointerp_skipped']}", file=sys.stderr)
    if "sparse_probing" in opts.metrics:
        tasks = opts.probing_tasks()
        probing = sparse_probing(reader, tasks, opts.probe_train, opts.probe_test, K_VALUES, n_ctx, opts.seed, progress)
        for h, r in probing.items():
            result["saes"][h]["sparse_probing"] = r
    if "absorption" in opts.metrics:
        for h, r in absorption(reader, n_ctx, opts.absorption, progress).items():
            result["saes"][h]["absorption"] = r
            if "skipped" in r and not quiet:
                print(f"e2edict: absorption: {r['skipped']}", file=sys.stderr)
    return result


@dataclass
class _Latents:
    """The latents of one SAE that are explained, with what every explanation pass needs of them."""

    hook: str
    ids: list[int]  # column i of `acts` is latent ids[i]
    alive: int
    thresholds: torch.Tensor  # half each one's maximum on the first half: where it "fires"
    reader: Reader
    examples: Examples | None = None  # found by a pass that reads `acts`
    token_sets: explain.TokenSets | None = None  # counted in that same pass

    def acts(self, x: torch.Tensor) -> torch.Tensor:
        lat = torch.tensor(self.ids, device=self.reader.device)
        return self.reader.codes(x, [self.hook])[self.hook][..., lat]

    def tokens_of(self, ids: list[int]) -> list[str]:
        return token_strings(self.reader.tokenizer, ids)


def _explanations(reader: Reader, h: str, sequences: torch.Tensor, opts: InterpOptions, cache_file, progress, quiet) -> dict:
    """The n-gram explanations and autointerp of the SAE at ``h``: built on the first half of the
    held-out sequences, scored on the second."""
    half = len(sequences) // 2
    build, held = sequences[:half], sequences[half:]
    lat = _choose_latents(reader, h, build, opts, progress)
    if lat is None:
        return {"explanations": {"skipped": f"no latent of the SAE at {h} fired on the first half of the held-out text"}}
    out: dict = {}
    if "explanations" in opts.metrics:
        out["explanations"] = _ngram_explanations(lat, build, held, opts, progress)
    if "autointerp" in opts.metrics and opts.llm is not None:
        if cache_file is None:
            raise E2EDictError("autointerp needs a cache file")
        out["autointerp"] = run_autointerp(lat.acts, build, lat.examples, lat.ids, lat.tokens_of, opts.llm, Cache(cache_file),
                                           opts.batch_size, f" at {h}", quiet)  # fmt: skip
    return out


def _choose_latents(reader: Reader, h: str, build: torch.Tensor, opts: InterpOptions, progress: bool) -> _Latents | None:
    """``opts.latents`` alive latents sampled with the seed, and their examples (one streaming pass each)."""
    count, peak = firing_stats(
        lambda x: reader.codes(x, [h])[h], build, reader.saes[h].d_sae, opts.batch_size, progress, f"alive latents at {h}"
    )
    alive = torch.nonzero(count > 0).flatten().tolist()
    if not alive:
        return None
    ids = sorted(random.Random(opts.seed).sample(alive, min(opts.latents, len(alive))))
    llm = opts.llm or AutointerpConfig()
    n_top = max(opts.contexts, (llm.n_top_gen + llm.n_top_score) if opts.llm else 0)
    lat = _Latents(h, ids, len(alive), 0.5 * peak[torch.tensor(ids)], reader)
    vocab = max(int(build.max()) + 1, len(reader.tokenizer) if reader.tokenizer is not None else 0)
    lat.token_sets = explain.TokenSets(lat.thresholds, vocab)
    lat.examples = collect_examples(lat.acts, build, len(ids), n_top, llm.n_iw_gen + llm.n_iw_score, llm.n_random_score,
                                    opts.batch_size, opts.seed, progress, consumers=[lat.token_sets.add])  # fmt: skip
    return lat


def _ngram_explanations(lat: _Latents, build: torch.Tensor, held: torch.Tensor, opts: InterpOptions, progress: bool) -> dict:
    """Patterns and token sets from ``build``, their precision and recall on ``held``."""
    reader = lat.reader
    mask_token = getattr(reader.tokenizer, "pad_token_id", None)
    mask_token = reader.bos if mask_token is None else mask_token
    top = _top_only(lat.examples, opts.contexts)
    patterns = explain.build_patterns(lat.acts, build, top, mask_token, reader.bos, batch_size=max(64, opts.batch_size * 8))
    sets = lat.token_sets.sets()
    ngram, tokset = explain.score(lat.acts, held, lat.thresholds, patterns, sets, opts.batch_size, progress)
    per_latent = {
        str(latent): {
            "patterns": [explain.pattern_text(lat.tokens_of, p) for p in patterns[i]],
            "precision": _num(ngram.precision()[i]),
            "recall": _num(ngram.recall()[i]),
            "token_set": lat.tokens_of(sets[i][:20]),
            "token_set_precision": _num(tokset.precision()[i]),
            "token_set_recall": _num(tokset.recall()[i]),
        }
        for i, latent in enumerate(lat.ids)
    }
    return {
        "latents": len(lat.ids),
        "alive_latents": lat.alive,
        "precision": explain.summary(ngram.precision()),
        "recall": explain.summary(ngram.recall()),
        "token_set_precision": explain.summary(tokset.precision()),
        "token_set_recall": explain.summary(tokset.recall()),
        "per_latent": per_latent,
    }


def _top_only(ex: Examples, n: int) -> Examples:
    """The first ``n`` top contexts of each latent (the explanation reads fewer than autointerp)."""
    return Examples(ex.top_val[:, :n], ex.top_at[:, :n], ex.iw_at, ex.rand_at)


def _num(v) -> float | None:
    v = float(v)
    return None if math.isnan(v) else round(v, 4)
