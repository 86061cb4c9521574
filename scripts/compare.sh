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
Environment: METHODS="joint olm" limits the methods; PYTHON picks the interpreter.
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
METHODS="${METHODS:-audio_only visual_only joint fusion_only ogm_ge olm olm_loss_ratio olm_mean}"
ROOT="${COMPARE_ROOT:-runs}/compare-${DATASET}"
mkdir -p "$ROOT"

failed=()
for seed in $(seq 0 $((SEEDS - 1))); do
  for method in $METHODS; do
    run="$ROOT/${method}-s${seed}"
    if [[ -f "$run/results.json" ]]; then
      echo "== $method seed $seed: done already ($run)"; continue
    fi
    resume=()
    if [[ -f "$run/last.pt" ]]; then
      resume=(--resume "$run")
    elif [[ -e "$run" ]]; then
      # Stopped before its first checkpoint: nothing to resume, keep it aside and restart.
      stale="$run.incomplete-$(date +%Y%m%d-%H%M%S)"
      mv "$run" "$stale"; echo "== $method seed $seed: moved an unfinished run without checkpoint to $stale"
    fi
    echo "== $method seed $seed -> $run"
    if ! "$PYTHON" main.py --dataset "$DATASET" --method "$method" --seed "$seed" --out "$run" \
         "${DEVICE[@]}" "${resume[@]}" "${EXTRA[@]}"; then
      failed+=("$method-s$seed")
      echo "== $method seed $seed FAILED (continuing with the others)" >&2
    fi
  done
done

"$PYTHON" -m utils.compare "$ROOT" || exit $?
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "error: ${#failed[@]} run(s) failed: ${failed[*]}; run the same command again to retry them" >&2
  exit 1
fi
