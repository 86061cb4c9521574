#!/usr/bin/env bash
# OLM-Trans with the `loss_ratio` target (the loss-ratio variant): k-fold cross-validation of a
# mid-fusion transformer. Extra arguments go to main_trans.py and override the defaults set here.
#
#   bash scripts/run_trans_logits.sh GPU MODEL_TYPE [main_trans.py flags...]
#     GPU         a CUDA device index (0, 1, ...) or cpu
#     MODEL_TYPE  emt, mbt, umt or ca
#   e.g. bash scripts/run_trans_logits.sh cpu emt
#        bash scripts/run_trans_logits.sh 0 mbt --dataset MERMULTI --data-root ~/datasets/MERMULTI
set -euo pipefail
METHOD=olm_loss_ratio HELP_FROM="$0" exec bash "$(dirname "$0")/run_trans_logits_com.sh" "$@"
