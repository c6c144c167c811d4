#!/usr/bin/env bash
# Regenerate the comparison figures the README quotes, into their tracked folders (results/compare, results/k_sweep).
# Only this script writes there: the README's own commands write to runs/ (ignored by git). ~5 min on 2 CPU cores.
#   bash benchmarks/readme_figures.sh
set -euo pipefail
cd "$(dirname "$0")/.."
WORLD="${WORLD:-world}"
[ -f "$WORLD/records.jsonl" ] || glimpseprune make-world --out "$WORLD" --n 500 --seed 1
glimpseprune compare --split "$WORLD/records.jsonl" --out results/compare --limit 250 --overwrite
glimpseprune compare --k-sweep --split "$WORLD/records.jsonl" --out results/k_sweep --limit 250 --overwrite
