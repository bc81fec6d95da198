#!/usr/bin/env bash
# One prepared call for a CUDA machine (written for one H200; torch + Triton
# preinstalled, nothing is installed here): correctness checks of the compiled
# fused kernel (plain, strided and LoRA views), then the CUDA benchmarks.
# Under six minutes in all.
#
#   bash benchmarks/gpu_check.sh
#   bash benchmarks/gpu_check.sh --dry-run   # no GPU: the correctness checks on CPU under
#                                            # Triton's interpreter, shapes cut down; no benchmarks
#
# Logs and result rows go to $OUT when it is set (copy them back and paste the
# rows into benchmarks/RESULTS.md), else the rows are appended to
# benchmarks/RESULTS.md directly.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=.
if [ "${1:-}" = "--dry-run" ]; then
  echo "== dry run: benchmarks/gpu_check.py --dry-run (CPU, Triton interpreter)"
  TRITON_INTERPRET=1 timeout 600 python benchmarks/gpu_check.py --dry-run
  exit $?
fi
unset TRITON_INTERPRET  # compiled kernels, not the CPU interpreter
DEST=${OUT:-}
if [ -n "$DEST" ]; then ROWS="$DEST/results_rows.md"; LOGS="$DEST"; else ROWS=benchmarks/RESULTS.md; LOGS=$(mktemp -d); fi
mkdir -p "$LOGS"
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$LOGS/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$LOGS/gpu.txt"

echo "== correctness (benchmarks/gpu_check.py)"
timeout 150 python benchmarks/gpu_check.py 2>&1 | tee "$LOGS/gpu_check.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== benchmarks/bench_spectral.py --device cuda"
timeout 150 python benchmarks/bench_spectral.py --device cuda --k 1 8 --repeats 30 --markdown "$ROWS" \
  2>&1 | tee "$LOGS/bench_spectral.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

if [ -f benchmarks/bench_overhead.py ]; then
  echo "== benchmarks/bench_overhead.py --device cuda"
  timeout 45 python benchmarks/bench_overhead.py --device cuda 2>&1 | tee "$LOGS/bench_overhead.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
echo "gpu_check.sh finished with status $status; rows in $ROWS"
exit $status
