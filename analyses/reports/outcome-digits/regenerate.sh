#!/usr/bin/env bash
# Regenerates this study from the repository root (needs `make install`): SmolLM2-135M-Instruct on the 76 held-out
# prompts of the built-in `digits` task, 4 samples each at temperature 1 (304 responses, scored by the default
# `exact` rule), response positions decoded under the BuPO lens; then the outcome split and the AUROC report.
# About 15 minutes on one idle CPU core. Then read the numbers and update notes.md.
set -euo pipefail
PY=${PY:-.venv/bin/python}
CACHE=${CACHE:-cache}
RUN=outcome-digits-smollm2
[ -f "$CACHE/runs/$RUN/manifest.json" ] && grep -q '"status": "complete"' "$CACHE/runs/$RUN/manifest.json" || {
  rm -rf "$CACHE/runs/$RUN"
  $PY -m entropylens trace --model smollm2 --prompts digits --split test --limit all --samples 4 \
    --temperature 1 --max-new-tokens 16 --positions response --lens bupo --batch-size 16 --seed 0 \
    --name "$RUN" --cache "$CACHE" --quiet
}
$PY -m entropylens show "$RUN" --by outcome --cache "$CACHE" > analyses/reports/outcome-digits/show_by_outcome.txt
$PY -m entropylens report "$RUN" --cache "$CACHE" -o analyses/reports/outcome-digits/report --images png \
  --title "SmolLM2-135M on digits: right vs wrong" --notes analyses/reports/outcome-digits/notes.md --no-write-stages
