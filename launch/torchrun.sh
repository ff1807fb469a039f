#!/usr/bin/env bash
# Launch attnres-train with torchrun: one process per GPU (or CPU process), single- or multi-node.
#
#   single node, 8 GPUs:   launch/torchrun.sh --nproc 8 -- model=f3 run_dir=runs/f3
#   CPU (gloo), 2 procs:   launch/torchrun.sh --nproc 2 -- model=tiny trainer.device=cpu
#   multi-node (run the same command on every node):
#     launch/torchrun.sh --nnodes 4 --nproc 8 --rdzv host0.example:29500 --job-id f3run -- model=f3 run_dir=/shared/runs/f3
#
# Everything after `--` is passed to attnres-train as Hydra overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
NNODES=1; NPROC=1; RDZV=""; JOB_ID="attnres"; PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
while [ $# -gt 0 ]; do
  case "$1" in
    --nnodes) NNODES="$2"; shift 2 ;;
    --nproc|--nproc-per-node) NPROC="$2"; shift 2 ;;
    --rdzv|--rdzv-endpoint) RDZV="$2"; shift 2 ;;
    --job-id) JOB_ID="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "error: unknown option $1 (put Hydra overrides after --)" >&2; exit 2 ;;
  esac
done
if [ "$NNODES" = "1" ] && [ -z "$RDZV" ]; then
  exec "$PY" -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node "$NPROC" -m attnres_train "$@"
fi
if [ -z "$RDZV" ]; then echo "error: --rdzv HOST:PORT is required with --nnodes > 1" >&2; exit 2; fi
exec "$PY" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NPROC" \
  --rdzv-backend c10d --rdzv-endpoint "$RDZV" --rdzv-id "$JOB_ID" -m attnres_train "$@"
