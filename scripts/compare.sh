#!/usr/bin/env bash
# Train every method on one protocol over several seeds, then aggregate with utils.compare.
# Finished runs (results.json present) are skipped and interrupted ones resumed, so running
# the same command again continues where it stopped. See docs/comparison.md.
set -uo pipefail

usage() {
  cat <<'EOF'
usage: scripts/compare.sh [GPU] [DATASET] [SEEDS] [main.py flags ...]

  GPU       CUDA device index, or "cpu" (default 0)
  DATASET   dataset name as main.py --dataset takes it (default AVDigits)
  SEEDS     number of seeds, run as seeds 0 .. SEEDS-1 (default 3)
  flags     passed unchanged to every run (e.g. --epochs 10 --fusion bilinear)

Runs land in runs/compare-<DATASET>/<method>-s<seed>/ (set COMPARE_ROOT to change the
parent folder), then compare.md and compare.png are written next to them.
Environment: METHODS="joint olm" limits the methods, and an entry METHOD:--flag=value
runs a variant under its own label (olm:--heldout-norm=running -> olm-running-s<seed>/);
PYTHON picks the interpreter;
KEEP_CHECKPOINTS (default none: the report needs no checkpoint) is passed to
--keep-checkpoints, e.g. KEEP_CHECKPOINTS=best keeps each run's weights. Each run
measures its imbalance diagnostics from best.pt before pruning it and keeps
predictions.npz, which the report's unimodal-ensemble row (audio_only + visual_only of
the same seed) averages.
EOF
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then usage; exit 0; fi

# Up to three leading positional arguments; the first flag starts the pass-through part.
positional=()
while [[ $# -gt 0 && ${#positional[@]} -lt 3 && "$1" != -* ]]; do positional+=("$1"); shift; done
GPU="${positional[0]:-0}"
DATASET="${positional[1]:-AVDigits}"
SEEDS="${positional[2]:-3}"
EXTRA=("$@")

if ! [[ "$SEEDS" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: SEEDS must be a positive integer, got '$SEEDS' (see --help)" >&2; exit 2
fi
if [[ "$GPU" == "cpu" ]]; then
  DEVICE=(--device cpu)
elif [[ "$GPU" =~ ^[0-9]+$ ]]; then
  export CUDA_VISIBLE_DEVICES="$GPU"
  DEVICE=(--device cuda)
else
  echo "error: GPU must be a CUDA device index or 'cpu', got '$GPU' (see --help)" >&2; exit 2
fi

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
METHODS="${METHODS:-audio_only visual_only joint fusion_only ogm_ge olm olm:--heldout-norm=running olm-whole-epoch=olm:--reference-tail=1 olm_loss_ratio olm_mean g_blending pmr agm mmpareto mla mmcosine unimodal_teacher mbsd cml lfm reconboost relearning opm greedy amco modality_valuation}"
ROOT="${COMPARE_ROOT:-runs}/compare-${DATASET}"
KEEP="${KEEP_CHECKPOINTS:-none}"
mkdir -p "$ROOT"

# A METHODS entry is a method, or a variant: METHOD:--flag=value[:--flag=value...], run
# under the label METHOD-value[-value...] (olm:--heldout-norm=running -> olm-running), or
# LABEL=METHOD:--flag=value... to name it. utils.compare groups runs by that label.
parse_entry() {
  local head="${1%%:*}" flag
  variant_flags=()
  if [[ "$1" == *:* ]]; then IFS=':' read -ra variant_flags <<< "${1#*:}"; fi
  method="${head#*=}"
  if [[ "$head" == *=* ]]; then label="${head%%=*}"; return; fi
  label="$method"
  for flag in "${variant_flags[@]}"; do
    if [[ "$flag" == *=* ]]; then label+="-${flag#*=}"; else label+="-${flag##*-}"; fi
  done
}

failed=()
for seed in $(seq 0 $((SEEDS - 1))); do
  for entry in $METHODS; do
    parse_entry "$entry"
    run="$ROOT/${label}-s${seed}"
    if [[ -f "$run/results.json" ]]; then
      echo "== $label seed $seed: done already ($run)"; continue
    fi
    resume=()
    if [[ -f "$run/last.pt" ]]; then
      resume=(--resume "$run")
    elif [[ -e "$run" ]]; then
      # Stopped before its first checkpoint: nothing to resume, keep it aside and restart.
      stale="$run.incomplete-$(date +%Y%m%d-%H%M%S)"
      mv "$run" "$stale"; echo "== $label seed $seed: moved an unfinished run without checkpoint to $stale"
    fi
    echo "== $label seed $seed -> $run"
    # The report reads results.json, metrics.jsonl and predictions.npz only: no checkpoint is
    # kept once a run has finished (last.pt exists while it trains, so an interrupted run
    # still resumes).
    if ! "$PYTHON" main.py --keep-checkpoints "$KEEP" --dataset "$DATASET" --method "$method" --seed "$seed" --out "$run" \
         "${DEVICE[@]}" "${resume[@]}" "${EXTRA[@]}" "${variant_flags[@]}"; then
      failed+=("$label-s$seed")
      echo "== $label seed $seed FAILED (continuing with the others)" >&2
    fi
  done
done

"$PYTHON" -m utils.compare "$ROOT" || exit $?
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "error: ${#failed[@]} run(s) failed: ${failed[*]}; run the same command again to retry them" >&2
  exit 1
fi
