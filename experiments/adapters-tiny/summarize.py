"""The adapter experiment's table and plot from its run directories (after `e2edict sweep`).

    python experiments/adapters-tiny/summarize.py [--runs out/sweeps/adapters-tiny]

CE-loss gap reduction = (source's CE-loss increase - the run's) / source's, on the same 65,536
held-out tokens; "per second" divides it by the run's training-loop time (metrics.jsonl's last
tokens/s); the drift is eval.json's ``adapter_alone`` (the adapted model without SAEs against the
original). Writes results/adapters.md and results/adapters.png beside this file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUDGETS = [15_000, 30_000, 60_000, 150_000]
METHODS = {
    "lora4": "LoRA r4, SAEs held",
    "lora16": "LoRA r16, SAEs held",
    "finetune": "fine-tune SAEs (recipe)",
    "both": "fine-tune + LoRA r16",
}


def read(run: Path) -> dict:
    ev = json.loads((run / "eval.json").read_text())
    ((hook, m),) = ev["saes"].items()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("split") == "train"]
    wall = train[-1]["tokens"] / train[-1]["tokens_per_s"] if train else float("nan")
    alone = ev.get("adapter_alone") or {}
    return {"ce": ev["ce_loss_increase"], "kl": ev["kl"], "l0": m["l0"], "ev": m["explained_variance"], "wall": wall,
            "drift_kl": alone.get("kl"), "drift_ce": alone.get("ce_loss_change")}  # fmt: skip


def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default=str(HERE.parents[1] / "out" / "sweeps" / "adapters-tiny"))
    a = ap.parse_args()
    runs = Path(a.runs)
    lines = ["| SAE | method | extra tokens | CE-loss increase | gap reduction | per 10k tokens | per train s | KL | L0 | "
             "adapter-alone KL | adapter-alone ΔCE | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    curves: dict[tuple[str, str], list[tuple[int, float, float]]] = {}
    for arch in ("relu", "topk"):
        src = read(runs / f"{arch}-source")
        lines.append(f"| {arch} | source (local, 600k) | 0 | {src['ce']:.4f} | — | — | — | {src['kl']:.4f} | "
                     f"{src['l0']:.1f} | — | — | {src['wall']:.0f} |")  # fmt: skip
        for method, label in METHODS.items():
            for b in BUDGETS:
                r = read(runs / f"{arch}-{method}-{b}")
                red = (src["ce"] - r["ce"]) / src["ce"]
                curves.setdefault((arch, label), []).append((b, r["wall"], red))
                lines.append(
                    f"| {arch} | {label} | {b:,} | {r['ce']:.4f} | {100 * red:+.1f}% | {100 * red / (b / 1e4):+.2f}% | "
                    f"{100 * red / r['wall']:+.2f}% | {r['kl']:.4f} | {r['l0']:.1f} | {_fmt(r['drift_kl'], '.4f')} | "
                    f"{_fmt(r['drift_ce'], '+.4f')} | {r['wall']:.1f} |"
                )
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "adapters.md").write_text("\n".join(lines) + "\n")
    _plot(curves, out / "adapters.png")
    print("\n".join(lines))
    return 0


def _plot(curves, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharey="row")
    for col, arch in enumerate(("relu", "topk")):
        for (a, label), pts in curves.items():
            if a != arch:
                continue
            axes[0, col].plot([p[0] for p in pts], [100 * p[2] for p in pts], marker="o", label=label)
            axes[1, col].plot([p[1] for p in pts], [100 * p[2] for p in pts], marker="o", label=label)
        axes[0, col].set_title(f"{arch} source")
        axes[0, col].set_xlabel("extra tokens")
        axes[1, col].set_xlabel("training seconds (2 CPU cores)")
        for ax in axes[:, col]:
            ax.set_xscale("log")
            ax.grid(alpha=0.3)
    for row in range(2):
        axes[row, 0].set_ylabel("CE-loss gap closed (%)")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
