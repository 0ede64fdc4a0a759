"""Quality per token: e2edict against EleutherAI's sparsify, on the same rows, judged by one evaluation.

An SAE at the output of the embedded model's block 2 (``transformer.h.2``, Hugging Face backbone),
batch 16 x 128, fp32, one process each, trained by e2edict (its `train`, as a user runs it) and
by sparsify (its own `Trainer`, `loss_fn="kl"` or `"fvu"`, its defaults: schedule-free sign-SGD)
on the same packed rows in the same order (the rows e2edict's seeded batcher yields, handed to
sparsify as a dataset it reads unshuffled). Both SAEs are then evaluated by e2edict's
`evaluate_saes` on the same held-out tokens (a sparsify SAE through `e2edict.saes.load_sparsify`,
which computes exactly sparsify's latents).

Budgets: e2edict trains one run per budget, as a user would (its decay schedules depend on the
budget). sparsify's optimizer is schedule-free (no schedule, nothing depends on the budget), so one
sparsify run is evaluated at each budget, as its own checkpointing sees it (`optimizer.eval()`).

Prints, per setting and budget: CE-loss increase, KL, L0, explained variance, alive latents, and
tokens/s (training only, evaluation excluded); then the tokens each needs to reach given CE-loss
increases (log-linear interpolation between budgets). Writes ``results.json`` and a plot to
``--out``.

    .venv/bin/pip install -e '.[bench]'
    python benchmarks/convergence.py --out out/convergence            # the full table (about 1 h on 2 cores)
    python benchmarks/convergence.py --budgets 100000,200000 --settings topk-e2e --out out/conv-quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

HOOK_HF, HOOK_SPARSIFY = "transformer.h.2", "h.2"
BATCH, N_CTX, K, RATIO = 16, 128, 32, 8  # d_model 128 x 8 = 1,024 latents

# e2edict's settings. "now": the shipped configs, configs/tiny/topk-e2e.yaml and topk-local.yaml
# for TopK (the settings this benchmark chose), configs/tiny/e2e.yaml (the paper's, unchanged) for
# ReLU; "before": what TopK got before them (e2e.yaml's Adam 3e-3, 30k-token warmup, cosine decay,
# orthogonal decoder, drawn b_dec, normalisation in the forward).
SETTINGS = {
    "topk-e2e": {"architecture": "topk", "preset": "e2e"},
    "topk-local": {"architecture": "topk", "preset": "local"},
    "relu-e2e": {"architecture": "relu", "preset": "e2e"},
}
BEFORE = ["train.optimizer=adam", "train.lr=3e-3", "train.schedule=cosine", "train.warmup_tokens=30000",
          "saes.init=orthogonal", "saes.b_dec_init=uniform", "saes.apply_b_dec_to_input=false",
          "saes.decoder_norm=reparam"]  # fmt: skip
VARIANTS: dict[str, list[str]] = {"before": BEFORE, "now": []}
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tiny"


def config_file(setting: str, variant: str) -> Path:
    s = SETTINGS[setting]
    if variant == "now" and s["architecture"] == "topk":
        return CONFIGS / f"topk-{s['preset']}.yaml"
    return CONFIGS / "e2e.yaml"


def base_overrides(setting: str, tokens: int, lam: float) -> list[str]:
    s = SETTINGS[setting]
    ov = [
        "model.backend=huggingface",
        f"saes.positions=[{HOOK_HF}]",
        f"saes.architecture={s['architecture']}",
        f"saes.dict_ratio={RATIO}",
        f"loss.preset={s['preset']}",
        f"train.tokens={tokens}",
        f"train.batch_size={BATCH}",
        "train.log_every=1000000",
        "train.eval_every_tokens=null",
        "eval.tokens=65536",
        "eval.alive_tokens=65536",
        "name=convergence",
    ]
    if s["architecture"] == "topk":
        ov += [f"saes.k={K}", "loss.sparsity.coeff=0"]
    else:
        ov += [f"loss.sparsity.coeff={lam}"]
    return ov


def metrics_of(res: dict) -> dict:
    m = res["saes"][HOOK_HF]
    return {
        "ce_loss_increase": res["ce_loss_increase"],
        "kl": res["kl"],
        "l0": m["l0"],
        "explained_variance": m["explained_variance"],
        "alive": m["alive"],
    }


def evaluate(setup, saes) -> dict:
    from e2edict.evaluation import evaluate_saes  # inference behaviour inside (eval_mode)

    res = evaluate_saes(setup.backbone, saes, setup.eval_seqs, tokens=65536, alive_tokens=65536, batch_size=16,
                        ce_score=False, progress=False)  # fmt: skip
    return metrics_of(res)


def run_e2edict(
    setting: str, variant: str, budgets: list[int], lam: float, out: Path, done: list[dict] | None = None
) -> list[dict]:
    """One `train` per budget (those not in ``done``, rows of an earlier invocation with the same ``--out``)."""
    from e2edict.config import load_config
    from e2edict.trainer import train

    rows = []
    have = {r["tokens"] for r in done or [] if (r["library"], r["setting"], r["variant"]) == ("e2edict", setting, variant)}
    for tokens in budgets:
        if tokens in have:
            continue
        ov = base_overrides(setting, tokens, lam) + VARIANTS[variant]
        cfg = load_config(config_file(setting, variant), ov)
        run_dir = out / f"e2edict-{setting}-{variant}-{tokens}"
        t0 = time.perf_counter()
        train(cfg, out=run_dir, overwrite=True, progress=False)
        wall = time.perf_counter() - t0
        ev = json.loads((run_dir / "eval.json").read_text())
        rate = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        tps = [r["tokens_per_s"] for r in rate if r.get("split") == "train"][-1]
        rows.append({"library": "e2edict", "setting": setting, "variant": variant, "tokens": tokens,
                     "tokens_per_s": tps, "wall_s": wall, **metrics_of(ev)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def rows_in_order(setup, steps: int, seed: int) -> torch.Tensor:
    """The [steps x 16, 128] token rows e2edict's batcher yields for ``seed``, in order."""
    from e2edict.data import make_batches

    batches = make_batches(setup.train_data, BATCH, seed, setup.cfg.data.shuffle_buffer)
    return torch.cat([batches.next() for _ in range(steps)])


def run_sparsify(setting: str, budgets: list[int], setup, out: Path) -> list[dict]:
    """sparsify's own Trainer over the same rows; its SAE evaluated at each budget as its own
    checkpointing sees it (schedule-free average, `optimizer.eval()`)."""
    from datasets import Dataset
    from sparsify import SaeConfig, TrainConfig, Trainer

    from e2edict.backbones import load_hf_causal_lm
    from e2edict.saes import load_sparsify

    steps = {b // (BATCH * N_CTX): b for b in budgets}
    rows_t = rows_in_order(setup, max(steps), setup.cfg.seed)
    data = Dataset.from_dict({"input_ids": rows_t.tolist()}).with_format("torch")
    model, _ = load_hf_causal_lm("tiny", "cpu", torch.float32)
    loss_fn = "kl" if SETTINGS[setting]["preset"] == "e2e" else "fvu"
    cfg = TrainConfig(SaeConfig(expansion_factor=RATIO, k=K), batch_size=BATCH, loss_fn=loss_fn, hookpoints=[HOOK_SPARSIFY],
                      log_to_wandb=False, save_every=1, save_dir=str(out / "sparsify-ckpt"), run_name=setting)  # fmt: skip
    trainer = Trainer(cfg, data, model)
    results, spent = [], {"eval": 0.0}
    t0 = time.perf_counter()

    def save() -> None:  # called by sparsify after each step (save_every=1); evaluates at the budgets
        done = trainer.global_step + 1
        if done not in steps:
            return
        t = time.perf_counter()
        opt = trainer.optimizers[0]
        opt.eval()
        with tempfile.TemporaryDirectory() as tmp:
            trainer.saes[HOOK_SPARSIFY].save_to_disk(tmp)
            sae = load_sparsify(tmp, hook_name=HOOK_HF)
        opt.train()
        m = evaluate(setup, {HOOK_HF: sae})
        spent["eval"] += time.perf_counter() - t
        train_s = time.perf_counter() - t0 - spent["eval"]
        results.append({"library": "sparsify", "setting": setting, "variant": "defaults", "tokens": steps[done],
                        "tokens_per_s": done * BATCH * N_CTX / train_s, "wall_s": train_s, **m})  # fmt: skip
        print(json.dumps(results[-1]), flush=True)

    trainer.save = save
    trainer.fit()
    return results


def tokens_to_reach(rows: list[dict], target: float) -> float | None:
    """Tokens at which the CE-loss increase first falls to ``target`` (log-linear between budgets)."""
    rows = sorted(rows, key=lambda r: r["tokens"])
    for a, b in zip(rows, rows[1:], strict=False):
        if a["ce_loss_increase"] <= target:
            return a["tokens"]
        if b["ce_loss_increase"] <= target:
            f = (a["ce_loss_increase"] - target) / (a["ce_loss_increase"] - b["ce_loss_increase"])
            return math.exp(math.log(a["tokens"]) + f * (math.log(b["tokens"]) - math.log(a["tokens"])))
    return rows[0]["tokens"] if rows and rows[0]["ce_loss_increase"] <= target else None


def table(rows: list[dict]) -> str:
    lines = ["| setting | library | tokens | CE-loss increase | KL | L0 | explained var. | alive | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(rows, key=lambda r: (r["setting"], r["library"], r["variant"], r["tokens"])):
        lib = r["library"] if r["library"] == "sparsify" else f"e2edict ({r['variant']})"
        lines.append(f"| {r['setting']} | {lib} | {r['tokens']:,} | {r['ce_loss_increase']:.4f} | {r['kl']:.4f} | "
                     f"{r['l0']:.1f} | {r['explained_variance']:.3f} | {r['alive']} | {r['tokens_per_s']:,.0f} |")  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({r["setting"] for r in rows})
    fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 4), squeeze=False)
    for ax, s in zip(axes[0], settings, strict=True):
        for key in sorted({(r["library"], r["variant"]) for r in rows if r["setting"] == s}):
            mine = [r for r in rows if r["setting"] == s and (r["library"], r["variant"]) == key]
            pts = sorted((r["tokens"], r["ce_loss_increase"]) for r in mine)
            label = key[0] if key[0] == "sparsify" else f"e2edict ({key[1]})"
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("CE-loss increase (65,536 held-out tokens)")
        ax.set_title(s)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


SPEED_TOKENS = 204_800
# what each speed measurement runs, each in a fresh process (allocator settings are process-wide)
SPEED_RUNS = ("e2edict", "sparsify", "sparsify+heap")


def speed_one(a, out: Path) -> int:
    """One speed measurement in this (fresh) process: ``--speed-one e2edict`` (e2edict's `train`, its
    defaults, which include `train.reuse_cpu_memory`), ``sparsify`` (sparsify's `Trainer`, its
    defaults) or ``sparsify+heap`` (sparsify with e2edict's allocator setting, `keep_freed_memory`,
    applied first: the same malloc behaviour for both, so the ratio compares the steps alone).
    Prints one JSON line with ``tokens_per_s``."""
    from e2edict.config import load_config
    from e2edict.run import setup_run

    (setting,) = a.settings.split(",")
    if a.speed_one == "e2edict":
        row = run_e2edict(setting, "now", [SPEED_TOKENS], a.relu_lambda, out)[0]
    else:
        if a.speed_one == "sparsify+heap":
            from e2edict.precision import keep_freed_memory

            keep_freed_memory()
        setup = setup_run(load_config(CONFIGS / "e2e.yaml", base_overrides(setting, SPEED_TOKENS, a.relu_lambda)))
        row = run_sparsify(setting, [SPEED_TOKENS], setup, out)[0]
    print("SPEED " + json.dumps({"run": a.speed_one, "setting": setting, "tokens_per_s": row["tokens_per_s"]}), flush=True)
    return 0


def _measure(run: str, setting: str, a, out: Path) -> float:
    import subprocess

    cmd = [sys.executable, __file__, "--speed-one", run, "--settings", setting, "--out", str(out / run),
           "--relu-lambda", str(a.relu_lambda)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [x for x in res.stdout.splitlines() if x.startswith("SPEED ")]
    if res.returncode != 0 or not lines:
        raise SystemExit(f"speed run {run} ({setting}) failed:\n{res.stderr[-2000:]}")
    return json.loads(lines[-1][len("SPEED ") :])["tokens_per_s"]


def speed(a, out: Path) -> int:
    """Tokens/s of e2edict's and sparsify's training loops over 204,800 tokens, evaluation excluded,
    each run in its own fresh process (as each library runs for its user: an allocator setting made
    by one must not reach the other), the order rotating between pairs; the machine is shared, so
    ratios of neighbours, not absolute figures. Also sparsify with e2edict's allocator setting."""
    for setting in [s for s in a.settings.split(",") if SETTINGS[s]["architecture"] == "topk"]:
        got: dict[str, list[float]] = {r: [] for r in SPEED_RUNS}
        for rep in range(a.speed):
            order = SPEED_RUNS[rep % 3 :] + SPEED_RUNS[: rep % 3]
            for run in order:
                got[run].append(_measure(run, setting, a, out))
            print(f"{setting} pair {rep + 1}: " + ", ".join(f"{r} {got[r][-1]:,.0f} tok/s" for r in SPEED_RUNS), flush=True)
        for other in SPEED_RUNS[1:]:
            ratios = sorted(x / y for x, y in zip(got["e2edict"], got[other], strict=True))
            print(f"{setting}: e2edict / {other} tokens/s, median of {len(ratios)}: {statistics.median(ratios):.2f} "
                  f"(range {ratios[0]:.2f}-{ratios[-1]:.2f})")  # fmt: skip
        (out / f"speed-{setting}.json").write_text(json.dumps(got, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budgets", default="100000,200000,500000,1000000,2000000")
    ap.add_argument("--settings", default="topk-e2e,topk-local,relu-e2e")
    ap.add_argument("--variants", default="now,before", help="e2edict settings: now (today's defaults), before")
    ap.add_argument("--libraries", default="e2edict,sparsify")
    ap.add_argument("--relu-lambda", type=float, default=3.0, help="relu-e2e: λ (L0 34 at 512k tokens, near k=32)")
    ap.add_argument(
        "--speed",
        type=int,
        default=0,
        metavar="REPS",
        help="only the speed: REPS rounds of 204,800-token runs per TopK setting (e2edict, sparsify, sparsify "
        "with e2edict's allocator setting), each run in a fresh process",
    )
    ap.add_argument("--speed-one", choices=SPEED_RUNS, help=argparse.SUPPRESS)  # one such run (what --speed calls)
    ap.add_argument("--out", default="out/convergence")
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    budgets = sorted(int(x) for x in a.budgets.split(","))
    from e2edict.config import load_config
    from e2edict.run import setup_run

    if a.speed_one:
        return speed_one(a, out)
    if a.speed:
        return speed(a, out)
    # rows an earlier invocation wrote to the same --out are kept and their runs not repeated
    rows: list[dict] = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else []
    for setting in a.settings.split(","):
        if "e2edict" in a.libraries:
            for variant in a.variants.split(","):
                if variant == "before" and SETTINGS[setting]["architecture"] == "relu":
                    continue  # the paper's settings: "now" is "before"
                rows += run_e2edict(setting, variant, budgets, a.relu_lambda, out, rows)
                (out / "results.json").write_text(json.dumps(rows, indent=1))
        done = {r["tokens"] for r in rows if (r["library"], r["setting"]) == ("sparsify", setting)}
        if "sparsify" in a.libraries and SETTINGS[setting]["architecture"] == "topk" and not set(budgets) <= done:
            cfg = load_config(CONFIGS / "e2e.yaml", base_overrides(setting, budgets[-1], a.relu_lambda))
            rows += run_sparsify(setting, budgets, setup_run(cfg), out)
        (out / "results.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))
    for setting in sorted({r["setting"] for r in rows}):
        for target in (0.3, 0.2, 0.15, 0.1):
            parts = []
            for key in sorted({(r["library"], r["variant"]) for r in rows if r["setting"] == setting}):
                t = tokens_to_reach([r for r in rows if r["setting"] == setting and (r["library"], r["variant"]) == key], target)
                parts.append(f"{key[0]}/{key[1]}: {'-' if t is None else f'{t:,.0f}'}")
            print(f"{setting}: tokens to CE-loss increase {target}: " + "; ".join(parts))
    plot(rows, out / "convergence.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
