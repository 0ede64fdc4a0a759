"""Sparse probing, as SAEBench defines it (``sae_bench/evals/sparse_probing``).

Each text is read once; the model's activation at the SAE's hook and the SAE's codes are
mean-pooled over the text's tokens (BOS and padding left out). On a balanced one-vs-rest task
the latents are ranked by the absolute difference of their class means on the training split,
and a logistic regression (scikit-learn, L2, C = 1, as SAEBench's ``train_sklearn_probe``) on the
top k latents is scored by test accuracy, for each k; the same regression on the model's whole
pooled activation is the ceiling (``llm_test_accuracy``).

The passes stream: the first accumulates, per task, the sum of pooled codes over its positive and
over its negative training texts (one [d_sae] vector each) and keeps the pooled model
activations ([texts, d]); the second keeps the pooled codes of the chosen latents only. No
[texts x d_sae] matrix is held.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from tqdm.auto import tqdm

from e2edict.interpret.reading import Reader
from e2edict.interpret.table import K_VALUES
from e2edict.interpret.tasks import Split, Task, one_vs_rest


def _pooled(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked positions: ``[B, T, d]`` -> ``[B, d]`` (float64)."""
    m = mask.to(values.device, torch.float64).unsqueeze(-1)
    return (values.double() * m).sum(1) / m.sum(1).clamp_min(1.0)


def fit_accuracy(x_train: np.ndarray, y_train: list[int], x_test: np.ndarray, y_test: list[int]) -> float:
    """Test accuracy of SAEBench's probe: scikit-learn's logistic regression, L2, C = 1, 1,000 iterations."""
    probe = LogisticRegression(C=1.0, max_iter=1000)
    probe.fit(x_train, np.asarray(y_train))
    return float((probe.predict(x_test) == np.asarray(y_test)).mean())


def top_k_mean_diff(pos_sum: torch.Tensor, n_pos: int, neg_sum: torch.Tensor, n_neg: int, k: int) -> torch.Tensor:
    """The ``k`` latents with the largest |mean over positives - mean over negatives|."""
    diff = (pos_sum / n_pos - neg_sum / n_neg).abs()
    return torch.argsort(diff, descending=True, stable=True)[:k]


def sparse_probing(
    reader: Reader,
    tasks: list[Task],
    n_train: int = 1000,
    n_test: int = 250,
    ks: tuple[int, ...] = K_VALUES,
    n_ctx: int = 128,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, dict]:
    """``{hook: result}`` for every SAE of ``reader``: per one-vs-rest task the ceiling and the
    top-k accuracies, and their means over tasks."""
    hooks = list(reader.saes)
    per_hook: dict[str, dict] = {h: {"tasks": {}} for h in hooks}
    for task in tasks:
        splits = one_vs_rest(task.check(), n_train, n_test, seed)
        used = sorted({i for s in splits for i in (*s.train, *s.test)})
        rows, mask = reader.encode_texts([task.texts[i] for i in used], n_ctx)
        where = {i: r for r, i in enumerate(used)}
        acts, sums = _first_pass(reader, rows, mask, splits, where, progress, task.name)
        chosen = {h: {s.name: top_k_mean_diff(*sums[h][s.name], max(ks)) for s in splits} for h in hooks}
        latents = {h: torch.unique(torch.cat(list(c.values()))) for h, c in chosen.items()}
        codes = _second_pass(reader, rows, mask, latents, progress, task.name)
        for h in hooks:
            col = {int(lat): j for j, lat in enumerate(latents[h].tolist())}
            for s in splits:
                tr, te = [where[i] for i in s.train], [where[i] for i in s.test]
                entry = {"llm_test_accuracy": fit_accuracy(acts[h][tr], s.train_y, acts[h][te], s.test_y)}
                for k in ks:
                    cols = [col[int(lat)] for lat in chosen[h][s.name][:k].tolist()]
                    x = codes[h][:, cols]
                    entry[f"sae_top_{k}_test_accuracy"] = fit_accuracy(x[tr], s.train_y, x[te], s.test_y)
                entry["top_latents"] = chosen[h][s.name].tolist()
                per_hook[h]["tasks"][s.name] = entry
    for h in hooks:
        entries = list(per_hook[h]["tasks"].values())
        keys = ["llm_test_accuracy"] + [f"sae_top_{k}_test_accuracy" for k in ks]
        per_hook[h].update({k: float(np.mean([e[k] for e in entries])) for k in keys})
    return per_hook


def _first_pass(reader: Reader, rows, mask, splits: list[Split], where, progress: bool, name: str):
    """Pooled model activations of every text, and per task the pooled codes summed over its
    positive and its negative training texts."""
    hooks = list(reader.saes)
    role = {}  # row -> [(split name, label)] for training texts
    for s in splits:
        for i, y in zip(s.train, s.train_y, strict=True):
            role.setdefault(where[i], []).append((s.name, y))
    sums = {h: {s.name: [0.0, 0, 0.0, 0] for s in splits} for h in hooks}
    acts = {h: [] for h in hooks}
    bar = tqdm(total=len(rows), desc=f"probing {name}: pass 1", unit="text", disable=True if not progress else None, leave=False)
    with bar:
        for start, x in reader.batches(rows):
            m = mask[start : start + len(x)]
            a, codes = reader.read(x)
            for h in hooks:
                acts[h].append(_pooled(a[h], m).float().cpu())
                pooled = _pooled(codes[h], m).cpu()
                for j in range(len(x)):
                    for sname, y in role.get(start + j, []):
                        acc = sums[h][sname]
                        if y:
                            acc[0] = acc[0] + pooled[j]
                            acc[1] += 1
                        else:
                            acc[2] = acc[2] + pooled[j]
                            acc[3] += 1
            bar.update(len(x))
    return {h: torch.cat(v).numpy() for h, v in acts.items()}, sums


def _second_pass(reader: Reader, rows, mask, latents: dict[str, torch.Tensor], progress: bool, name: str):
    """The pooled codes of the chosen latents, ``{hook: [texts, n_chosen]}``."""
    out = {h: [] for h in latents}
    bar = tqdm(total=len(rows), desc=f"probing {name}: pass 2", unit="text", disable=True if not progress else None, leave=False)
    with bar:
        for start, x in reader.batches(rows):
            m = mask[start : start + len(x)]
            codes = reader.codes(x)
            for h, lat in latents.items():
                out[h].append(_pooled(codes[h][..., lat.to(codes[h].device)], m).float().cpu())
            bar.update(len(x))
    return {h: torch.cat(v).numpy() for h, v in out.items()}
