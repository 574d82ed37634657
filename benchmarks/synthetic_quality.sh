#!/usr/bin/env bash
# The README's quality figures on the built-in world, reproduced with one command:
#   bash benchmarks/synthetic_quality.sh [vit|cnn ...]
# Trains each encoder with the defaults (no options: what `captioner train --encoder X` does), then
# evaluates the test split (greedy and beam 3) and prints the wall time and one JSON line per evaluation.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
for encoder in "${@:-vit cnn}"; do
  for e in $encoder; do
    run="runs/quality-$e-$(date +%Y%m%d-%H%M%S)"
    start=$(date +%s)
    "$BIN/captioner" train --encoder "$e" --out "$run"
    echo "{\"encoder\": \"$e\", \"train_seconds\": $(( $(date +%s) - start ))}"
    "$BIN/captioner" evaluate --model "$run" --json
    "$BIN/captioner" evaluate --model "$run" --beam 3 --json
  done
done
