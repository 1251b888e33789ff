#!/usr/bin/env bash
# Regenerates the three-family study from the repository root: SmolLM2-135M-Instruct (Llama),
# Qwen2.5-Coder-0.5B-Instruct (Qwen2) and Gemma 3 270M (Gemma 3) on the same MATH-500 prompts, both lenses,
# response positions only (the paper's averages). About 40 min on 2 shared CPU cores.
#   N=16 T=16 analyses/reports/families-3/regenerate.sh      (prompts, new tokens per response)
#   STEP=traces | STEP=report                                  (only one half)
#   STEP=check                                                 (fp64 check of the Gemma run, analyses/gemma_fp64.py)
set -euo pipefail
N=${N:-16}
T=${T:-16}
PROMPTS=${PROMPTS:-../shared/data/verl-math/math500.parquet}
OUT=analyses/reports/families-3
STEP=${STEP:-all}
EL=${EL:-entropylens}
PY=${PY:-python}
COMMON=(--prompts "$PROMPTS" --limit "$N" --max-new-tokens "$T" --lens both --positions response
        --batch-size 8 --seed 0)

trace() {  # name, model: skipped when that run is already complete
  if [ -f "cache/runs/$1/summary.parquet" ]; then echo "run $1 exists"; return; fi
  nice -n 5 "$EL" trace --model "$2" "${COMMON[@]}" --name "$1"
}

if [ "$STEP" != report ]; then
  make gemma
  "$PY" -m analyses.fetch_qwen25 --size 0.5b --no-trace
  trace fam3-gemma3 gemma3-270m
  trace fam3-qwen25 cache/models/qwen2.5-coder-0.5b.gguf
  trace fam3-smollm2 smollm2
fi
if [ "$STEP" != traces ]; then
  "$PY" -m analyses.families3 fam3-smollm2 fam3-qwen25 fam3-gemma3 -o "$OUT/figures"
  "$EL" report fam3-smollm2 fam3-qwen25 fam3-gemma3 -o "$OUT" --images png \
    --title "SmolLM2-135M (Llama) vs Qwen2.5-Coder-0.5B (Qwen2) vs Gemma 3 270M on MATH-500 ($N prompts)" \
    --notes "$OUT/notes.md"
fi
if [ "$STEP" = check ]; then  # the independent fp64 check of the Gemma run (slow: fp64 logits over V = 262,144)
  nice -n 5 "$PY" -m analyses.gemma_fp64 fam3-gemma3 --positions 2 --out "$OUT/tables"
  # the decode's share alone: on the same rows, and on 8 positions of prompts 0, 7 and 8
  nice -n 5 "$PY" -m analyses.gemma_fp64 fam3-gemma3 --forward float32 --positions 2 --out "$OUT/tables"
  nice -n 5 "$PY" -m analyses.gemma_fp64 fam3-gemma3 --forward float32 --prompts 0,7,8 --positions 8 --out "$OUT/tables"
  # which rows the exactness guard redoes in fp64, per lens and site
  nice -n 5 "$PY" -m analyses.gemma_guard fam3-gemma3 --out "$OUT/tables"
fi
