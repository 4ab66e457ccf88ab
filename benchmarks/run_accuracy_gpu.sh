#!/usr/bin/env bash
# The accuracy grid on a GPU machine without a package index (the device tool's H100 or H200):
#   bash benchmarks/run_accuracy_gpu.sh <commit> <pieces dir> <model> <lengths> <methods> [extra accuracy.py args]
# <pieces dir> holds the packaged GGUF files in pieces with sums.txt (benchmarks/join_pieces.sh says which forms);
# the `gguf` wheel is under .whl/. The pieces are joined into /tmp/gguf once, checked, and benchmarks/accuracy.py runs with PROXYATTN_GGUF_DIR=/tmp/gguf, bf16, Triton kernels. Results go to $OUT.
set -euo pipefail
commit=${1:?commit}; pieces=${2:?pieces dir}; model=${3:?model}; lengths=${4:?lengths}; methods=${5:?methods}
shift 5
out=${OUT:-acc_out}
mkdir -p "$out" /tmp/gguf
case $model in
  gemma3-270m) file=gemma-3-270m-q4_k_m.gguf ;;
  smollm2) file=SmolLM2-135M-Instruct.Q4_1.gguf ;;
  *) echo "model=$model; allowed: gemma3-270m, smollm2" >&2; exit 2 ;;
esac
bash "$(dirname "$0")/join_pieces.sh" "$pieces" /tmp/gguf "$file"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PROXYATTN_GGUF_DIR=/tmp/gguf PYTHONUNBUFFERED=1
# exec: a `timeout` around this script stops the benchmark itself, not only the shell (a leftover run would hold
# the GPU in the next call); the log is written unfiltered and unbuffered, so a cut run still shows how far it got.
exec python3 benchmarks/accuracy.py --model "$model" --lengths "$lengths" --methods "$methods" --device cuda --dtype bfloat16 \
  --commit "$commit" --out "$out" "$@" > "$out/accuracy_$model.log" 2>&1
