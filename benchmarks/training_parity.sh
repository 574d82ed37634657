#!/usr/bin/env bash
# Does this tree train exactly like an older commit? Same seed, same 60 steps, both encoders: prints each
# tree's validation records and the largest difference between the saved tensors (0.0 = bit-identical).
#   git worktree add /tmp/base COMMIT && bash benchmarks/training_parity.sh /tmp/base [fp32|bf16]
set -euo pipefail
BASE=${1:?usage: training_parity.sh BASE_TREE [precision]}
PRECISION=${2:-fp32}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$HERE/.venv/bin/python}
WORK=$(mktemp -d)
echo '{"synth_train": 960, "synth_val": 32}' > "$WORK/world.json"
ARGS=(--max-steps 60 --val-every 30 --config "$WORK/world.json" --precision "$PRECISION" --device cpu --seed 3
      --batch-size 16 --warmup-steps 10)
for enc in vit cnn; do
  for tree in "$BASE" "$HERE"; do
    name=$([ "$tree" = "$BASE" ] && echo base || echo here)
    (cd "$tree" && PYTHONPATH="$tree" "$PY" -m captioner train --encoder "$enc" "${ARGS[@]}" --out "$WORK/$name-$enc" \
      > "$WORK/$name-$enc.log" 2>&1)
  done
  "$PY" - "$WORK" "$enc" <<'PY'
import json, sys
from safetensors.torch import load_file
work, enc = sys.argv[1:]
for name in ("base", "here"):
    records = [json.loads(line) for line in open(f"{work}/{name}-{enc}/metrics.jsonl")]
    print(enc, name, [(r["step"], r.get("CIDEr-D"), r.get("accuracy")) for r in records if "phase" not in r])
a, b = load_file(f"{work}/base-{enc}/last.safetensors"), load_file(f"{work}/here-{enc}/last.safetensors")
shared = [k for k in a if k in b]
print(enc, f"{len(shared)} saved tensors (weights and optimiser state), largest difference:",
      max((a[k].double() - b[k].double()).abs().max().item() for k in shared))
PY
done
rm -rf "$WORK"
