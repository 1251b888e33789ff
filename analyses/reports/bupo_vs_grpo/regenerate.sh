#!/usr/bin/env bash
# Regenerates this study from the repository root: 6 runs (BuPO and GRPO x seeds 0,1,2), ~36 min on 2 CPU
# cores shared with a 1.5B-parameter trace (~6 min per run); expect ~25 min on two idle cores.
set -euo pipefail
python analyses/bupo_vs_grpo.py --seeds 0,1,2 --steps 8 --internal-steps 3 --prompts-per-step 4 -G 4 \
  --max-new-tokens 20 --eval-prompts 16 --eval-samples 4 --ks 1,4 --trace-prompts 2 --tag bvg
