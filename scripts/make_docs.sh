#!/usr/bin/env bash
# Regenerate every figure the README and docs/ publish, then refill their generated blocks.
#
#   bash scripts/make_docs.sh            # every report, then python -m utils.docs
#   COMPARE=1 bash scripts/make_docs.sh  # also the 5-seed AV-Digits comparison of every method (about an hour on a 2-core CPU)
#
# Each report docs/results/<name>.md is headed by the command that wrote it, the date, the
# CPU model and the load (utils/provenance.py); `python -m utils.docs --rerun` reruns those
# recorded commands (the main job, checkpoint sizes, every benchmark), a report whose command
# reads temporary run folders is named and kept. The test suite's time is measured over the
# whole suite, in the environment as given. PYTHON picks the interpreter; the benchmarks run
# with OMP_NUM_THREADS=1 unless it is set.
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then sed -n '2,12s/^# \{0,1\}//p' "$0"; exit 0; fi
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
SUITE_THREADS="${OMP_NUM_THREADS:-}"  # the suite is timed as the README runs it: thread count as given
export PYTHON="$PY" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

status=0
"$PY" -m utils.docs --rerun --skip suite-time bench-gpu compare-avdigits || status=1  # those three: below
if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  "$PY" benchmarks/bench_gpu.py --report docs/results/bench-gpu.md || status=1
fi
if [[ "${COMPARE:-0}" == 1 ]]; then
  bash scripts/compare.sh cpu AVDigits 5 --no-progress || status=1
  "$PY" -m utils.compare runs/compare-AVDigits --report docs/results/compare-avdigits.md || status=1
  "$PY" -m utils.plot runs/compare-AVDigits/joint-s0 runs/compare-AVDigits/olm-s0 \
      --out docs/results/joint-vs-olm-avdigits.png || status=1
fi
if [[ -n "$SUITE_THREADS" ]]; then suite_env=(env OMP_NUM_THREADS="$SUITE_THREADS"); else suite_env=(env -u OMP_NUM_THREADS); fi
"${suite_env[@]}" "$PY" benchmarks/suite_time.py --report docs/results/suite-time.md || echo "warning: some tests failed" >&2
"$PY" -m utils.docs
"$PY" -m utils.docs --check || status=1
exit $status
