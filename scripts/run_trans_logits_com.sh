#!/usr/bin/env bash
# OLM-Trans with the `rate` target (OLM-com): k-fold cross-validation of a mid-fusion
# transformer. Extra arguments go to main_trans.py and override the defaults set here.
#
#   bash scripts/run_trans_logits_com.sh GPU MODEL_TYPE [main_trans.py flags...]
#     GPU         a CUDA device index (0, 1, ...) or cpu
#     MODEL_TYPE  emt, mbt, umt or ca
#   e.g. bash scripts/run_trans_logits_com.sh cpu emt
#        bash scripts/run_trans_logits_com.sh 0 mbt --dataset MERMULTI --data-root ~/datasets/MERMULTI
#        bash scripts/run_trans_logits_com.sh cpu ca --modalities audio,visual,text   (text is opt-in)
set -euo pipefail
METHOD=${METHOD:-olm}

usage() { sed -n '2,11s/^# \{0,1\}//p' "${HELP_FROM:-$0}"; }
if [[ $# -ge 1 && ( $1 == -h || $1 == --help ) ]]; then usage; exit 0; fi
if [[ $# -lt 2 ]]; then usage >&2; echo "error: give GPU and MODEL_TYPE" >&2; exit 2; fi
gpu=$1; model_type=$2; shift 2
case $gpu in
  cpu) device=cpu ;;
  ''|*[!0-9]*) echo "error: GPU must be a CUDA index or cpu, got '$gpu'" >&2; exit 2 ;;
  *) device=cuda:$gpu ;;
esac
case $model_type in
  emt|mbt|umt|ca) ;;
  *) echo "error: MODEL_TYPE must be emt, mbt, umt or ca, got '$model_type'" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" main_trans.py --model-type "$model_type" --method "$METHOD" --device "$device" "$@"
