#!/usr/bin/env bash
# Every GPU check and the attention benchmark in one device call (H200 through the device tool):
#   bash tests/gpu/run_all.sh <commit>
# Writes logs and JSON under $OUT (default ./gpu_out); exit status non-zero when any check failed.
set -uo pipefail
commit=${1:?usage: run_all.sh <commit>}
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$out/gpu.txt"
python3 tests/gpu/check_attention.py --quick 2>&1 | tee "$out/check_attention.log" || status=1
python3 tests/gpu/check_estimation.py --out "$out" --commit "$commit" 2>&1 | tee "$out/check_estimation.log" || status=1
python3 tests/gpu/check_estimation.py --recall --out "$out" --commit "$commit" 2>&1 | tee "$out/check_estimation_recall.log" || status=1
python3 benchmarks/attention.py --out "$out/attention_h200.json" --commit "$commit" --plot "$out/attention_h200.png" 2>&1 \
  | tee "$out/attention.log" || status=1
exit $status
