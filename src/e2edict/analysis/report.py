"""`e2edict report RUN_DIR`: a static HTML report that opens from disk (no server, no network).

``RUN_DIR/report/index.html`` shows the config, the final metrics and training curves; one set of
paginated pages per SAE is a feature browser: features ordered by firing density (`feature_order`: the
near-always-on ones last), each with its
top-activating contexts (token-level highlighting), an activation histogram, and the tokens its
decoder direction promotes and suppresses most through the unembedding. One pass over the data
collects everything, so 50k-latent SAEs stay fast (only the top ``features`` are shown).
Every token is escaped by Jinja2's autoescaping; file names are built from indices, never from
hook names or tokens.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jinja2 import Environment, PackageLoader, select_autoescape
from tqdm.auto import tqdm

from e2edict.backbones.base import Backbone
from e2edict.interpret.reading import token_strings
from e2edict.rundir import RunDir
from e2edict.saes import SAE
from e2edict.saes.base import eval_mode
from e2edict.splice import evaluation_forward


@dataclass
class FeatureStats:
    """Collected in one pass: top contexts and activation samples of the chosen features."""

    ids: torch.Tensor  # [F] latent indices
    k: int
    top_vals: torch.Tensor = field(init=False)
    top_where: torch.Tensor = field(init=False)  # [F, k] flat token index into the data
    samples: list[list[torch.Tensor]] = field(init=False)
    max_samples: int = 20_000

    def __post_init__(self) -> None:
        f = len(self.ids)
        self.top_vals = torch.full((f, self.k), -math.inf)
        self.top_where = torch.full((f, self.k), -1, dtype=torch.long)
        self.samples = [[] for _ in range(f)]
        self._n = [0] * f

    def add(self, codes: torch.Tensor, offset: int) -> None:
        """``codes``: [tokens, d_sae] for a block of the data starting at flat index ``offset``."""
        acts = codes[:, self.ids].T.float().cpu()  # [F, tokens]
        k = min(self.k, acts.shape[1])
        vals, idx = acts.topk(k, dim=1)
        both_v = torch.cat([self.top_vals, vals], dim=1)
        both_w = torch.cat([self.top_where, idx + offset], dim=1)
        best = both_v.topk(self.k, dim=1).indices
        self.top_vals = both_v.gather(1, best)
        self.top_where = both_w.gather(1, best)
        for i in range(len(self.ids)):
            if self._n[i] < self.max_samples:
                nz = acts[i][acts[i] > 0][: self.max_samples - self._n[i]]
                if len(nz):
                    self.samples[i].append(nz)
                    self._n[i] += len(nz)


def _svg_histogram(values: torch.Tensor, bins: int = 24, width: int = 240, height: int = 60) -> str:
    """A tiny inline SVG bar chart of the nonzero activations (numbers only, nothing to escape)."""
    if len(values) == 0:
        return ""
    hi = float(values.max())
    counts = torch.histc(values, bins=bins, min=0.0, max=hi if hi > 0 else 1.0)
    top = float(counts.max()) or 1.0
    w = width / bins
    bars = "".join(
        f'<rect x="{i * w:.1f}" y="{height - c / top * height:.1f}" width="{w - 1:.1f}" height="{c / top * height:.1f}"/>'
        for i, c in enumerate(counts.tolist())
    )
    return (
        f'<svg class="hist" width="{width}" height="{height + 14}" viewBox="0 0 {width} {height + 14}">'
        f'<g fill="#4a7bd0">{bars}</g><text x="0" y="{height + 12}">0</text>'
        f'<text x="{width}" y="{height + 12}" text-anchor="end">{hi:.3g}</text></svg>'
    )


def _logit_tokens(tok, eff: torch.Tensor, n: int) -> tuple[list, list]:
    """The ``n`` tokens a direction promotes most and suppresses most, with their logit effects."""
    up, down = eff.topk(n), (-eff).topk(n)
    promoted = list(zip(token_strings(tok, up.indices.tolist()), up.values.tolist(), strict=True))
    return promoted, list(zip(token_strings(tok, down.indices.tolist()), (-down.values).tolist(), strict=True))


def _device(saes: dict[str, SAE]) -> torch.device:
    return next(next(iter(saes.values())).parameters()).device


def collect_features(
    backbone: Backbone,
    saes: dict[str, SAE],
    sequences: torch.Tensor,
    densities: dict[str, torch.Tensor],
    n_features: int,
    k: int,
    batch_size: int,
    progress: bool = False,
    extra: dict[str, list[int]] | None = None,
) -> dict[str, FeatureStats]:
    """One pass over ``sequences``: for each SAE, the first ``n_features`` latents of `feature_order`
    (then those of ``extra``, e.g. the ones interp.json explains): their top-``k`` contexts and
    activation samples (codes from the spliced run with every SAE in place)."""
    stats = {
        h: FeatureStats(_with_extra(feature_order(d)[:n_features], (extra or {}).get(h, [])), k) for h, d in densities.items()
    }
    n_ctx = sequences.shape[1]
    starts = range(0, len(sequences), batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc="finding top contexts", unit="batch", disable=True if not progress else None, leave=False):
            x = sequences[start : start + batch_size].to(_device(saes))
            out = evaluation_forward(backbone, saes, x, [])
            for h, s in stats.items():
                if len(s.ids):
                    s.add(out.codes[h].flatten(0, 1), start * n_ctx)
    return stats


def _with_extra(ids: torch.Tensor, extra: list[int]) -> torch.Tensor:
    more = [i for i in extra if i not in set(ids.tolist())]
    return torch.cat([ids, torch.tensor(more, dtype=ids.dtype)]) if more else ids


def interp_by_latent(interp: dict[str, Any] | None, hook: str) -> dict[int, dict[str, Any]]:
    """interp.json's per-latent figures of one SAE: the n-gram explanation and its scores, the
    token set, and autointerp's explanation and score, by latent id."""
    entry = ((interp or {}).get("saes") or {}).get(hook) or {}
    out: dict[int, dict[str, Any]] = {}
    for section in ("explanations", "autointerp"):
        for latent, figures in ((entry.get(section) or {}).get("per_latent") or {}).items():
            out.setdefault(int(latent), {})[section] = figures
    return out


def _feature_cards(
    sae: SAE,
    stats: FeatureStats,
    densities: torch.Tensor,
    sequences: torch.Tensor,
    backbone: Backbone,
    codes: dict[int, torch.Tensor],
    window: int,
    n_logit_tokens: int,
    interp: dict[int, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    tok = backbone.tokenizer
    n_ctx = sequences.shape[1]
    flat = sequences.flatten()
    with torch.no_grad():
        dirs = sae.dictionary[stats.ids].float()
        W_U = backbone.unembed().float()
        # [F, vocab]: each direction through the unembedding, where it lives in the residual stream's width
        logit_effect = dirs @ W_U if dirs.shape[1] == W_U.shape[0] else None
    cards = []
    for i, latent in enumerate(stats.ids.tolist()):
        contexts = []
        for v, where in zip(stats.top_vals[i].tolist(), stats.top_where[i].tolist(), strict=True):
            if where < 0 or v <= 0:
                continue
            seq, pos = divmod(where, n_ctx)
            lo, hi = max(0, pos - window), min(n_ctx, pos + window // 2 + 1)
            ids = flat[seq * n_ctx + lo : seq * n_ctx + hi].tolist()
            acts = codes[seq][lo:hi, i].tolist()
            peak = max(acts) or 1.0
            contexts.append(
                {
                    "value": v,
                    "tokens": [
                        {"text": t, "act": a, "alpha": max(0.0, a / peak), "peak": lo + j == pos}
                        for j, (t, a) in enumerate(zip(token_strings(tok, ids), acts, strict=True))
                    ],
                }
            )
        promoted, suppressed = _logit_tokens(tok, logit_effect[i], n_logit_tokens) if logit_effect is not None else ([], [])
        samples = torch.cat(stats.samples[i]) if stats.samples[i] else torch.zeros(0)
        cards.append(
            {
                "id": latent,
                "density": float(densities[latent]),
                "max_act": float(stats.top_vals[i, 0]) if stats.top_vals[i, 0] > -math.inf else 0.0,
                "contexts": contexts,
                "histogram": _svg_histogram(samples),
                "promoted": promoted,
                "suppressed": suppressed,
                "interp": (interp or {}).get(latent),
            }
        )
    return cards


def context_codes(
    backbone: Backbone, saes: dict[str, SAE], sequences: torch.Tensor, stats: dict[str, FeatureStats], batch_size: int
) -> dict[str, dict[int, torch.Tensor]]:
    """For every sequence that holds a top context, the chosen features' codes at every position:
    ``{hook: {sequence index: [n_ctx, F]}}``, from one batched pass over just those sequences."""
    n_ctx = sequences.shape[1]
    wanted = sorted({int(w) // n_ctx for s in stats.values() for w in s.top_where.flatten().tolist() if w >= 0})
    out: dict[str, dict[int, torch.Tensor]] = {h: {} for h in stats}
    with torch.no_grad():
        for start in range(0, len(wanted), batch_size):
            idx = wanted[start : start + batch_size]
            res = evaluation_forward(backbone, saes, sequences[idx].to(_device(saes)), [])
            for h, s in stats.items():
                sel = res.codes[h][:, :, s.ids].float().cpu()
                for row, seq in enumerate(idx):
                    out[h][seq] = sel[row]
    return out


DENSE = 0.1  # a latent firing on more than this fraction of tokens is near-always-on


def feature_order(density: torch.Tensor) -> torch.Tensor:
    """The browser's order: latents that fired, densest first among those at most `DENSE`, then
    the near-always-on ones (the last pages), which say little about any one context."""
    fired = torch.nonzero(density > 0).flatten()
    by_density = fired[torch.argsort(density[fired], descending=True, stable=True)]
    dense = density[by_density] > DENSE
    return torch.cat([by_density[~dense], by_density[dense]])


def _curves_png(metrics_path: Path, out: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_path.is_file():
        return False
    rows = []
    for line in metrics_path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    train = [r for r in rows if r.get("split") == "train"]
    if not train:
        return False
    keys = ["loss"] + [k for k in train[0] if k == "kl" or k.startswith(("l0/", "local/", "downstream"))]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        ax.plot([r["tokens"] for r in train if key in r], [r[key] for r in train if key in r], lw=1, label="train")
        ev = [r for r in rows if r.get("split") == "eval" and key in r]
        if ev:
            ax.plot([r["tokens"] for r in ev], [r[key] for r in ev], "o", ms=3, label="held-out eval")
            ax.legend(fontsize=7)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("tokens", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True


def flat_figures(eval_result: dict[str, Any]) -> dict[str, Any]:
    """eval.json's run-level figures for the index table: nested sections (``init``, ``adapter``,
    ``without_adapter``, ``adapter_alone``) as ``section.key`` rows, per-SAE entries left to the SAE pages."""
    top: dict[str, Any] = {}
    for key, value in eval_result.items():
        if key == "saes":
            continue
        if isinstance(value, dict):
            top.update({f"{key}.{k}": v for k, v in value.items() if k != "saes"})
        else:
            top[key] = value
    return top


def write_report(
    run_dir: Path | RunDir,
    backbone: Backbone,
    saes: dict[str, SAE],
    sequences: torch.Tensor,
    eval_result: dict[str, Any],
    config_text: str,
    densities: dict[str, torch.Tensor],
    n_features: int = 200,
    per_page: int = 50,
    k: int = 8,
    window: int = 12,
    batch_size: int = 16,
    n_logit_tokens: int = 8,
    run_name: str | None = None,
    progress: bool = False,
    interp: dict[str, Any] | None = None,
) -> Path:
    env = Environment(loader=PackageLoader("e2edict.analysis", "templates"), autoescape=select_autoescape(["html"]))
    rundir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    title = run_name or rundir.path.name
    out = rundir.report
    out.mkdir(exist_ok=True)
    has_curves = _curves_png(rundir.metrics_file, out / "curves.png")
    with eval_mode(saes):
        explained = {h: sorted(interp_by_latent(interp, h)) for h in saes}
        stats = collect_features(backbone, saes, sequences, densities, n_features, k, batch_size, progress, explained)
        codes = context_codes(backbone, saes, sequences, stats, batch_size)
    sae_pages = []
    for si, (h, sae) in enumerate(saes.items()):
        cards = _feature_cards(
            sae, stats[h], densities[h], sequences, backbone, codes[h], window, n_logit_tokens, interp_by_latent(interp, h)
        )
        pages = max(1, math.ceil(len(cards) / per_page))
        names = [f"sae{si}_features_{p + 1}.html" for p in range(pages)]
        for p in range(pages):
            html = env.get_template("features.html").render(
                run=title,
                hook=h,
                sae=sae,
                cards=cards[p * per_page : (p + 1) * per_page],
                page=p + 1,
                pages=pages,
                prev=names[p - 1] if p else None,
                next=names[p + 1] if p + 1 < pages else None,
                metrics=eval_result["saes"].get(h, {}),
                shown=len(cards),
                explained=len(cards) - min(n_features, len(feature_order(densities[h]))),
            )
            (out / names[p]).write_text(html, encoding="utf-8")
        sae_pages.append({"hook": h, "link": names[0], "metrics": eval_result["saes"].get(h, {}), "shown": len(cards)})
    top = flat_figures(eval_result)
    index = env.get_template("index.html").render(run=title, config=config_text, top=top, saes=sae_pages, curves=has_curves)
    (out / "index.html").write_text(index, encoding="utf-8")
    return out / "index.html"
