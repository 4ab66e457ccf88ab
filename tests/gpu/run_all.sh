#!/usr/bin/env bash
# Every GPU check and the result files in one device call (H200 through the device tool), from the repository root:
#   bash tests/gpu/run_all.sh <commit>
# The checks run under pytest (`pytest -m gpu tests/gpu`: attention, estimation, and libproxyattn when
# PROXYATTN_CPP_BUILD names a build of cpp/ or cmake + nvcc are there); the scripts then write the timed result files.
# Writes logs and JSON under $OUT (default ./gpu_out); exit status non-zero when any check failed.
set -uo pipefail
commit=${1:?usage: run_all.sh <commit>}
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# The device machine runs a bare checkout (the project is not pip-installed there): the scripts import it from here.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$out/gpu.txt"
python3 -m pytest -m gpu tests/gpu -p no:cacheprovider -rfEs --durations=25 --junitxml="$out/pytest_gpu.xml" 2>&1 | tee "$out/pytest_gpu.log" || status=1
python3 -m tests.gpu.check_estimation --out "$out" --commit "$commit" 2>&1 | tee "$out/check_estimation.log" || status=1
python3 -m tests.gpu.check_estimation --recall --out "$out" --commit "$commit" 2>&1 | tee "$out/check_estimation_recall.log" || status=1
python3 -m tests.gpu.check_trt_launch --out "$out" --commit "$commit" 2>&1 | tee "$out/check_trt_launch.log" || status=1
python3 benchmarks/kernel_configs.py --out "$out/kernel_configs.json" --commit "$commit" 2>&1 | tee "$out/kernel_configs.log" || status=1
python3 benchmarks/attention.py --out "$out/attention_h200.json" --commit "$commit" --plot "$out/attention_h200.png" 2>&1 \
  | tee "$out/attention.log" || status=1
exit $status
