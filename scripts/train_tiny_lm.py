#!/usr/bin/env python
"""Train e2edict's embedded tiny language model from the shipped public-domain corpus.

Steps: a byte-level BPE tokenizer (vocabulary 4096, `<|endoftext|>` as BOS/EOS) on the train split;
the token streams of both splits; a GPT-2-architecture model trained with AdamW (warmup + cosine)
for a fixed number of steps; held-out loss and unigram entropy; samples; a model card.
Everything lands in --out in Hugging Face format (config.json, model.safetensors, tokenizer files)
plus val_tokens.npy, the held-out token stream.

    python scripts/train_tiny_lm.py --out src/e2edict/assets/tiny --steps 6000
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from e2edict.corpus import HOLDOUT_FRACTION, TEXT_NAMES, corpus_split
from e2edict.sources import BOS_TOKEN, encode_texts
from e2edict.sources import pack_stream as to_sequences


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


@torch.no_grad()
def heldout_loss(model: GPT2LMHeadModel, seqs: torch.Tensor, batch: int = 64) -> float:
    """Mean next-token cross-entropy (nats) over every held-out sequence."""
    total, count = 0.0, 0
    for i in range(0, len(seqs), batch):
        x = seqs[i : i + batch]
        logits = model(x).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += x[:, 1:].numel()
    return total / count


def unigram_entropy(stream: np.ndarray, vocab: int) -> float:
    counts = np.bincount(stream, minlength=vocab).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--n-ctx", type=int, default=128)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    train_texts, val_texts = corpus_split("train"), corpus_split("val")
    raw_tok = train_tokenizer(train_texts, args.vocab)
    tokenizer = GPT2TokenizerFast(
        tokenizer_object=raw_tok, bos_token=BOS_TOKEN, eos_token=BOS_TOKEN, unk_token=BOS_TOKEN, model_max_length=args.n_ctx
    )
    tokenizer.save_pretrained(args.out)
    bos = raw_tok.token_to_id(BOS_TOKEN)
    train_stream = encode_texts(raw_tok, train_texts)
    val_stream = encode_texts(raw_tok, val_texts)
    np.save(args.out / "val_tokens.npy", val_stream.astype(np.uint16), allow_pickle=False)
    print(f"tokenizer done in {time.time() - t0:.0f}s: train {len(train_stream)} tokens, val {len(val_stream)}", flush=True)

    cfg = GPT2Config(
        vocab_size=args.vocab,
        n_positions=args.n_ctx,
        n_embd=args.d_model,
        n_layer=args.layers,
        n_head=args.heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=bos,
        eos_token_id=bos,
    )
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    body = args.n_ctx - 1
    gen = np.random.default_rng(args.seed)
    val_seqs = to_sequences(val_stream, args.n_ctx, bos)
    log = []
    t1 = time.time()
    model.train()
    for step in range(args.steps):
        starts = gen.integers(0, len(train_stream) - body, size=args.batch)
        x = torch.from_numpy(np.stack([train_stream[s : s + body] for s in starts]))
        x = torch.cat([torch.full((args.batch, 1), bos, dtype=torch.long), x], dim=1)
        loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            rate = (step + 1) * args.batch * args.n_ctx / (time.time() - t1)
            print(f"step {step} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e} tok/s {rate:.0f}", flush=True)
            log.append({"step": step, "train_loss": loss.item()})
        if step % 1000 == 999:
            model.eval()
            print(f"  held-out loss {heldout_loss(model, val_seqs):.4f}", flush=True)
            model.train()
    train_minutes = (time.time() - t1) / 60
    model.eval()
    val_loss = heldout_loss(model, val_seqs)
    train_eval = heldout_loss(model, to_sequences(train_stream[: len(val_stream)], args.n_ctx, bos))
    ent = unigram_entropy(val_stream, args.vocab)
    model.save_pretrained(args.out, safe_serialization=True)

    samples = []
    g = torch.Generator().manual_seed(args.seed)
    for prompt in ["It is a truth universally acknowledged", "And God said", "ROMEO.", "hacker"]:
        ids = torch.tensor([[bos] + tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            for _ in range(48):
                logits = model(ids).logits[0, -1] / 0.8
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        samples.append(tokenizer.decode(ids[0, 1:]))

    tokens_seen = args.steps * args.batch * args.n_ctx
    stats = {
        "heldout_loss": round(val_loss, 4),
        "train_loss": round(train_eval, 4),
        "heldout_unigram_entropy": round(ent, 4),
        "steps": args.steps,
        "tokens_trained": tokens_seen,
        "train_tokens": int(len(train_stream)),
        "heldout_tokens": int(len(val_stream)),
        "train_minutes": round(train_minutes, 1),
        "n_ctx": args.n_ctx,
        "seed": args.seed,
    }
    (args.out / "training_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    cmd = " ".join(
        [
            "python scripts/train_tiny_lm.py",
            f"--out {args.out}",
            f"--steps {args.steps}",
            f"--batch {args.batch}",
            f"--lr {args.lr}",
            f"--seed {args.seed}",
        ]
    )
    card = (
        f"""# e2edict tiny: the embedded language model

A GPT-2-architecture model (`transformers.GPT2LMHeadModel`) trained on this CPU from the public-domain
corpus shipped in `../corpus/` ({", ".join(TEXT_NAMES)}). It exists so that e2edict's first run,
demo and tests work offline; it is not a useful language model for anything else.

## Architecture
{args.layers} layers, d_model {args.d_model}, {args.heads} heads, context {args.n_ctx}, vocabulary {args.vocab},
GELU (gelu_new), learned positional embeddings, tied embeddings, no dropout.
{sum(p.numel() for p in model.parameters()):,} parameters.

## Data
Train split: the first {100 - 100 * HOLDOUT_FRACTION:.0f}% of every text ({len(train_stream):,} tokens);
held-out split: the last {100 * HOLDOUT_FRACTION:.0f}% of every text, cut at a line break ({len(val_stream):,} tokens), never
trained on, shipped as `val_tokens.npy` (uint16). Each text is preceded by `<|endoftext|>`; every
sequence is `<|endoftext|>` followed by {args.n_ctx - 1} consecutive tokens.

## Tokenizer
Byte-level BPE, vocabulary {args.vocab}, trained with `tokenizers` on the train split only;
`<|endoftext|>` (id {bos}) is BOS, EOS and UNK. Files: `tokenizer.json`, `tokenizer_config.json`,
`special_tokens_map.json` (loads with `AutoTokenizer.from_pretrained`).

## Training
Command: `{cmd}`
AdamW (betas 0.9/0.95, weight decay 0.1), lr {args.lr} with {args.warmup} warmup steps then cosine decay
to 10%, gradient clip 1.0, batch {args.batch} x {args.n_ctx} tokens, {args.steps} steps
({tokens_seen:,} tokens, random windows of the train stream), {train_minutes:.1f} minutes on 2 CPU cores.

## Results
| quantity | nats/token |
|---|---|
| held-out loss (all held-out sequences) | {val_loss:.4f} |
| train loss (first {len(val_stream):,} train tokens, same layout) | {train_eval:.4f} |
| held-out unigram entropy | {ent:.4f} |

The held-out loss is the mean next-token cross-entropy over every sequence of the held-out stream
cut as above (predicting positions 1..{args.n_ctx - 1}). The tests recompute it through
`e2edict.load_model("tiny")` and compare with this card (`training_stats.json`).

## Samples (temperature 0.8)
"""
        + "\n".join(f"- `{s!r}`" for s in samples)
        + "\n"
    )
    (args.out / "README.md").write_text(card)
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
