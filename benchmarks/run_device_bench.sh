#!/usr/bin/env bash
# The speed benchmarks of one device session, in sequence on one GPU (nothing else on it meanwhile), started in the
# background so that the machine can take carry calls and polls while it runs:
#   bash benchmarks/run_device_bench.sh <commit> <results dir> [serve]
# From a copy of the repo (cp -r the checkout to /tmp/repo first: later calls refresh the working tree):
#   1. benchmarks/attention.py at 40K and 128K (the whole method against cuDNN, interleaved rounds);
#   2. benchmarks/prefill.py at 8K and 128K (5 interleaved rounds);
#   3. with `serve`, once /tmp/gguf/gemma-3-270m-q4_k_m.gguf exists (joined by benchmarks/join_pieces.sh from carried
#      pieces; waited for up to 60 s): tests/gpu/check_serving.py with Gemma-3-270M (wheels in /tmp/site, numpy's
#      wheel in /tmp/c; docs/serving.md says how they travel);
#   4. benchmarks/profile_plan.py --sweep-needs / --sweep-scores 131072 (rule 3's needs kernels, the proxy scores, per
#      launch);
#   5. benchmarks/profile_plan.py --sizes 131072 (planning's host time and GPU kernels).
# <results dir>/progress.txt records each step's start and exit status; collect with
#   bash benchmarks/run_device_bench.sh --collect <results dir>   (JSON files and one logs.tgz into $OUT)
set -uo pipefail
if [ "${1:-}" = "--collect" ]; then
  res=${2:?results dir}
  cat "$res/progress.txt" 2>/dev/null
  cp "$res"/*.json "${OUT:?OUT}"/ 2>/dev/null
  (cd "$res" && tar czf "$OUT/logs.tgz" ./*.log progress.txt 2>/dev/null)
  tail -n 3 "$res"/*.log 2>/dev/null | cut -c1-300
  exit 0
fi
sha=${1:?commit} res=${2:?results dir} serve=${3:-}
mkdir -p "$res"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
tag=$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && echo h200 || echo h100)
echo "gpu $tag" > "$res/progress.txt"
step() {
  local name=$1
  shift
  echo "$(date +%T) start $name" >> "$res/progress.txt"
  "$@" > "$res/$name.log" 2>&1
  echo "$(date +%T) $name rc=$?" >> "$res/progress.txt"
}
step attention python3 benchmarks/attention.py --out "$res/attention_${tag}.json" --sizes 40960,131072 --variant-sizes 0 \
  --rounds 5 --commit "$sha" --recall-max 0
step prefill python3 benchmarks/prefill.py --out "$res" --sizes 8192,131072 --reps 5 --commit "$sha" --time-budget 420
if [ "$serve" = serve ]; then
  gguf=/tmp/gguf/gemma-3-270m-q4_k_m.gguf
  for _ in $(seq 1 12); do [ -f $gguf ] && break; sleep 5; done
  if [ -f $gguf ]; then
    step serving env PYTHONPATH="/tmp/site:$PWD" PROXYATTN_GGUF_DIR=/tmp/gguf python3 -m tests.gpu.check_serving --out "$res" \
      --commit "$sha" --models gemma3-270m --numpy-wheel /tmp/c/numpy-1.26.4-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl
  else
    echo "$(date +%T) serving skipped: no $gguf" >> "$res/progress.txt"
  fi
fi
step sweep python3 benchmarks/profile_plan.py --sweep-needs 131072 --out "$res/needs_sweep_${tag}.json" --commit "$sha"
step sweep_scores python3 benchmarks/profile_plan.py --sweep-scores 131072 --out "$res/scores_sweep_${tag}.json" --commit "$sha"
step profile python3 benchmarks/profile_plan.py --sizes 131072 --out "$res/profile_plan_${tag}.json" --commit "$sha"
echo "$(date +%T) DONE" >> "$res/progress.txt"
