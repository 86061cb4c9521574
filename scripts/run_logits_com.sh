#!/usr/bin/env bash
# OLM (rate target, "OLM-com") on a late-fusion audio-visual dataset.
# Usage: bash scripts/run_logits_com.sh GPU [DATASET] [extra main.py flags...]
#   GPU      CUDA index (0, 1, ...) or "cpu"
#   DATASET  AVDigitsImbalanced (default: embedded, with measured modality imbalance),
#            AVDigits (embedded, balanced), CREMAD, AVE, KineticSound, VGGSound
# Example: bash scripts/run_logits_com.sh cpu AVDigits --epochs 5
set -euo pipefail
METHOD=${METHOD:-olm}
if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${HELP_FROM:-$0}"
  exit $([[ $# -lt 1 ]] && echo 2 || echo 0)
fi
GPU=$1; shift
DATASET=AVDigitsImbalanced
if [[ $# -gt 0 && "$1" != -* ]]; then DATASET=$1; shift; fi
if [[ "$GPU" == "cpu" ]]; then DEVICE=cpu; elif [[ "$GPU" =~ ^[0-9]+$ ]]; then DEVICE="cuda:$GPU"; else
  echo "error: GPU must be a CUDA index or 'cpu', got '$GPU'" >&2; exit 2; fi
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" main.py --dataset "$DATASET" --method "$METHOD" --device "$DEVICE" "$@"
