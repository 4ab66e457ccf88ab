#!/usr/bin/env bash
# The GPU checks and the result files, from the repository root, in parts that each fit one device call (600 s):
#   bash tests/gpu/run_all.sh <commit> [tests|checks|bench|oracle|columns|all]
#   tests   pytest -m gpu tests/gpu without the serving test (attention, estimation, TensorRT-layout launches, and
#           libproxyattn when PROXYATTN_CPP_LIB names a build carried from the CPU machine, or PROXYATTN_CPP_BUILD a
#           build directory, or cmake + nvcc are there). H100, library carried: 265 s at commit 3b48b1a; over 420 s at
#           38b8322 on a fresh machine (cold Triton caches), so give it a whole call.
#   checks  the estimation and TensorRT-launch check scripts (their JSON result files).
#   bench   the block-sparse kernel's launch configs against each other, then the attention benchmark.
#   oracle  the exact-mass oracle and the default's ranking/count split at 128K (benchmarks/oracle_structured.py).
#   columns vertical columns: their GPU checks (column kernel, rule 3 with columns), the whole-method rows with and without columns at 32K and 128K
#           (benchmarks/attention.py --section proxy), then the column kernel's launch configs (column_configs.py).
#   all     tests, checks and bench in a row (default; longer than one device call: for a machine kept warm between calls).
# Writes logs and JSON under $OUT (default ./gpu_out); exit status non-zero when any step failed.
set -uo pipefail
usage="usage: run_all.sh <commit> [tests|checks|bench|oracle|columns|all]"
commit=${1:?$usage}
part=${2:-all}
case "$part" in
  tests | checks | bench | oracle | columns | all) ;;
  *)
    echo "run_all.sh: part '$part': allowed tests, checks, bench, oracle, columns or all" >&2
    exit 2
    ;;
esac
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# The device machine runs a bare checkout (the project is not pip-installed there): the scripts import it from here.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
tag=$(echo "$gpu" | grep -q H200 && echo h200 || echo h100)
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$out/gpu.txt"
if [ "$part" = tests ] || [ "$part" = all ]; then
  python3 -m pytest -m gpu tests/gpu --ignore=tests/gpu/test_gpu_serving.py -p no:cacheprovider -rfEs --durations=25 \
    --junitxml="$out/pytest_gpu.xml" 2>&1 | tee "$out/pytest_gpu_$tag.log" || status=1
fi
if [ "$part" = checks ] || [ "$part" = all ]; then
  python3 -m tests.gpu.check_estimation --out "$out" --commit "$commit" 2>&1 | tee "$out/check_estimation.log" || status=1
  python3 -m tests.gpu.check_estimation --recall --out "$out" --commit "$commit" 2>&1 | tee "$out/check_estimation_recall.log" || status=1
  python3 -m tests.gpu.check_trt_launch --out "$out" --commit "$commit" 2>&1 | tee "$out/check_trt_launch.log" || status=1
fi
if [ "$part" = bench ] || [ "$part" = all ]; then
  python3 benchmarks/kernel_configs.py --out "$out/kernel_configs_$tag.json" --commit "$commit" 2>&1 | tee "$out/kernel_configs.log" || status=1
  python3 benchmarks/attention.py --out "$out/attention_$tag.json" --commit "$commit" --sizes 32768,131072 --rounds 3 \
    --plot "$out/attention_$tag.png" 2>&1 | tee "$out/attention.log" || status=1
fi
if [ "$part" = oracle ]; then
  python3 benchmarks/oracle_structured.py --device cuda --seq-len 131072 --seed 131072 --commit "$commit" \
    --out "$out/oracle_structured_131072_$tag.json" 2>&1 | tee "$out/oracle_structured.log" || status=1
fi
if [ "$part" = columns ]; then
  python3 -m pytest -m gpu tests/gpu/test_gpu_attention.py tests/gpu/test_gpu_estimation.py -k vertical_columns -p no:cacheprovider -rfEs \
    2>&1 | tee "$out/pytest_gpu_columns_$tag.log" || status=1
  python3 benchmarks/attention.py --section proxy --sizes 32768,131072 --rounds 3 --commit "$commit" \
    --config default --config "column_fraction=0.02, budget_fraction=0.02" --config "column_fraction=0.01, budget_fraction=0.02" \
    --config "column_fraction=0.02" --config "column_fraction=0.01" --config "column_fraction=0.04" --config budget_fraction=0.1 \
    --config "gamma=0.7, column_fraction=0.02" \
    --config "gamma=0.9, column_fraction=0.02" --config "gamma=0.85, column_fraction=0.02" \
    --config "gamma=0.8, column_fraction=0.02" --config "gamma=0.75, column_fraction=0.02" \
    --out "$out/attention_columns_$tag.json" 2>&1 | tee "$out/attention_columns.log" || status=1
  python3 benchmarks/column_configs.py --commit "$commit" --out "$out/column_configs_$tag.json" 2>&1 \
    | tee "$out/column_configs.log" || status=1
fi
exit $status
