#!/usr/bin/env bash
# The 3-seed BuPO-vs-GRPO comparison of ../bupo_vs_grpo/ under the authors' recipe (docs/bupo-fidelity.md):
# their loss (--objective paper: dual-clip c = 10, log-ratio clamp, token mean per micro-batch), their schedule of
# four optimiser steps per rollout batch (--mini-batches 4) and their AdamW weight decay 0.01; everything else as
# the original study (SmolLM2-135M-Instruct, `digits`, k = 15, 40 steps x 4 prompts x G = 4, lr 1e-5, 25 % on pi^k,
# 76 held-out prompts x 4 samples). Six runs, each ~15 CPU-minutes of training (21 CPU-s per step on one thread,
# "AMD EPYC") plus its evaluation; from the repository root
# (needs `make install`). Runs can be split over processes with --only NAME,... and a final full invocation.
# Then read the numbers and write notes.md.
set -euo pipefail
.venv/bin/python -m analyses.bupo_vs_grpo --seeds 0,1,2 --steps 40 --bupo-frac 0.25 --sweep "" --layers "" \
  --prompts-per-step 4 -G 4 --max-new-tokens 12 --lr 1e-5 --eval-prompts 76 --eval-samples 4 --ks 1,4 --tag bvgp \
  --objective paper --mini-batches 4 --weight-decay 0.01 -o analyses/reports/bupo_vs_grpo_paper
