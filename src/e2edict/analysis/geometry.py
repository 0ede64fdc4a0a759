"""Dictionary geometry: how close each alive decoder direction is to its nearest neighbour,
inside one SAE and across SAEs (another type or seed), with bootstrap confidence intervals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from e2edict.saes import SAE, load_sae


def alive_mask(folder: Path, sae: SAE) -> torch.Tensor:
    """Latents that fired in the run's evaluation (from ``sparsity.safetensors``); all if it is absent."""
    f = folder / "sparsity.safetensors"
    if not f.is_file():
        return torch.ones(sae.d_sae, dtype=torch.bool)
    log_density = load_file(str(f))["sparsity"]
    return log_density > -9.5  # log10(0 + 1e-10) = -10 marks a latent that never fired


def unit_directions(sae: SAE, mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        d = sae.dictionary.detach().float()
    d = d / d.norm(dim=1, keepdim=True)
    return d if mask is None else d[mask]


def max_cosine(a: torch.Tensor, b: torch.Tensor | None = None, chunk: int = 4096) -> torch.Tensor:
    """For each row of ``a``, its largest cosine similarity to a row of ``b`` (to the other rows of
    ``a`` when ``b`` is None). Chunked, so 50k-latent dictionaries fit in memory."""
    same = b is None
    b = a if b is None else b
    out = torch.empty(len(a))
    for i in range(0, len(a), chunk):
        sims = a[i : i + chunk] @ b.T
        if same:
            idx = torch.arange(i, min(i + chunk, len(a)))
            sims[torch.arange(len(idx)), idx] = -2.0  # exclude each direction itself
        out[i : i + chunk] = sims.max(dim=1).values
    return out


def bootstrap_ci(values: np.ndarray, n: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean."""
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(n, len(values)), replace=True).mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def summarize(values: torch.Tensor) -> dict[str, Any]:
    v = values.double().numpy()
    lo, hi = bootstrap_ci(v)
    return {"n": len(v), "mean": float(v.mean()), "median": float(np.median(v)), "ci95_low": lo, "ci95_high": hi}


def geometry(sae_folders: dict[str, Path], progress: bool = False) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Within-SAE and cross-SAE max cosine similarity for SAEs at the same hook.

    ``sae_folders`` maps a label to an SAE folder. Returns table rows and the raw distributions."""
    dirs: dict[str, torch.Tensor] = {}
    hooks: dict[str, str] = {}
    for label, folder in sae_folders.items():
        sae = load_sae(folder)
        dirs[label] = unit_directions(sae, alive_mask(folder, sae))
        hooks[label] = sae.hook_name
    rows, dists = [], {}
    from tqdm.auto import tqdm

    for a in tqdm(list(dirs), desc="geometry", unit="SAE", disable=True if not progress else None, leave=False):
        if len(dirs[a]) < 2:
            continue
        within = max_cosine(dirs[a])
        dists[f"{a} within"] = within
        rows.append({"sae": a, "against": "itself", **summarize(within)})
        for b in dirs:
            if b != a and hooks[a] == hooks[b] and len(dirs[b]):
                cross = max_cosine(dirs[a], dirs[b])
                dists[f"{a} vs {b}"] = cross
                rows.append({"sae": a, "against": b, **summarize(cross)})
    return rows, dists


def write_geometry(rows: list[dict[str, Any]], dists: dict[str, torch.Tensor], out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    cols = ["sae", "against", "n", "mean", "median", "ci95_low", "ci95_high"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    (out / "geometry.md").write_text("\n".join(lines) + "\n")
    with open(out / "geometry.csv", "w") as fh:
        fh.write(",".join(cols) + "\n")
        for r in rows:
            fh.write(",".join(f'"{r[c]}"' if isinstance(r[c], str) else repr(r[c]) for c in cols) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4.2))
    bins = np.linspace(-0.2, 1.0, 61)
    for label, v in dists.items():
        ax.hist(v.numpy(), bins=bins, histtype="step", label=label, density=True)
    ax.set_xlabel("max cosine similarity to another dictionary direction")
    ax.set_ylabel("density")
    if dists:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "geometry.png", dpi=120)
    plt.close(fig)
    return {"geometry_md": out / "geometry.md", "geometry_csv": out / "geometry.csv", "geometry_png": out / "geometry.png"}
