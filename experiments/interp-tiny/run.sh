#!/usr/bin/env bash
# Interpretability of the experiment's runs (after `e2edict sweep experiments/interp-tiny/sweep.yaml`):
# every metric but autointerp, 200 explained latents per SAE on 65,536 held-out tokens; with
# LLM_URL and LLM_MODEL set, SAEBench's autointerp too. Then the table and plot.
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${RUNS:-out/sweeps/interp-tiny}
llm=()
if [[ -n "${LLM_URL:-}" ]]; then llm=(--llm-url "$LLM_URL" --llm-model "$LLM_MODEL"); fi
for name in local-l2 e2e-l4 e2eds-l12 e2e-finetune finetune-recipe adapter-lora16; do
  e2edict interp "$runs/$name" --tokens 65536 --latents 200 --quiet "${llm[@]}"
done
python experiments/interp-tiny/summarize.py --runs "$runs"
