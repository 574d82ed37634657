#!/usr/bin/env bash
# The CUDA check, run in one go on a machine with a GPU (a few minutes):
#   1-GPU training in bf16 and in fp16 (GradScaler), torchrun on 2 GPUs when there are two,
#   captioning a folder and evaluating on CUDA. Prints what ran and the images/s; writes gpu_check.json.
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR] [STEPS]   (defaults: ${OUT:-/tmp/gpu_check}, 300 steps)
set -euo pipefail
out=${1:-${OUT:-/tmp/gpu_check}}
steps=${2:-300}
mkdir -p "$out"
py=${PYTHON:-python}
gpus=$($py -c "import torch; print(torch.cuda.device_count())")
echo "== $($py -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))") x $gpus"
[ "$gpus" -ge 1 ] || { echo "no CUDA device: nothing to check"; exit 1; }

rate() {  # images/s of the last training-loss record of a run, and its steps
  $py - "$1" <<'EOF'
import json, sys
records = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl") if l.strip()]
train = [r for r in records if r.get("phase") == "train"]
vals = [r for r in records if "phase" not in r]
print(json.dumps({"steps": train[-1]["step"] if train else None,
                  "images_per_s": round(train[-1]["images_per_s"], 1) if train else None,
                  "loss": round(train[-1]["loss"], 3) if train else None,
                  "val_accuracy": vals[-1].get("accuracy") if vals else None}))
EOF
}

echo '{"synth_train": 8000}' > "$out/world.json"  # a smaller world: the check times steps, not rendering
results="{"
for precision in bf16 fp16; do
  run="$out/train-$precision"
  rm -rf "$run"
  echo "== train, 1 GPU, $precision, $steps steps"
  start=$(date +%s)
  captioner train --device cuda --precision "$precision" --max-steps "$steps" --val-every "$steps" \
    --config "$out/world.json" --out "$run" 2>&1 | tail -3 || { echo "FAILED: train $precision"; exit 1; }
  figures=$(rate "$run")
  echo "   $figures ($(( $(date +%s) - start )) s)"
  results+="\"train_$precision\": $figures,"
done

if [ "$gpus" -ge 2 ]; then
  run="$out/train-ddp"
  rm -rf "$run"
  echo "== torchrun --nproc_per_node 2, bf16, $steps steps"
  torchrun --nproc_per_node 2 -m captioner train --device cuda --precision bf16 --max-steps "$steps" \
    --val-every "$steps" --config "$out/world.json" --out "$run" 2>&1 | tail -3 || { echo "FAILED: torchrun"; exit 1; }
  figures=$(rate "$run")
  echo "   $figures"
  results+="\"train_ddp2_bf16\": $figures,"
else
  echo "== one GPU: torchrun on 2 GPUs not checked"
fi

echo "== caption a folder and evaluate on CUDA"
captioner data synth --out "$out/photos" --n 512 --split test >/dev/null
start=$($py -c "import time; print(time.time())")
captioner caption "$out/photos/images" --model "$out/train-bf16" --device cuda --out "$out/captions.jsonl" \
  --overwrite >/dev/null
caption_s=$($py -c "import time; print(round(time.time() - $start, 2))")
echo "   512 images captioned in ${caption_s} s (start-up included; decoding steps replayed from CUDA graphs)"
start=$($py -c "import time; print(time.time())")
captioner caption "$out/photos/images" --model "$out/train-bf16" --device cuda --out "$out/captions-eager.jsonl" \
  --overwrite --no-cuda-graph >/dev/null
eager_s=$($py -c "import time; print(round(time.time() - $start, 2))")
same=$($py - "$out/captions.jsonl" "$out/captions-eager.jsonl" <<'EOF'
import json, sys
texts = [{r["image"]: r["caption"] for r in map(json.loads, open(f)) if "caption" in r} for f in sys.argv[1:]]
print("true" if texts[0] == texts[1] and texts[0] else "false")
EOF
)
echo "   again without CUDA graphs: ${eager_s} s; the same captions: $same"
[ "$same" = true ] || { echo "FAILED: captions differ with and without CUDA graphs"; exit 1; }
captioner evaluate --model "$out/train-bf16" --device cuda --no-java --json > "$out/evaluate.json"
echo "   evaluate: $(cat "$out/evaluate.json" | head -c 300)"
results+="\"caption_512_s\": $caption_s, \"caption_512_no_graph_s\": $eager_s, \"evaluate\": $(cat "$out/evaluate.json")}"
echo "$results" > "$out/gpu_check.json"
echo "== wrote $out/gpu_check.json"
