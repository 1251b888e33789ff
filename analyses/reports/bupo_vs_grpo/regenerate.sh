#!/usr/bin/env bash
# Regenerates this study from the repository root (needs `make install`): 11 runs of SmolLM2-135M-Instruct on the
# built-in `digits` task — BuPO (first 25 % of the steps on pi^15) and GRPO on seeds 0, 1, 2, plus BuPO with an
# internal phase of 10, 50 and 75 % and BuPO at k = 6 and 24 on seed 0 — each 40 steps x 4 prompts x G = 4,
# evaluated on 76 held-out prompts x 4 samples. About 90 minutes on 2 idle CPU cores; a rerun keeps finished runs (cache/runs/bvg-*/study.json).
# Then read the numbers and update notes.md.
set -euo pipefail
.venv/bin/python -m analyses.bupo_vs_grpo --seeds 0,1,2 --steps 40 --bupo-frac 0.25 --sweep 0.1,0.5,0.75 --layers 6,24 \
  --prompts-per-step 4 -G 4 --max-new-tokens 12 --lr 1e-5 --eval-prompts 76 --eval-samples 4 --ks 1,4 --tag bvg
