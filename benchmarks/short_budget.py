"""Short budgets: which optimizer and learning rate `loss.preset: finetune` and `loss.preset: adapter`
default to, chosen by the CE-loss gap they close on the embedded model.

Sources: a local ReLU SAE (lambda 1) and a local TopK SAE (k 32) at blocks.2.hook_resid_pre, 1,024
latents, 600k tokens each: the sources of experiments/finetune-tiny and experiments/adapters-tiny,
trained here (or read with ``--sources DIR`` from that sweep's output, which holds them as
``relu-source`` and ``topk-source``). Each source is then trained for a short budget by each
preset with each candidate optimizer and rate:

- ``finetune`` (the SAEs by Karvonen's recipe, ``configs/tiny/finetune.yaml``) and ``adapter``
  (a rank-16 LoRA around the held SAEs, ``configs/tiny/adapter.yaml``);
- AdamW decaying linearly to 0 (the papers' schedule), or schedule-free AdamW at a constant rate
  (what `benchmarks/convergence.py` chose for training from scratch);
- the papers' 5e-5 and a grid around what the embedded model's SAEs train at.

Judged by the gap closed, ``1 - CE-loss increase after / before`` on the run's own evaluation (the
source's figure is the run's ``init`` evaluation, on the same 65,536 held-out tokens); the best
candidate is the one whose worst run (over both sources, and the budgets where several are given)
closes the most. Prints the table, each candidate's mean and worst, and the best per preset;
writes ``results.json`` (rows kept between invocations with the same ``--out``).

    python benchmarks/short_budget.py --out out/short-budget                       # about 20 min on 2 cores
    python benchmarks/short_budget.py --sources out/sweeps/finetune-tiny --out out/short-budget
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tiny"
COMMON = ["train.eval_every_tokens=null", "eval.alive_tokens=65536", "train.log_every=1000000", "train.warmup_tokens=0"]
# the two sources, as experiments/finetune-tiny/sweep.yaml trains them
SOURCES = {
    "relu": ["loss.preset=local", "train.tokens=600000", "loss.sparsity.coeff=1"],
    "topk": ["loss.preset=local", "train.tokens=600000", "saes.architecture=topk", "saes.k=32", "loss.sparsity.coeff=0",
             "saes.init=tied", "saes.b_dec_init=mean", "saes.apply_b_dec_to_input=true", "saes.decoder_norm=project",
             "train.optimizer=schedulefree", "train.lr=3.0e-2", "train.schedule=constant"],
}  # fmt: skip
SPARSITY = {"relu": "loss.sparsity.coeff=1", "topk": "loss.sparsity.coeff=0"}  # the term each source was trained with
OPTIMIZERS = {
    "adamw-linear": ["train.optimizer=adamw", "train.schedule=linear", "train.min_lr_factor=0"],
    "schedulefree": ["train.optimizer=schedulefree", "train.schedule=constant"],
}
RATES = {"finetune": [5e-5, 3e-4, 1e-3, 3e-3], "adapter": [5e-5, 3e-3, 1e-2, 3e-2]}


def train_source(kind: str, out: Path) -> Path:
    from e2edict.config import load_config
    from e2edict.trainer import train

    run_dir = out / f"{kind}-source"
    if not (run_dir / "eval.json").is_file():
        cfg = load_config(CONFIGS / "e2e.yaml", [*COMMON, *SOURCES[kind], f"name={kind}-source"])
        train(cfg, out=run_dir, overwrite=True, progress=False)
    return run_dir


def run_one(preset: str, source: str, src_dir: Path, opt: str, lr: float, tokens: int, out: Path) -> dict:
    from e2edict.config import load_config
    from e2edict.trainer import train

    base = CONFIGS / ("finetune.yaml" if preset == "finetune" else "adapter.yaml")
    ov = [*COMMON, f"saes.init_from={src_dir}", SPARSITY[source], *OPTIMIZERS[opt], f"train.lr={lr}", f"train.tokens={tokens}"]
    run_dir = out / "runs" / f"{preset}-{source}-{opt}-{lr:g}-{tokens}"
    train(load_config(base, ov), out=run_dir, overwrite=True, progress=False)
    ev = json.loads((run_dir / "eval.json").read_text())
    before, after = ev["init"]["ce_loss_increase"], ev["ce_loss_increase"]
    return {"preset": preset, "source": source, "optimizer": opt, "lr": lr, "tokens": tokens,
            "ce_before": before, "ce_after": after, "gap_closed": 1 - after / before}  # fmt: skip


def summary(rows: list[dict]) -> tuple[str, dict[str, dict]]:
    """The gap closed per (preset, optimizer, lr): its mean and its worst over the runs (sources,
    budgets), and the best candidate per preset, by the worst: a default has to serve a ReLU and a
    TopK SAE alike, so a rate that helps one and hurts the other does not win on the mean."""
    got: dict[tuple, list[float]] = {}
    for r in rows:
        got.setdefault((r["preset"], r["optimizer"], r["lr"]), []).append(r["gap_closed"])
    lines = ["| preset | optimizer | lr | mean gap closed | worst | runs |", "|---|---|---|---|---|---|"]
    best: dict[str, dict] = {}
    for (preset, opt, lr), v in sorted(got.items()):
        mean, worst = sum(v) / len(v), min(v)
        lines.append(f"| {preset} | {opt} | {lr:g} | {mean:+.1%} | {worst:+.1%} | {len(v)} |")
        if preset not in best or worst > best[preset]["worst_gap_closed"]:
            best[preset] = {"optimizer": opt, "lr": lr, "mean_gap_closed": mean, "worst_gap_closed": worst}
    return "\n".join(lines), best


def table(rows: list[dict]) -> str:
    lines = ["| preset | source | optimizer | lr | tokens | CE-loss increase before | after | gap closed |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(rows, key=lambda r: (r["preset"], r["source"], r["optimizer"], r["lr"], r["tokens"])):
        lines.append(f"| {r['preset']} | {r['source']} | {r['optimizer']} | {r['lr']:g} | {r['tokens']:,} | "
                     f"{r['ce_before']:.4f} | {r['ce_after']:.4f} | {r['gap_closed']:+.1%} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out/short-budget")
    ap.add_argument("--sources", help="a folder holding relu-source/ and topk-source/ (default: train them under --out)")
    ap.add_argument("--presets", default="finetune,adapter")
    ap.add_argument("--budgets", default="30000", help="extra tokens per run (30k: 5%% of the sources' 600k)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    src_root = Path(a.sources) if a.sources else out
    srcs = {k: (src_root / f"{k}-source" if a.sources else train_source(k, out)) for k in SOURCES}
    for d in srcs.values():
        if not (d / "eval.json").is_file():
            raise SystemExit(f"--sources: {d} is not a finished run directory")
    results = out / "results.json"
    rows: list[dict] = json.loads(results.read_text()) if results.is_file() else []
    have = {(r["preset"], r["source"], r["optimizer"], r["lr"], r["tokens"]) for r in rows}
    for preset in a.presets.split(","):
        for tokens in (int(x) for x in a.budgets.split(",")):
            for opt in OPTIMIZERS:
                for lr in RATES[preset]:
                    for source, src_dir in srcs.items():
                        if (preset, source, opt, lr, tokens) in have:
                            continue
                        rows.append(run_one(preset, source, src_dir, opt, lr, tokens, out))
                        print(json.dumps(rows[-1]), flush=True)
                        results.write_text(json.dumps(rows, indent=1))
    text, best = summary(rows)
    print(table(rows))
    print(text)
    for preset, b in best.items():
        print(
            f"best for {preset}: {b['optimizer']} at lr {b['lr']:g} (gap closed: worst {b['worst_gap_closed']:+.1%}, "
            f"mean {b['mean_gap_closed']:+.1%})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
