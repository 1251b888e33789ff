#!/usr/bin/env bash
# Regenerates this study from the repository root (about 15-40 min on 2 shared CPU cores).
set -euo pipefail
entropylens trace --model smollm2 --prompts ../shared/data/verl-math/math500.parquet --limit 8 \
  --max-new-tokens 32 --lens both --positions response --batch-size 8 --seed 0 --name smollm2-math500
entropylens report smollm2-math500 -o analyses/reports/smollm2-math500 --images png \
  --title "SmolLM2-135M-Instruct on MATH-500 (8 prompts)" --notes analyses/reports/smollm2-math500/notes.md
