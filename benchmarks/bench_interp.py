"""What `e2edict interp` costs: wall time of each metric (autointerp aside) on one run of the
embedded model with the command's defaults, and, on a GPT-2-shaped SAE (768 x 46,080) over a
GPT-2-width model, the peak memory of the streaming passes against the dense [tokens x latents]
matrix they never build.

    python benchmarks/bench_interp.py [--run RUN_DIR] [--json out/bench_interp.json]

Without --run it trains a short e2e run of the embedded model first (not timed). Targets
(docs/performance.md): all metrics but autointerp ≤ 2 minutes on the 2-core CPU; GPT-2-shaped
passes with a peak memory that does not grow with the tokens read.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tiny_case(run_dir: Path | None) -> dict:
    import e2edict
    from e2edict.interpret import InterpOptions, interpret_saes
    from e2edict.interpret.reading import Reader
    from e2edict.run import load_run_dir

    if run_dir is None:
        run_dir = Path("out/bench-interp-run")
        if not (run_dir / "eval.json").exists():
            e2edict.train("configs/tiny/e2e.yaml", ["train.tokens=81920", "eval.tokens=8192"], out=run_dir, overwrite=True,
                          progress=False)  # fmt: skip
    t0 = time.perf_counter()
    run = load_run_dir(run_dir, tokens=32_768)
    load_s = time.perf_counter() - t0
    seqs = run.eval_seqs[: -(-32_768 // run.eval_seqs.shape[1])]
    reader = Reader(run.backbone, run.saes, batch_size=run.cfg.eval.batch_size)
    times = {}
    for metric in ("explanations", "sparse_probing", "absorption"):
        t = time.perf_counter()
        interpret_saes(reader, seqs, InterpOptions(metrics=(metric,)), quiet=True)
        times[metric] = round(time.perf_counter() - t, 1)
    total = load_s + sum(times.values())
    return {"run": str(run_dir), "load_s": round(load_s, 1), "seconds": times, "total_s": round(total, 1), "target_s": 120,
            "met": total <= 120}  # fmt: skip


def gpt2_shaped_case(tokens: int) -> dict:
    """Explanations and sparse probing of a 768 x 46,080 ReLU SAE on a 2-layer GPT-2-width model,
    first on ``tokens // 4`` held-out tokens, then on ``tokens``: streaming passes keep the peak
    memory flat while the dense [tokens x latents] matrix they never build grows 4x."""
    import numpy as np
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from e2edict.assets import TINY_MODEL_DIR
    from e2edict.backbones import HFBackbone
    from e2edict.interpret import InterpOptions, interpret_saes
    from e2edict.interpret.reading import Reader
    from e2edict.saes.relu import ReLUSAE

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=4096, n_positions=128, n_embd=768, n_layer=2, n_head=12, bos_token_id=0, eos_token_id=0)
    backbone = HFBackbone(GPT2LMHeadModel(cfg).eval(), AutoTokenizer.from_pretrained(TINY_MODEL_DIR), "gpt2-shaped")
    hook = "transformer.h.1:input"
    sae = ReLUSAE(768, 46_080, hook)
    with torch.no_grad():
        sae.b_enc.fill_(-0.5)  # a sparse code, as a trained SAE's
    reader = Reader(backbone, {hook: sae}, batch_size=8)
    stream = np.load(TINY_MODEL_DIR / "val_tokens.npy")
    opts = InterpOptions(metrics=("explanations", "sparse_probing"), latents=50, tasks=("testament",), probe_train=200,
                         probe_test=100)  # fmt: skip
    out = {"base_rss_mb": round(rss_mb())}
    for label, n_tok in (("quarter", tokens // 4), ("whole", tokens)):
        n = n_tok // 127
        seqs = torch.zeros(n, 128, dtype=torch.long)
        seqs[:, 1:] = torch.from_numpy(stream[: n * 127].astype(np.int64)).view(n, 127)
        t = time.perf_counter()
        interpret_saes(reader, seqs, opts, quiet=True)
        out[label] = {"tokens": int(seqs.numel()), "seconds": round(time.perf_counter() - t, 1), "peak_rss_mb": round(rss_mb()),
                      "dense_matrix_mb": round(seqs.numel() * 46_080 * 4 / 2**20)}  # fmt: skip
    grew = out["whole"]["peak_rss_mb"] - out["quarter"]["peak_rss_mb"]
    dense_grew = out["whole"]["dense_matrix_mb"] - out["quarter"]["dense_matrix_mb"]
    out.update({"peak_growth_mb": grew, "dense_growth_mb": dense_grew, "streams": grew < 0.1 * dense_grew})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, help="a finished run of the embedded model (default: train a short one)")
    ap.add_argument("--gpt2-tokens", type=int, default=32_768)
    ap.add_argument("--skip-gpt2", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = {"tiny": tiny_case(args.run)}
    print(json.dumps(out["tiny"], indent=1))
    if not args.skip_gpt2:
        out["gpt2_shaped"] = gpt2_shaped_case(args.gpt2_tokens)
        print(json.dumps(out["gpt2_shaped"], indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
