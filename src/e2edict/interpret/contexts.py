"""Streaming passes over held-out sequences that find, for each SAE, which latents are alive and
where chosen latents fire: what the explanation metrics (`e2edict.interpret.explain`,
`e2edict.interpret.autointerp`) are built from.

Every pass reads one batch of codes at a time and keeps only per-latent figures (counts, maxima,
the top contexts, weighted samples): no [tokens x d_sae] matrix is ever held. The BOS position
is never counted (SAEBench masks it too: many latents fire there for no reason of the text).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

ActsFn = Callable[[torch.Tensor], torch.Tensor]  # rows [B, T] -> the chosen latents' codes [B, T, n]


def _bar(total: int, desc: str, progress: bool):
    return tqdm(total=total, desc=desc, unit="seq", disable=True if not progress else None, leave=False)


def firing_stats(codes_fn: ActsFn, sequences: torch.Tensor, d_sae: int, batch_size: int, progress: bool = False, desc: str = ""):
    """Each latent's firing count and maximum over ``sequences`` (BOS left out): ``(count [d_sae], max [d_sae])``."""
    count = torch.zeros(d_sae, dtype=torch.long)
    peak = torch.zeros(d_sae)
    with _bar(len(sequences), desc or "finding alive latents", progress) as bar:
        for s in range(0, len(sequences), batch_size):
            c = codes_fn(sequences[s : s + batch_size])[:, 1:].reshape(-1, d_sae)
            count += (c > 0).sum(0).cpu()
            peak = torch.maximum(peak, c.amax(0).cpu())
            bar.update(min(batch_size, len(sequences) - s))
    return count, peak


@dataclass
class Examples:
    """For each chosen latent (rows): top windows, importance-weighted samples and random draws,
    each a (sequence, position) pair into the sequences they were found in (-1: none)."""

    top_val: torch.Tensor  # [n, n_top]
    top_at: torch.Tensor  # [n, n_top, 2]
    iw_at: torch.Tensor  # [n, n_iw, 2]
    rand_at: torch.Tensor  # [n, n_rand, 2]


def collect_examples(
    acts_fn: ActsFn,
    sequences: torch.Tensor,
    n_latents: int,
    n_top: int,
    n_iw: int,
    n_rand: int,
    batch_size: int,
    seed: int,
    progress: bool = False,
    consumers: Sequence[Callable[[torch.Tensor, torch.Tensor], None]] = (),
) -> Examples:
    """One pass: each latent's ``n_top`` highest activations, at most one per sequence (so their
    windows never overlap); ``n_iw`` positions drawn with probability proportional to activation
    (weighted reservoir sampling, keys ``u^(1/a)``) outside the top sequences; ``n_rand`` positions
    drawn uniformly (their activation, firing or not, is read where they are used). Each of
    ``consumers`` is handed every batch's tokens and codes too, so the same pass serves it."""
    g = torch.Generator().manual_seed(seed)
    n_seq, T = sequences.shape
    top_val = torch.full((n_latents, n_top), -1.0)
    top_at = torch.full((n_latents, n_top, 2), -1, dtype=torch.long)
    m = n_iw + n_top  # spare keys: samples in a top sequence are dropped at the end
    key = torch.full((n_latents, m), -1.0)
    key_at = torch.full((n_latents, m, 2), -1, dtype=torch.long)
    with _bar(n_seq, "collecting examples", progress) as bar:
        for s in range(0, n_seq, batch_size):
            x = sequences[s : s + batch_size]
            a = acts_fn(x).float().cpu()  # [B, T, n]
            for consume in consumers:
                consume(x, a)
            a[:, 0] = 0.0
            B = a.shape[0]
            per_seq, where = a.max(1)  # [B, n]
            cand_v = torch.cat([top_val, per_seq.T], 1)
            seq_ids = torch.arange(s, s + B).expand(n_latents, B)
            cand_at = torch.cat([top_at, torch.stack([seq_ids, where.T], -1)], 1)
            best = cand_v.topk(n_top, dim=1).indices
            top_val, top_at = cand_v.gather(1, best), cand_at.gather(1, best[..., None].expand(-1, -1, 2))
            flat = a.permute(2, 0, 1).reshape(n_latents, -1)  # [n, B*T]
            u = torch.rand(flat.shape, generator=g)
            k = torch.where(flat > 0, u.clamp_min(1e-12).log() / flat.clamp_min(1e-12), torch.full_like(flat, -float("inf")))
            k = k.exp()  # u^(1/a), in (0, 1]; 0 where the latent is off
            pos = torch.arange(flat.shape[1])
            at = torch.stack([s + pos // T, pos % T], -1).expand(n_latents, -1, -1)
            cand_k, cand_a = torch.cat([key, k], 1), torch.cat([key_at, at], 1)
            best = cand_k.topk(m, dim=1).indices
            key, key_at = cand_k.gather(1, best), cand_a.gather(1, best[..., None].expand(-1, -1, 2))
            bar.update(B)
    top_at[top_val <= 0] = -1
    iw_at = torch.full((n_latents, n_iw, 2), -1, dtype=torch.long)
    for i in range(n_latents):
        tops = set(top_at[i, :, 0].tolist())
        picks = [tuple(p) for p, kk in zip(key_at[i].tolist(), key[i].tolist(), strict=True) if kk > 0 and p[0] not in tops]
        for j, p in enumerate(picks[:n_iw]):
            iw_at[i, j] = torch.tensor(p)
    rand_at = torch.stack(
        [torch.randint(0, n_seq, (n_latents, n_rand), generator=g), torch.randint(1, T, (n_latents, n_rand), generator=g)], -1
    )
    return Examples(top_val, top_at, iw_at, rand_at)


def window(sequence_len: int, pos: int, buffer: int) -> tuple[int, int]:
    """The window ``[lo, hi)`` of up to ``buffer`` tokens either side of ``pos`` (BOS left out)."""
    return max(1, pos - buffer), min(sequence_len, pos + buffer + 1)
