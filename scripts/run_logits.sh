#!/usr/bin/env bash
# OLM's loss-ratio variant on a late-fusion audio-visual dataset.
# Usage: bash scripts/run_logits.sh GPU [DATASET] [extra main.py flags...]
#   GPU      CUDA index (0, 1, ...) or "cpu"
#   DATASET  AVDigits (default, embedded), CREMAD, AVE, KineticSound, VGGSound
# The released variant used batch 96; pass --batch-size 96 to match it.
set -euo pipefail
METHOD=olm_loss_ratio HELP_FROM="$0" exec bash "$(dirname "$0")/run_logits_com.sh" "$@"
