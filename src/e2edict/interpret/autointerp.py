"""Autointerp with an LLM: SAEBench's detection protocol (``sae_bench/evals/autointerp``) through
any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, Ollama, llama.cpp's server).

Per latent: the LLM writes a one-sentence explanation from 10 top-activating windows and 5
importance-weighted samples (activating tokens marked ``<<...>>``); it is then shown 14 shuffled
windows (2 other top windows, 2 other samples, 10 uniformly random windows) and names those in
which it expects the latent to fire. The score is the fraction of windows classified correctly
(both ways). A window is *active* where the latent exceeds 1% of its top windows' maximum in it;
unlike SAEBench, random windows are labelled by their real activation (SAEBench counts every
random window as inactive, even one that fires).

Every prompt and answer is cached (`Cache`, a JSON-lines file in the run directory) under a hash
of the model and the messages, so a rerun, or a run resumed after a failure, makes no call
twice. Calls run concurrently up to a limit; the openai client retries timeouts, 429s and server
errors with exponential backoff. An answer that cannot be parsed is reported in one line and that
latent left out; the rest is kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from e2edict.errors import E2EDictError
from e2edict.interpret.contexts import ActsFn, Examples, window

GEN_SYSTEM = (
    "We're studying neurons in a neural network. Each neuron activates on some particular word/words/substring/concept "
    "in a short document. The activating words in each document are indicated with << ... >>. We will give you a list of "
    "documents on which the neuron activates, in order from most strongly activating to least strongly activating. Look at "
    "the parts of the document the neuron activates for and summarize in a single sentence what the neuron is activating "
    "on. Try not to be overly specific in your explanation. Note that some neurons will activate only on specific words or "
    "substrings, but others will activate on most/all words in a sentence provided that sentence contains some particular "
    "concept. Your explanation should cover most or all activating words (for example, don't give an explanation which is "
    "specific to a single word if all words in a sentence cause the neuron to activate). Pay attention to things like the "
    "capitalization and punctuation of the activating words or concepts, if that seems relevant. Keep the explanation as "
    "short and simple as possible, limited to 20 words or less. Omit punctuation and formatting. You should avoid giving "
    'long lists of words. Your response should be in the form "This neuron activates on...".'
)
SCORE_SYSTEM = (
    "We're studying neurons in a neural network. Each neuron activates on some particular word/words/substring/concept "
    "in a short document. You will be given a short explanation of what this neuron activates for, and then be shown "
    "{n} example sequences in random order. You will have to return a comma-separated list of the examples where you "
    "think the neuron should activate at least once, on ANY of the words or substrings in the document. For example, "
    'your response might look like "{example}". Try not to be overly specific in your interpretation of the explanation. '
    'If you think there are no examples where the neuron will activate, you should just respond with "None". You should '
    'include nothing else in your response other than comma-separated numbers or the word "None" - this is important.'
)


@dataclass
class AutointerpConfig:
    """SAEBench's defaults."""

    url: str = ""
    model: str = ""
    api_key: str | None = None
    concurrency: int = 8
    timeout: float = 60.0
    retries: int = 4
    buffer: int = 10
    n_top_gen: int = 10
    n_iw_gen: int = 5
    n_top_score: int = 2
    n_iw_score: int = 2
    n_random_score: int = 10
    act_threshold_frac: float = 0.01
    max_tokens: int = 64
    seed: int = 42

    @property
    def n_score(self) -> int:
        return self.n_top_score + self.n_iw_score + self.n_random_score


class Cache:
    """Prompts and answers, one JSON object a line, appended (and flushed to disk) as each answer arrives."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        self.entries: dict[str, str] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    e = json.loads(line)
                    self.entries[e["key"]] = e["response"]
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a crash: that call is made again

    @staticmethod
    def key(model: str, messages: list[dict]) -> str:
        return hashlib.sha256(json.dumps([model, messages], sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> str | None:
        return self.entries.get(key)

    def put(self, key: str, model: str, messages: list[dict], response: str) -> None:
        line = json.dumps({"key": key, "model": model, "messages": messages, "response": response}) + "\n"
        with self.lock:
            self.entries[key] = response
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())


class Client:
    """Chat completions through the openai client, answered from the cache where it can."""

    def __init__(self, cfg: AutointerpConfig, cache: Cache):
        from openai import OpenAI

        key = cfg.api_key or os.environ.get("OPENAI_API_KEY") or "none"  # local servers take any key
        self.cfg, self.cache = cfg, cache
        self.api = OpenAI(base_url=cfg.url, api_key=key, timeout=cfg.timeout, max_retries=cfg.retries)
        self.calls = 0
        self.lock = threading.Lock()

    def chat(self, messages: list[dict]) -> str:
        k = Cache.key(self.cfg.model, messages)
        hit = self.cache.get(k)
        if hit is not None:
            return hit
        import openai

        try:
            r = self.api.chat.completions.create(
                model=self.cfg.model, messages=messages, max_tokens=self.cfg.max_tokens, temperature=0.0
            )
        except openai.APIError as e:
            raise E2EDictError(f"autointerp: the endpoint {self.cfg.url} failed ({type(e).__name__}: {_short(e)})") from None
        with self.lock:
            self.calls += 1
        text = (r.choices[0].message.content or "") if r.choices else ""
        self.cache.put(k, self.cfg.model, messages, text)
        return text


def _short(e: Exception) -> str:
    return " ".join(str(e).split())[:200]


def parse_explanation(text: str) -> str:
    return text.split("activates on")[-1].rstrip(".").strip()


def parse_predictions(text: str) -> list[int] | None:
    """The example numbers named in an answer ([] for "None"), or None when it is not a list of numbers."""
    parts = [p.strip() for p in text.strip().rstrip(".").replace("and", ",").replace("None", "").split(",")]
    parts = [p for p in parts if p]
    if not all(p.isdigit() for p in parts):
        return None
    return [int(p) for p in parts]


def score_predictions(predicted: list[int], active: list[bool]) -> float:
    """The fraction of windows classified correctly: named and active, or not named and inactive."""
    return sum((i + 1 in predicted) == a for i, a in enumerate(active)) / len(active)


@dataclass
class Window:
    tokens: list[str]
    acts: list[float]

    def text(self, threshold: float, mark: bool) -> str:
        out = "".join(f"<<{t}>>" if mark and a > threshold else t for t, a in zip(self.tokens, self.acts, strict=True))
        return out.replace("\ufffd", "").replace("\n", "↵")

    def active(self, threshold: float) -> bool:
        return any(a > threshold for a in self.acts)


def gather_windows(acts_fn: ActsFn, sequences: torch.Tensor, ex: Examples, tokens_of, buffer: int, batch_size: int):
    """Every example's window: its tokens as text and the latent's activation on each, read from
    the full sequence (the model sees the context before the window). ``{(latent, kind, j): Window}``."""
    wanted: dict[int, list[tuple]] = {}
    for kind, at in (("top", ex.top_at), ("iw", ex.iw_at), ("rand", ex.rand_at)):
        for i in range(at.shape[0]):
            for j, (s, p) in enumerate(at[i].tolist()):
                if s >= 0:
                    wanted.setdefault(s, []).append((i, kind, j, p))
    seqs = sorted(wanted)
    out = {}
    T = sequences.shape[1]
    for b in range(0, len(seqs), batch_size):
        idx = seqs[b : b + batch_size]
        a = acts_fn(sequences[idx]).float().cpu()
        for r, s in enumerate(idx):
            for i, kind, j, p in wanted[s]:
                lo, hi = window(T, p, buffer)
                out[(i, kind, j)] = Window(tokens_of(sequences[s, lo:hi].tolist()), a[r, lo:hi, i].tolist())
    return out


def prompts_for(i: int, windows: dict, ex: Examples, cfg: AutointerpConfig, rng: random.Random):
    """Latent ``i``'s generation messages and its scoring windows (shuffled), or None when it has
    too few examples (SAEBench skips such a latent too)."""
    tops = [windows[(i, "top", j)] for j in range(ex.top_at.shape[1]) if (i, "top", j) in windows]
    iws = [windows[(i, "iw", j)] for j in range(ex.iw_at.shape[1]) if (i, "iw", j) in windows]
    rands = [windows[(i, "rand", j)] for j in range(ex.rand_at.shape[1]) if (i, "rand", j) in windows]
    if len(tops) < cfg.n_top_gen + cfg.n_top_score or len(iws) < cfg.n_iw_gen + cfg.n_iw_score:
        return None
    threshold = cfg.act_threshold_frac * max(max(w.acts) for w in tops)
    top_order, iw_order = list(range(len(tops))), list(range(len(iws)))
    rng.shuffle(top_order)
    rng.shuffle(iw_order)
    gen = [tops[k] for k in sorted(top_order[: cfg.n_top_gen])] + [iws[k] for k in iw_order[: cfg.n_iw_gen]]
    score = (
        [tops[k] for k in top_order[cfg.n_top_gen : cfg.n_top_gen + cfg.n_top_score]]
        + [iws[k] for k in iw_order[cfg.n_iw_gen : cfg.n_iw_gen + cfg.n_iw_score]]
        + rands[: cfg.n_random_score]
    )
    rng.shuffle(score)
    listing = "\n".join(f"{k + 1}. {w.text(threshold, True)}" for k, w in enumerate(gen))
    gen_msgs = [
        {"role": "system", "content": GEN_SYSTEM},
        {"role": "user", "content": f"The activating documents are given below:\n\n{listing}"},
    ]
    example = ", ".join(map(str, sorted(rng.sample(range(1, len(score) + 1), k=min(4, len(score))))))
    return gen_msgs, score, threshold, example


def score_messages(explanation: str, score: list[Window], threshold: float, example: str) -> list[dict]:
    listing = "\n".join(f"{k + 1}. {w.text(threshold, False)}" for k, w in enumerate(score))
    return [
        {"role": "system", "content": SCORE_SYSTEM.format(n=len(score), example=example)},
        {
            "role": "user",
            "content": f"Here is the explanation: this neuron fires on {explanation}.\n\nHere are the examples:\n\n{listing}",
        },
    ]


def estimate(plans: dict[int, tuple], cache: Cache, model: str) -> tuple[int, int]:
    """Calls still to make and their prompt tokens, roughly (4 characters a token; a scoring
    prompt estimated with a 20-word explanation)."""
    calls, chars = 0, 0
    for gen_msgs, score, threshold, example in plans.values():
        if cache.get(Cache.key(model, gen_msgs)) is None:
            calls += 1
            chars += sum(len(m["content"]) for m in gen_msgs)
        calls += 1
        chars += sum(len(m["content"]) for m in score_messages("x " * 20, score, threshold, example))
    return calls, chars // 4


def run_autointerp(
    acts_fn: ActsFn, sequences: torch.Tensor, ex: Examples, latents: list[int], tokens_of, cfg: AutointerpConfig, cache: Cache,
    batch_size: int = 16, label: str = "", quiet: bool = False,
) -> dict:  # fmt: skip
    """The detection score of each latent (``latents[i]`` is column ``i`` of ``acts_fn``'s codes)."""
    windows = gather_windows(acts_fn, sequences, ex, tokens_of, cfg.buffer, batch_size)
    rng = random.Random(cfg.seed)
    plans = {}
    for i in range(len(latents)):
        p = prompts_for(i, windows, ex, cfg, rng)
        if p is not None:
            plans[i] = p
    client = Client(cfg, cache)
    calls, tokens = estimate(plans, cache, cfg.model)
    if not quiet:
        print(
            f"autointerp{label}: {len(plans)} latents, about {calls} calls to make and {tokens:,} prompt tokens "
            f"(answers up to {cfg.max_tokens} tokens each) at {cfg.url} ({cfg.model})",
            file=sys.stderr,
        )

    def one(i: int):
        gen_msgs, score, threshold, example = plans[i]
        explanation = parse_explanation(client.chat(gen_msgs))
        answer = client.chat(score_messages(explanation, score, threshold, example))
        predicted = parse_predictions(answer)
        active = [w.active(threshold) for w in score]
        if predicted is None:
            return i, {"explanation": explanation, "error": f"malformed answer {answer[:80]!r}", "n_active": sum(active)}
        return i, {"explanation": explanation, "score": score_predictions(predicted, active), "n_active": sum(active)}

    with ThreadPoolExecutor(max_workers=max(1, cfg.concurrency)) as pool:
        results = dict(pool.map(one, sorted(plans)))
    bad = [latents[i] for i, r in results.items() if "error" in r]
    if bad and not quiet:
        print(f"autointerp{label}: {len(bad)} malformed answer(s), latents {bad[:10]} left out; the rest kept", file=sys.stderr)
    scores = np.array([r["score"] for r in results.values() if "score" in r])
    per_latent = {str(latents[i]): r for i, r in sorted(results.items())}
    return {
        "score": float(scores.mean()) if len(scores) else float("nan"),
        "std": float(scores.std()) if len(scores) else float("nan"),
        "scores": [round(float(v), 4) for v in scores],
        "latents_scored": int(len(scores)),
        "latents_skipped": len(latents) - len(plans),
        "malformed": len(bad),
        "calls_made": client.calls,
        "per_latent": per_latent,
    }
