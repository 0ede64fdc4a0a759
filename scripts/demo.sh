#!/usr/bin/env bash
# The main job on the embedded model: train a local and an end-to-end SAE at the same position,
# evaluate both on held-out text, print them side by side. About 3 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-out/demo}
e2edict train configs/tiny/local.yaml --out "$out/local" --overwrite "$@"
e2edict train configs/tiny/e2e.yaml --out "$out/e2e" --overwrite "$@"
echo
echo "Held-out evaluation (embedded model, SAE at blocks.2.hook_resid_pre):"
e2edict compare "$out/local" "$out/e2e"
echo
echo "Runs: $out/local and $out/e2e (config.yaml, metrics.jsonl, eval.json, saes/ in SAELens format)."
