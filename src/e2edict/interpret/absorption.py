"""Feature absorption, as SAEBench defines it (``sae_bench/evals/absorption``; the first-letter
task of Chanin et al. 2024, "A is for Absorption").

1. Words: every token that is a word of letters (a leading space allowed). Each is put in an
   in-context prompt of 10 other words, ``"{word} has the first letter: W"`` per line, ending
   with the word's own ``"{word} has the first letter:"``; the activation is read at the word's
   token. The conditions are checked, not assumed: a word that is not one token there, an answer
   letter that is not one token, and a prompt whose length differs from the rest are left out
   (and counted).
2. The model's own first-letter probe: one logistic regression per letter (one-vs-rest, balanced
   classes) on the activations of 80% of the words, its F1 measured on the other 20%. Letters with
   probe F1 at most ``min_probe_f1`` are left out; with fewer than ``min_letters`` left the metric
   reports that, with the figures, instead of a number.
3. k-sparse probing on the SAE's codes: an L1-penalised linear probe ranks each letter's latents
   (by weight, not magnitude); for k = 1..``max_k`` a logistic regression on the top k latents; the
   letter's main latents are the top k reached while F1 keeps rising by more than
   ``f1_jump_threshold`` (their number is the split-feature count).
4. On each test word of a letter that the probe gets right: the absorption fraction and whether
   it is full absorption (`word_absorption`, SAEBench's ``FeatureAbsorptionCalculator``), averaged
   per letter over the probe's true positives, then over letters.

Differences from SAEBench (`docs/interpretability.md`): the activation is read at the SAE's own
hook, not ``hook_resid_post``; step 4 reuses the test prompts of step 2 rather than drawing new
in-context examples; a transcoder's directions are its encoder's columns (its decoder writes
another space than the probe reads).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from tqdm.auto import tqdm

from e2edict.errors import E2EDictError
from e2edict.interpret.reading import Reader
from e2edict.sources import tokenize_batch

LETTERS = "abcdefghijklmnopqrstuvwxyz"
EPS = 1e-8


@dataclass
class AbsorptionConfig:
    """SAEBench's defaults."""

    template: str = "{word} has the first letter:"
    icl_examples: int = 10
    max_k: int = 10
    f1_jump_threshold: float = 0.03
    min_probe_f1: float = 0.6
    min_letters: int = 20
    full_absorption_cos_threshold: float = 0.025
    absorption_fraction_cos_threshold: float = 0.1
    projection_proportion_threshold: float = 0.4
    max_absorbing_latents: int = 3
    l1_decay: float = 0.01
    l1_epochs: int = 50
    max_words: int | None = None
    seed: int = 42


def word_absorption(
    sae_acts: torch.Tensor, cos_sims: torch.Tensor, act_probe_proj: float, main_ids: list[int], cfg: AbsorptionConfig
) -> tuple[float, bool]:
    """One word's absorption fraction and full absorption (SAEBench's definitions).

    ``sae_acts`` [d_sae]: the codes; ``cos_sims`` [d_sae]: each latent's direction's cosine with
    the probe; ``act_probe_proj``: the activation's projection on the unit probe direction.
    A latent's probe projection is its activation times its cosine."""
    proj = sae_acts * cos_sims
    main = float(proj[main_ids].sum()) if main_ids else 0.0
    mask = torch.ones_like(proj, dtype=torch.bool)
    mask[main_ids] = False
    mask &= (cos_sims >= cfg.absorption_fraction_cos_threshold) & (proj > 0)
    candidates = proj[mask]
    top = float(candidates.topk(min(cfg.max_absorbing_latents, candidates.numel())).values.sum())
    if act_probe_proj <= 0:  # nothing along the probe to absorb (SAEBench divides by it here)
        return 0.0, False
    if main >= act_probe_proj or top / act_probe_proj < cfg.projection_proportion_threshold:
        fraction = 0.0
    elif main <= 0.0:
        fraction = 1.0
    else:
        absorbed = min(top, act_probe_proj - main)
        fraction = float(np.clip(absorbed / (absorbed + main), 0.0, 1.0))
    full = _full_absorption(sae_acts, cos_sims, proj, act_probe_proj, main_ids, cfg)
    return fraction, full


def _full_absorption(sae_acts, cos_sims, proj, act_probe_proj: float, main_ids: list[int], cfg: AbsorptionConfig) -> bool:
    if any(abs(float(sae_acts[i])) >= EPS for i in main_ids):
        return False
    top = int(proj.argmax())
    if float(cos_sims[top]) < cfg.full_absorption_cos_threshold or act_probe_proj < 0:
        return False
    return float(proj[top]) / act_probe_proj >= cfg.projection_proportion_threshold


@dataclass
class Prompts:
    words: list[str]
    letters: list[int]  # index into LETTERS
    rows: torch.Tensor  # [N, T]: BOS + prompt
    position: int  # the word's token
    dropped: dict[str, int]


def build_prompts(tokenizer, bos: int, cfg: AbsorptionConfig, n_ctx: int) -> Prompts:
    """The in-context prompts of every single-token alphabetic word, with the checks of step 1."""
    vocab = sorted({w for w in (tokenizer.decode([i]) for i in range(len(tokenizer))) if re.fullmatch(r" ?[A-Za-z]+", w)})
    if len(vocab) < cfg.icl_examples + 2:
        raise E2EDictError(f"absorption: the tokenizer has only {len(vocab)} alphabetic word tokens")
    rng = random.Random(cfg.seed)
    if cfg.max_words is not None and len(vocab) > cfg.max_words:
        vocab = sorted(rng.sample(vocab, cfg.max_words))
    before, _, after = cfg.template.partition("{word}")
    dropped = {"answer_not_one_token": 0, "word_not_one_token": 0, "prompt_length": 0}
    answers = {c: tokenize_batch(tokenizer, [f" {c.upper()}"])[0] for c in LETTERS}
    bad_answers = [c for c, ids in answers.items() if len(ids) != 1]
    texts, words = [], []
    for w in vocab:
        letter = w.strip()[0].lower()
        if letter in bad_answers:
            dropped["answer_not_one_token"] += 1
            continue
        pool = [e for e in rng.sample(vocab, cfg.icl_examples + 1) if e != w][: cfg.icl_examples]
        lines = [cfg.template.format(word=e) + f" {e.strip()[0].upper()}" for e in pool]
        texts.append("\n" + "\n".join(lines) + "\n" + cfg.template.format(word=w))
        words.append(w)
    ids = tokenize_batch(tokenizer, texts)
    tail = len(tokenize_batch(tokenizer, [after])[0]) if after else 0
    lead = tokenize_batch(tokenizer, ["\n" + before])[0]
    lines = tokenize_batch(tokenizer, ["\n" + cfg.template.format(word=w) for w in words])
    keep = []
    for i, (t, line) in enumerate(zip(ids, lines, strict=True)):
        # the last line must read: its lead-in, one token for the word, the template's tail
        if len(line) != len(lead) + 1 + tail or line[: len(lead)] != lead or list(t[-len(line) :]) != list(line):
            dropped["word_not_one_token"] += 1
            continue
        keep.append(i)
    if not keep:
        raise E2EDictError("absorption: no word is one token inside its prompt")
    lengths = [len(ids[i]) for i in keep]
    common = max(set(lengths), key=lengths.count)
    dropped["prompt_length"] = sum(1 for n in lengths if n != common)
    keep = [i for i in keep if len(ids[i]) == common]
    if common + 1 > n_ctx:
        raise E2EDictError(f"absorption: prompts of {common} tokens do not fit the model's context of {n_ctx}")
    rows = torch.tensor([[bos, *ids[i]] for i in keep], dtype=torch.long)
    kept_words = [words[i] for i in keep]
    return Prompts(kept_words, [LETTERS.index(w.strip()[0].lower()) for w in kept_words], rows, common - tail, dropped)


def absorption(reader: Reader, n_ctx: int, cfg: AbsorptionConfig | None = None, progress: bool = False) -> dict[str, dict]:
    """``{hook: result}``: the mean absorption fraction, full-absorption rate and split-feature count."""
    cfg = cfg or AbsorptionConfig()
    if reader.tokenizer is None:
        raise E2EDictError("absorption needs the model's tokenizer")
    prompts = build_prompts(reader.tokenizer, reader.bos, cfg, n_ctx)
    acts = _word_activations(reader, prompts, progress)
    order = list(range(len(prompts.words)))
    random.Random(cfg.seed).shuffle(order)
    cut = int(0.8 * len(order))
    train, test = sorted(order[:cut]), sorted(order[cut:])
    y = np.asarray(prompts.letters)
    out = {}
    for h, sae in reader.saes.items():
        probe = _letter_probes(acts[h][train], y[train])
        scores = probe.decision(acts[h][test])
        f1 = {c: _f1(y[test] == c, scores[:, c] > 0) for c in range(26) if (y[train] == c).any()}
        good = [c for c, v in f1.items() if v > cfg.min_probe_f1]
        base = {
            "words": len(prompts.words),
            "dropped_words": prompts.dropped,
            "letters_above_probe_f1": len(good),
            "probe_f1": {LETTERS[c]: round(v, 4) for c, v in f1.items()},
        }
        if len(good) < cfg.min_letters:
            base["skipped"] = (
                f"the model's first-letter probe is too weak at {h}: {len(good)} letters have probe F1 > "
                f"{cfg.min_probe_f1} (needs {cfg.min_letters}; best {max(f1.values(), default=0):.2f})"
            )
            out[h] = base
            continue
        split = _main_latents(reader, h, acts[h], y, train, test, good, cfg)
        out[h] = {**base, **_score(reader, h, sae, acts[h], probe, y, test, scores, split, good, cfg)}
    return out


def _word_activations(reader: Reader, prompts: Prompts, progress: bool) -> dict[str, np.ndarray]:
    out = {h: [] for h in reader.saes}
    bar = tqdm(total=len(prompts.rows), desc="absorption prompts", disable=True if not progress else None, leave=False)
    with bar:
        for _, x in reader.batches(prompts.rows):
            a = reader.activations(x)
            for h in out:
                out[h].append(a[h][:, prompts.position].float().cpu())
            bar.update(len(x))
    return {h: torch.cat(v).numpy() for h, v in out.items()}


class _Probes:
    """One balanced logistic regression per letter: weights [26, d], biases [26]."""

    def __init__(self, W: np.ndarray, b: np.ndarray):
        self.W, self.b = W, b

    def decision(self, x: np.ndarray) -> np.ndarray:
        return x @ self.W.T + self.b


def _letter_probes(x: np.ndarray, y: np.ndarray) -> _Probes:
    W, b = np.zeros((26, x.shape[1])), np.zeros(26)
    for c in range(26):
        if not (y == c).any():
            b[c] = -1.0
            continue
        lr = LogisticRegression(max_iter=1000, class_weight="balanced").fit(x, (y == c).astype(int))
        W[c], b[c] = lr.coef_[0], lr.intercept_[0]
    return _Probes(W, b)


def _f1(truth: np.ndarray, pred: np.ndarray) -> float:
    tp = float((truth & pred).sum())
    denom = float(truth.sum() + pred.sum())
    return 2 * tp / denom if denom else 0.0


def _codes(reader: Reader, h: str, acts: np.ndarray, latents: torch.Tensor | None = None, batch: int = 4096) -> torch.Tensor:
    """The SAE's codes of stored activations, in batches (only ``latents``' columns where given)."""
    sae = reader.saes[h]
    parts = []
    with reader.inference():
        for s in range(0, len(acts), batch):
            a = torch.from_numpy(acts[s : s + batch]).to(reader.device, next(sae.parameters()).dtype)
            c = sae(a)[1].float()
            parts.append((c if latents is None else c[:, latents]).cpu())
    return torch.cat(parts)


def _l1_ranking(reader: Reader, h: str, acts: np.ndarray, y: np.ndarray, cfg: AbsorptionConfig) -> torch.Tensor:
    """SAEBench's k-sparse ranking: a one-vs-rest linear probe on the codes (BCE with positive
    weights, Adam, an L1 penalty on the weights), trained on batches of codes computed as needed;
    returns its weights [26, d_sae]."""
    g = torch.Generator().manual_seed(cfg.seed)
    d_sae = reader.saes[h].d_sae
    W = torch.zeros(26, d_sae, requires_grad=True)
    b = torch.zeros(26, requires_grad=True)
    torch.nn.init.normal_(W, std=0.01, generator=g)
    target = torch.nn.functional.one_hot(torch.from_numpy(y), 26).float()
    pos = target.sum(0).clamp_min(1)
    pos_weight = (len(y) - pos) / pos
    opt = torch.optim.Adam([W, b], lr=0.01)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=(1e-5 / 0.01) ** (1 / max(1, cfg.l1_epochs)))
    codes = _codes(reader, h, acts) if len(acts) * d_sae <= 50_000_000 else None
    for _ in range(cfg.l1_epochs):
        perm = torch.randperm(len(y), generator=g)
        for s in range(0, len(y), 4096):
            idx = perm[s : s + 4096]
            x = codes[idx] if codes is not None else _codes(reader, h, acts[idx.numpy()])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ W.T + b, target[idx], pos_weight=pos_weight)
            loss = loss + cfg.l1_decay * W.abs().sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return W.detach()


def _main_latents(reader, h, acts, y, train, test, letters, cfg: AbsorptionConfig) -> dict[int, list[int]]:
    """Each letter's main latents: the top-k of the L1 ranking while test F1 rises by more than the jump threshold."""
    ranking = _l1_ranking(reader, h, acts[train], y[train], cfg)
    top = {c: ranking[c].topk(cfg.max_k).indices for c in letters}
    latents = torch.unique(torch.cat(list(top.values())))
    col = {int(v): j for j, v in enumerate(latents.tolist())}
    tr, te = _codes(reader, h, acts[train], latents).numpy(), _codes(reader, h, acts[test], latents).numpy()
    out = {}
    for c in letters:
        prev, best = -100.0, []
        for k in range(1, cfg.max_k + 1):
            ids = top[c][:k].tolist()
            cols = [col[i] for i in ids]
            lr = LogisticRegression(max_iter=500, class_weight="balanced").fit(tr[:, cols], (y[train] == c).astype(int))
            f1 = _f1(y[test] == c, lr.decision_function(te[:, cols]) > 0)
            if f1 > prev + cfg.f1_jump_threshold:
                prev, best = f1, ids
            else:
                break
        out[c] = best
    return out


def _directions(sae) -> torch.Tensor:
    """Unit direction of each latent in the space the probe reads: the dictionary's rows, or a
    transcoder's encoder columns."""
    with torch.no_grad():
        D = sae.W_enc.T if sae.hook_name_out is not None else sae.dictionary
        D = D.detach().float().cpu()
    return D / D.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _score(reader, h, sae, acts, probe: _Probes, y, test, scores, split, letters, cfg: AbsorptionConfig) -> dict:
    dirs = _directions(sae)
    codes = _codes(reader, h, acts[test])
    x = torch.from_numpy(acts[test]).float()
    per_letter = {}
    for c in letters:
        w = torch.from_numpy(probe.W[c]).float()
        unit = w / w.norm()
        cos = dirs @ unit
        rows = [i for i in range(len(test)) if y[test][i] == c and scores[i, c] > 0]
        fractions, full = [], 0
        for i in rows:
            f, is_full = word_absorption(codes[i], cos, float(x[i] @ unit), split[c], cfg)
            fractions.append(f)
            full += int(is_full)
        n = max(1, len(rows))
        per_letter[LETTERS[c]] = {
            "mean_absorption_fraction": sum(fractions) / n,
            "full_absorption_rate": full / n,
            "num_full_absorption": full,
            "num_probe_true_positives": len(rows),
            "num_split_features": len(split[c]),
            "main_latents": split[c],
        }
    vals = list(per_letter.values())
    return {
        "mean_absorption_fraction": float(np.mean([v["mean_absorption_fraction"] for v in vals])),
        "mean_full_absorption": float(np.mean([v["full_absorption_rate"] for v in vals])),
        "mean_num_split_features": float(np.mean([v["num_split_features"] for v in vals])),
        "letters": per_letter,
    }
