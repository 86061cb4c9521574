#!/usr/bin/env bash
# OLM's loss-ratio variant on a late-fusion audio-visual dataset.
# Usage: bash scripts/run_logits.sh GPU [DATASET] [extra main.py flags...]
#   GPU      CUDA index (0, 1, ...) or "cpu"
#   DATASET  AVDigitsImbalanced (default, embedded), AVDigits, CREMAD, AVE, KineticSound, VGGSound
# The real datasets train with batch 96, as the released variant did; the embedded sets
# keeps its CPU-sized demo batch. A --batch-size flag overrides either.
set -euo pipefail
RUN_COM="$(dirname "$0")/run_logits_com.sh"
if [[ $# -lt 1 || "$1" == -* ]]; then  # no GPU given: run_logits_com.sh prints this usage
  METHOD=olm_loss_ratio HELP_FROM="$0" exec bash "$RUN_COM" "$@"
fi
GPU=$1; shift
DATASET=AVDigitsImbalanced
if [[ $# -gt 0 && "$1" != -* ]]; then DATASET=$1; shift; fi
BATCH=()
if [[ "${DATASET,,}" != avdigits* ]]; then BATCH=(--batch-size 96); fi
METHOD=olm_loss_ratio HELP_FROM="$0" exec bash "$RUN_COM" "$GPU" "$DATASET" "${BATCH[@]}" "$@"
