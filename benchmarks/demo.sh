#!/usr/bin/env bash
# Wall time of the README's demo (`make demo`) from a fresh clone, venv install included,
# then of a second `make demo`, which must find everything up to date.
#
#   bash benchmarks/demo.sh [REPO]      # REPO defaults to this checkout
#
# The clone goes to a temporary directory that is removed afterwards.
set -euo pipefail

repo="$(cd "${1:-$(dirname "$0")/..}" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

git clone --quiet "$repo" "$work/msvq"
cd "$work/msvq"
echo "fresh clone of $repo at $(git rev-parse --short HEAD) in $work/msvq"
grep -m1 "model name" /proc/cpuinfo || true
echo "$(nproc) cores"

start=$(date +%s)
make demo > "$work/demo.log" 2>&1 || { tail -n 40 "$work/demo.log"; exit 1; }
first=$(( $(date +%s) - start ))

start=$(date +%s)
make demo > "$work/demo-again.log" 2>&1 || { tail -n 40 "$work/demo-again.log"; exit 1; }
second=$(( $(date +%s) - start ))
grep -q "Nothing to be done" "$work/demo-again.log" || { echo "the second run did work:"; tail -n 40 "$work/demo-again.log"; exit 1; }

cat results/table.md
echo
# Snakemake's benchmark files: wall seconds of each pretraining job in the first run.
for tsv in logs/*/*/pretrain.benchmark.tsv; do
    echo "pretraining $(basename "$(dirname "$tsv")"): $(awk 'NR == 2 {print $1}' "$tsv") s"
done
echo "first make demo:  $((first / 60)) min $((first % 60)) s (venv install included)"
echo "second make demo: ${second} s (nothing to be done)"
