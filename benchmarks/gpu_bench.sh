#!/usr/bin/env bash
# The peer benchmark on a GPU, in one go (about 3-5 minutes on one recent GPU):
#   benchmarks/bench_peers.py --size both --device cuda: our captioner against transformers'
#   VisionEncoderDecoderModel at the matched and the realistic (ViT-B/16 + 6-layer decoder) sizes;
#   decoding with the static KV cache replayed from a CUDA graph (static=True) and with the growing cache
#   (static=False); fp32, bf16 on both sides, and default vs default; training images/s at batch 32;
#   benchmarks/bench_compile.py --device cuda: torch.compile's steady speed-up and compile time (cold, warm).
# Writes $OUT_DIR/gpu_bench.json (gpu_bench.md: its tables for the README); prints what ran and the ratios.
# Usage: bash benchmarks/gpu_bench.sh [OUT_DIR]       (default: ${OUT:-/tmp/gpu_bench})
#   QUICK=1  one timed run per row (a smoke run of the script, not figures)
#   SIZE=matched|realistic  one size only (default both)
#   DEVICE=cpu QUICK=1 SIZE=matched  the same script on the CPU in a minute, to check it where there is no GPU
set -euo pipefail
out=${1:-${OUT:-/tmp/gpu_bench}}
device=${DEVICE:-cuda}
py=${PYTHON:-python}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
$py -c "import torch" 2>/dev/null || { echo "$py cannot import torch: activate the project's environment or set PYTHON"; exit 1; }

if [ "$device" = cuda ]; then
  gpus=$($py -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
  [ "$gpus" -ge 1 ] || { echo "no CUDA device visible to torch: nothing to time (DEVICE=cpu QUICK=1 checks the script)"; exit 1; }
  echo "== $($py -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))")"
  nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv,noheader 2>/dev/null || true
fi
$py -c "import transformers" 2>/dev/null || { echo "transformers is missing: pip install -e '.[bench]'"; exit 1; }

args=(--size "${SIZE:-both}" --device "$device" --out "$out/gpu_bench.json")
[ -n "${QUICK:-}" ] && args+=(--quick)
echo "== python benchmarks/bench_peers.py ${args[*]}"
start=$(date +%s)
# JSON to the log (and the --out file); the ratio table (stderr) to the terminal as well.
if ! $py "$here/bench_peers.py" "${args[@]}" > "$out/gpu_bench.log" 2> >(tee "$out/gpu_bench.err" >&2); then
  echo "FAILED: bench_peers.py (see $out/gpu_bench.err)"
  exit 1
fi
echo "== python benchmarks/bench_compile.py --device $device: does torch.compile pay, compile time included?"
if [ -z "${QUICK:-}" ] && ! $py "$here/bench_compile.py" --device "$device" --out "$out/compile.json" > /dev/null \
    2> >(grep -v "^W[0-9]" | tee "$out/compile.err" >&2); then
  echo "FAILED: bench_compile.py (see $out/compile.err)"
fi
echo "== done in $(( $(date +%s) - start )) s: $out/gpu_bench.json; the README's tables:"
$py "$here/bench_peers.py" --markdown "$out/gpu_bench.json" | tee "$out/gpu_bench.md"
$py - "$out/gpu_bench.json" <<'EOF'
import json, sys
result = json.load(open(sys.argv[1]))
print("machine:", result["machine"])
for name, size in result["sizes"].items():
    print(f"{name}: static / growing cache, captions/s:", size["static_vs_dynamic"] or "not run")
    print(f"{name}: batch-1 step (ms):", size["step_b1"])
    print(f"{name}: training ceiling:", size["train_ceiling"])
EOF
