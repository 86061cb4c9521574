#!/usr/bin/env bash
# Train main.py on several processes with torchrun (DDP): one process per GPU, or CPU processes.
#
#   bash scripts/run_ddp.sh NPROC [GPU_LIST] [DATASET] [main.py flags...]
#     NPROC     processes on this machine (one per GPU when training on CUDA)
#     GPU_LIST  comma-separated CUDA indices (e.g. 0,1,2,3), or cpu (default: all visible GPUs)
#     DATASET   main.py --dataset (default AVDigits)
#   --batch-size is the global batch: each process loads batch-size / NPROC samples.
#   Several machines: set NNODES, NODE_RANK, MASTER_ADDR (and MASTER_PORT, default 29500)
#   on every machine and run the same command on each.
#   e.g. bash scripts/run_ddp.sh 2 cpu AVDigits --epochs 2
#        bash scripts/run_ddp.sh 4 0,1,2,3 CREMAD --amp bf16 --workers 8
set -euo pipefail

usage() { sed -n '2,14s/^# \{0,1\}//p' "$0"; }
if [[ $# -ge 1 && ( $1 == -h || $1 == --help ) ]]; then usage; exit 0; fi
if [[ $# -lt 1 ]]; then usage >&2; echo "error: give NPROC" >&2; exit 2; fi
nproc=$1; shift
case $nproc in
  ''|*[!0-9]*|0) echo "error: NPROC must be a positive integer, got '$nproc'" >&2; exit 2 ;;
esac

device=cuda
if [[ $# -ge 1 && $1 != -* ]]; then
  case $1 in
    cpu) device=cpu; shift ;;
    *[!0-9,]*) ;;  # not a GPU list: it is the dataset
    *) export CUDA_VISIBLE_DEVICES=$1; shift ;;
  esac
fi
dataset=AVDigits
if [[ $# -ge 1 && $1 != -* ]]; then dataset=$1; shift; fi

if [[ $device == cpu ]]; then
  # One thread per process, so NPROC processes share the cores instead of fighting over them.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

nnodes=${NNODES:-1}
if [[ $nnodes == 1 ]]; then
  rendezvous=(--standalone)
else
  : "${NODE_RANK:?set NODE_RANK (0 .. NNODES-1) on every machine}"
  : "${MASTER_ADDR:?set MASTER_ADDR to the address of the NODE_RANK 0 machine}"
  rendezvous=(--nnodes "$nnodes" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR"
              --master_port "${MASTER_PORT:-29500}")
fi

cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m torch.distributed.run "${rendezvous[@]}" --nproc_per_node "$nproc" \
  main.py --dataset "$dataset" --device "$device" "$@"
