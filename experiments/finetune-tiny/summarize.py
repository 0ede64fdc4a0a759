"""The fine-tuning experiment's table and plot from its run directories (after `e2edict sweep`).

    python experiments/finetune-tiny/summarize.py [--runs out/sweeps/finetune-tiny]

CE-loss gap reduction = (source's CE-loss increase - the run's) / source's, on the same 65,536
held-out tokens; wall time is the run's training loop (metrics.jsonl's last tokens/s). Writes
results/finetune.md and results/finetune.png beside this file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE_TOKENS = 600_000
BUDGETS = [15_000, 30_000, 60_000, 150_000]
METHODS = {"finetune": "finetune recipe", "e2e": "plain e2e KL", "local": "more local training"}


def read(run: Path) -> dict:
    ev = json.loads((run / "eval.json").read_text())
    ((hook, m),) = ev["saes"].items()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("split") == "train"]
    wall = train[-1]["tokens"] / train[-1]["tokens_per_s"] if train else float("nan")
    return {"ce": ev["ce_loss_increase"], "kl": ev["kl"], "l0": m["l0"], "ev": m["explained_variance"], "wall": wall}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default=str(HERE.parents[1] / "out" / "sweeps" / "finetune-tiny"))
    a = ap.parse_args()
    runs = Path(a.runs)
    lines = ["| SAE | method | extra tokens | CE-loss increase | gap reduction | KL | L0 | explained var. | train s |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    curves: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for arch in ("relu", "topk"):
        src = read(runs / f"{arch}-source")
        lines.append(f"| {arch} | source (local, 600k) | 0 | {src['ce']:.4f} | — | {src['kl']:.4f} | {src['l0']:.1f} | "
                     f"{src['ev']:.3f} | {src['wall']:.0f} |")  # fmt: skip
        for method, label in METHODS.items():
            for b in BUDGETS:
                r = read(runs / f"{arch}-{method}-{b}")
                red = (src["ce"] - r["ce"]) / src["ce"]
                curves.setdefault((arch, label), []).append((b, red))
                lines.append(f"| {arch} | {label} | {b:,} | {r['ce']:.4f} | {100 * red:+.1f}% | {r['kl']:.4f} | "
                             f"{r['l0']:.1f} | {r['ev']:.3f} | {r['wall']:.0f} |")  # fmt: skip
        for b in BUDGETS:  # the sweep runs the smallest and largest totals; others where present
            if not (runs / f"{arch}-scratch-e2e-{SOURCE_TOKENS + b}" / "eval.json").is_file():
                continue
            r = read(runs / f"{arch}-scratch-e2e-{SOURCE_TOKENS + b}")
            red = (src["ce"] - r["ce"]) / src["ce"]
            curves.setdefault((arch, "e2e from scratch, same total"), []).append((b, red))
            lines.append(f"| {arch} | e2e from scratch ({SOURCE_TOKENS + b:,} tokens) | — | {r['ce']:.4f} | {100 * red:+.1f}% | "
                         f"{r['kl']:.4f} | {r['l0']:.1f} | {r['ev']:.3f} | {r['wall']:.0f} |")  # fmt: skip
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "finetune.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, arch in zip(axes, ("relu", "topk"), strict=True):
        for (a2, label), pts in curves.items():
            if a2 == arch:
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=label)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("tokens after the 600k-token local SAE")
        ax.set_title(f"{arch}: local SAE at blocks.2.hook_resid_pre")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("CE-loss gap reduction vs the source (%)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out / "finetune.png", dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
