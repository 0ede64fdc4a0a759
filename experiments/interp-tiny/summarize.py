"""The interpretability experiment's table and plot from its run directories (after `run.sh`).

    python experiments/interp-tiny/summarize.py [--runs out/sweeps/interp-tiny]

Every figure with a bootstrap 95% interval (2,000 resamples, seed 0): sparse probing over its
one-vs-rest tasks, the explanation scores over the explained latents, autointerp over the scored
latents; absorption is reported as interp.json gives it (on the embedded model the model's own
first-letter probe is too weak for the metric). Writes results/interp.md and results/interp.png.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RUNS = ["local-l2", "e2e-l4", "e2eds-l12", "e2e-finetune", "finetune-recipe", "adapter-lora16"]
HOOK = "blocks.2.hook_resid_pre"


def boot(values: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and its percentile-bootstrap 95% interval."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), (n, len(v)))].mean(1)
    return float(v.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def boot_diff(a: list[float], b: list[float], paired: bool, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """mean(a) - mean(b) and its bootstrap 95% interval: resampled in pairs (the same probing
    tasks) or each sample on its own (different latents)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if paired:
        return boot(list(a - b), n, seed)
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    rng = np.random.default_rng(seed)
    d = a[rng.integers(0, len(a), (n, len(a)))].mean(1) - b[rng.integers(0, len(b), (n, len(b)))].mean(1)
    return float(a.mean() - b.mean()), float(np.quantile(d, 0.025)), float(np.quantile(d, 0.975))


def samples(run: Path) -> dict[str, list[float]]:
    """The per-task and per-latent values the intervals are taken over."""
    it = json.loads((run / "interp.json").read_text())["saes"][HOOK]
    tasks = [it["sparse_probing"]["tasks"][k] for k in sorted(it["sparse_probing"]["tasks"])]
    lat = list(it["explanations"]["per_latent"].values())
    nan = float("nan")
    return {
        "probe_top1": [t["sae_top_1_test_accuracy"] for t in tasks],
        "probe_top5": [t["sae_top_5_test_accuracy"] for t in tasks],
        "ngram_precision": [nan if x["precision"] is None else x["precision"] for x in lat],
        "ngram_recall": [nan if x["recall"] is None else x["recall"] for x in lat],
        "tokenset_precision": [nan if x["token_set_precision"] is None else x["token_set_precision"] for x in lat],
    }


def figures(run: Path) -> dict:
    ev = json.loads((run / "eval.json").read_text())
    it = json.loads((run / "interp.json").read_text())["saes"][HOOK]
    sp, ex = it["sparse_probing"], it["explanations"]
    tasks = list(sp["tasks"].values())
    lat = list(ex["per_latent"].values())
    out = {
        "l0": ev["saes"][HOOK]["l0"],
        "ce_loss_increase": ev["ce_loss_increase"],
        "probe_llm": boot([t["llm_test_accuracy"] for t in tasks]),
        "probe_top1": boot([t["sae_top_1_test_accuracy"] for t in tasks]),
        "probe_top5": boot([t["sae_top_5_test_accuracy"] for t in tasks]),
        "ngram_precision": boot([x["precision"] for x in lat]),
        "ngram_recall": boot([x["recall"] for x in lat]),
        "tokenset_precision": boot([x["token_set_precision"] for x in lat]),
        "tokenset_recall": boot([x["token_set_recall"] for x in lat]),
        "absorption": it.get("absorption", {}).get("skipped") or it.get("absorption", {}).get("mean_absorption_fraction"),
    }
    ai = it.get("autointerp")
    out["autointerp"] = boot(ai["scores"]) if ai else None
    return out


def cell(t) -> str:
    if t is None:
        return "not run"
    m, lo, hi = t
    return f"{m:.3f} [{lo:.3f}, {hi:.3f}]"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default=str(HERE.parents[1] / "out" / "sweeps" / "interp-tiny"))
    runs = Path(ap.parse_args().runs)
    found = {name: figures(runs / name) for name in RUNS if (runs / name / "interp.json").is_file()}
    cols = ["probe_top1", "probe_top5", "probe_llm", "ngram_precision", "ngram_recall", "tokenset_precision",
            "tokenset_recall", "autointerp"]  # fmt: skip
    lines = ["| run | L0 | CE-loss increase | " + " | ".join(cols) + " |", "|---" * (len(cols) + 3) + "|"]
    for name, f in found.items():
        lines.append(f"| {name} | {f['l0']:.1f} | {f['ce_loss_increase']:.3f} | " + " | ".join(cell(f[c]) for c in cols) + " |")
    base = samples(runs / RUNS[0]) if RUNS[0] in found else None
    if base is not None:
        keys = list(base)
        lines += ["", f"Difference from {RUNS[0]} (mean and bootstrap 95% interval; probing paired over its tasks, "
                  "explanations over latents):", "", "| run | " + " | ".join(f"Δ {k}" for k in keys) + " |",
                  "|---" * (len(keys) + 1) + "|"]  # fmt: skip
        for name in list(found)[1:]:
            other = samples(runs / name)
            cells = [cell(boot_diff(other[k], base[k], paired=k.startswith("probe"))) for k in keys]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    notes = {f["absorption"] for f in found.values() if isinstance(f["absorption"], str)}
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    text = "\n".join(lines) + "\n" + "".join(f"\nabsorption: {n}\n" for n in sorted(notes))
    (out / "interp.md").write_text(text)
    (out / "interp.json").write_text(json.dumps(found, indent=1) + "\n")
    print(text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ["probe_top1", "probe_top5", "ngram_precision", "ngram_recall", "tokenset_precision", "tokenset_recall"]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.0 * len(shown), 3.6), sharey=False)
    names = list(found)
    for ax, key in zip(axes, shown, strict=True):
        m = [found[n][key][0] for n in names]
        err = [[found[n][key][0] - found[n][key][1] for n in names], [found[n][key][2] - found[n][key][0] for n in names]]
        ax.bar(range(len(names)), m, yerr=err, capsize=3, color=["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple",
                                                                  "tab:brown"][: len(names)])  # fmt: skip
        ax.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
        ax.set_title(key, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "interp.png", dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
