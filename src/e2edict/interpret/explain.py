"""Explanations without an LLM: n-gram patterns (Gao et al. 2024's simplified Neuron-to-Graph)
and a token-set baseline, each scored by how well it predicts where a latent fires on held-out text.

For each of a latent's top-activating contexts (`e2edict.interpret.contexts`):

- the **minimal activating suffix**: the shortest run of tokens ending at the peak which, read
  alone after BOS, still gives at least half the peak activation (up to `MAX_SUFFIX` tokens; a
  context that never does gives no pattern);
- each suffix token but the last is masked in turn (replaced by the pad token, else BOS); where
  the activation stays at least half the peak, that token becomes a wildcard.

The latent's explanation is the set of these patterns: it predicts a firing at every position
where one matches the tokens ending there. The **token-set baseline** predicts a firing wherever
one of the tokens appears on which the latent fired on at least half of that token's occurrences.

Both are built on the first half of the held-out sequences and scored on the second: a latent
*fires* at a position where its activation is at least half its maximum over the first half
(BOS left out). Precision and recall of each prediction, per latent; their mean, median and
deciles over latents. All of it is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from e2edict.interpret.contexts import ActsFn, Examples, _bar

MAX_SUFFIX = 16


@dataclass
class Explanation:
    patterns: list[tuple[int | None, ...]] = field(default_factory=list)
    token_set: list[int] = field(default_factory=list)


def build_patterns(
    acts_fn: ActsFn, sequences: torch.Tensor, ex: Examples, mask_token: int, bos: int, batch_size: int = 256
) -> list[list[tuple[int | None, ...]]]:
    """Each latent's n-gram patterns from its top contexts (``ex.top_at``). ``acts_fn`` gives the
    codes of the chosen latents, so latent ``i``'s activation is column ``i``."""
    jobs = []  # (latent, sequence, peak position, peak activation)
    for i in range(ex.top_at.shape[0]):
        for (s, p), v in zip(ex.top_at[i].tolist(), ex.top_val[i].tolist(), strict=True):
            if s >= 0 and v > 0:
                jobs.append((i, s, p, v))
    suffixes = []  # one row per (job, length): BOS + the last L tokens up to the peak
    for j, (_, s, p, _) in enumerate(jobs):
        for L in range(1, min(p, MAX_SUFFIX) + 1):
            suffixes.append((j, L, [bos, *sequences[s, p - L + 1 : p + 1].tolist()]))
    acts = _read(acts_fn, [r for _, _, r in suffixes], [(jobs[j][0], L) for j, L, _ in suffixes], bos, batch_size)
    shortest: dict[int, int] = {}
    for (j, L, _), a in zip(suffixes, acts, strict=True):
        if j not in shortest and a >= 0.5 * jobs[j][3]:
            shortest[j] = L
    masked = []  # (job, masked index, row)
    for j, L in shortest.items():
        _, s, p, _ = jobs[j]
        toks = sequences[s, p - L + 1 : p + 1].tolist()
        for m in range(L - 1):
            masked.append((j, m, [bos, *toks[:m], mask_token, *toks[m + 1 :]]))
    acts = _read(acts_fn, [r for _, _, r in masked], [(jobs[j][0], len(r) - 1) for j, _, r in masked], bos, batch_size)
    wild: dict[int, set[int]] = {}
    for (j, m, _), a in zip(masked, acts, strict=True):
        if a >= 0.5 * jobs[j][3]:
            wild.setdefault(j, set()).add(m)
    out: list[list[tuple[int | None, ...]]] = [[] for _ in range(ex.top_at.shape[0])]
    for j, L in shortest.items():
        i, s, p, _ = jobs[j]
        toks = sequences[s, p - L + 1 : p + 1].tolist()
        pat = tuple(None if m in wild.get(j, ()) else t for m, t in enumerate(toks))
        while len(pat) > 1 and pat[0] is None:  # a leading wildcard only asks for a longer context
            pat = pat[1:]
        if pat not in out[i]:
            out[i].append(pat)
    return out


def _read(acts_fn: ActsFn, rows: list[list[int]], where: list[tuple[int, int]], pad: int, batch_size: int) -> list[float]:
    """The activation of latent ``where[r][0]`` at position ``where[r][1]`` of each row (rows
    right-padded, which a causal model never reads back)."""
    out: list[float] = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        width = max(len(r) for r in chunk)
        x = torch.full((len(chunk), width), pad, dtype=torch.long)
        for k, r in enumerate(chunk):
            x[k, : len(r)] = torch.tensor(r)
        a = acts_fn(x).float().cpu()
        idx = where[s : s + batch_size]
        out += [float(a[k, pos, lat]) for k, (lat, pos) in enumerate(idx)]
    return out


class TokenSets:
    """Per latent, the tokens on which it fired (at least its threshold) on at least half of their
    occurrences, counted batch by batch in a pass that reads the codes anyway (`add` is a
    consumer of `e2edict.interpret.contexts.collect_examples`)."""

    def __init__(self, thresholds: torch.Tensor, vocab: int):
        self.thresholds = thresholds
        self.fired = torch.zeros(len(thresholds), vocab)
        self.seen = torch.zeros(vocab)

    def add(self, x: torch.Tensor, acts: torch.Tensor) -> None:
        """``x`` [B, T] tokens and the chosen latents' codes of them [B, T, n] (BOS left out)."""
        a = acts[:, 1:].reshape(-1, len(self.thresholds))
        tok = x[:, 1:].reshape(-1)
        self.seen.index_add_(0, tok, torch.ones(len(tok)))
        fires = (a >= self.thresholds) & (a > 0)
        self.fired.index_add_(1, tok, fires.T.float())

    def sets(self) -> list[list[int]]:
        keep = (self.fired * 2 >= self.seen) & (self.fired > 0)
        return [torch.nonzero(keep[i]).flatten().tolist() for i in range(len(keep))]


def matches(tokens: np.ndarray, pattern: tuple[int | None, ...]) -> np.ndarray:
    """Where ``pattern`` ends, over ``tokens`` [B, T]: bool [B, T] (position 0, BOS, never; the
    pattern must fit after it)."""
    B, T = tokens.shape
    L = len(pattern)
    hit = np.zeros((B, T), dtype=bool)
    if L >= T:
        return hit
    ok = np.ones((B, T - L), dtype=bool)  # ends at positions L..T-1
    for j, t in enumerate(pattern):
        if t is not None:
            ok &= tokens[:, 1 + j : T - L + 1 + j] == t
    hit[:, L:] = ok
    return hit


@dataclass
class Counts:
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray

    @classmethod
    def zeros(cls, n: int) -> Counts:
        return cls(np.zeros(n), np.zeros(n), np.zeros(n))

    def add(self, i: int, fires: np.ndarray, pred: np.ndarray) -> None:
        self.tp[i] += (fires & pred).sum()
        self.fp[i] += (~fires & pred).sum()
        self.fn[i] += (fires & ~pred).sum()

    def precision(self) -> np.ndarray:
        d = self.tp + self.fp
        return np.where(d > 0, self.tp / np.maximum(d, 1), 0.0)

    def recall(self) -> np.ndarray:
        d = self.tp + self.fn
        return np.where(d > 0, self.tp / np.maximum(d, 1), np.nan)


def score(
    acts_fn: ActsFn,
    sequences: torch.Tensor,
    thresholds: torch.Tensor,
    patterns: list[list[tuple[int | None, ...]]],
    sets: list[list[int]],
    batch_size: int,
    progress: bool = False,
) -> tuple[Counts, Counts]:
    """Held-out counts of both predictors against where each latent fires (≥ its threshold)."""
    n = len(thresholds)
    ngram, tokset = Counts.zeros(n), Counts.zeros(n)
    set_arrays = [np.asarray(s, dtype=np.int64) for s in sets]
    with _bar(len(sequences), "scoring explanations", progress) as bar:
        for s in range(0, len(sequences), batch_size):
            x = sequences[s : s + batch_size]
            a = acts_fn(x).float().cpu().numpy()
            toks = x.numpy()
            for i in range(n):
                fires = (a[..., i] >= float(thresholds[i])) & (a[..., i] > 0)
                fires[:, 0] = False
                pred = np.zeros_like(fires)
                for pat in patterns[i]:
                    pred |= matches(toks, pat)
                ngram.add(i, fires, pred)
                tp = np.isin(toks, set_arrays[i])
                tp[:, 0] = False
                tokset.add(i, fires, tp)
            bar.update(len(x))
    return ngram, tokset


def summary(values: np.ndarray) -> dict[str, float | list[float]]:
    """Mean, median and deciles over latents (NaN — a latent that never fired held out — left out)."""
    v = values[~np.isnan(values)]
    if len(v) == 0:
        return {"mean": float("nan"), "median": float("nan"), "deciles": [], "n": 0}
    return {
        "mean": float(v.mean()),
        "median": float(np.median(v)),
        "deciles": [round(float(q), 4) for q in np.quantile(v, np.linspace(0.1, 0.9, 9))],
        "n": int(len(v)),
    }


def pattern_text(tokens_of, pattern: tuple[int | None, ...]) -> str:
    """A pattern as a reader sees it: tokens joined by '·', a wildcard as '*'."""
    return "·".join("*" if t is None else tokens_of([t])[0] for t in pattern)
