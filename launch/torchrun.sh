#!/usr/bin/env bash
# Launch attnres-train with torchrun: one process per GPU (or CPU process), on one node or many.
#
#   one node, 8 GPUs:       launch/torchrun.sh --nproc 8 -- model=f3 run_dir=runs/f3
#   CPU (gloo), 2 procs:    launch/torchrun.sh --nproc 2 -- model=tiny trainer.device=cpu
#   multi-node, c10d rendezvous (the same command on every node; any node's address works as the endpoint):
#     launch/torchrun.sh --nnodes 4 --nproc 8 --rdzv node0:29500 --job-id f3run -- model=f3 run_dir=/shared/runs/f3
#   multi-node, static ranks (node 0 is the master; each node passes its own --node-rank):
#     launch/torchrun.sh --nnodes 4 --node-rank $NODE_RANK --nproc 8 --rdzv node0:29500 -- model=f3 run_dir=...
#   under slurm: launch/slurm.sbatch runs this once per node (srun, one task per node).
#
# Options (environment defaults in brackets):
#   --nnodes N [NNODES, 1]           --nproc N [NPROC_PER_NODE, 1]      --node-rank R [NODE_RANK]: static mode
#   --rdzv HOST:PORT [MASTER_ADDR:MASTER_PORT]   --job-id ID [SLURM_JOB_ID, attnres]   --max-restarts N [0]
#   --dry-run: print the command instead of running it.
# Everything after `--` is passed to attnres-train as Hydra overrides. Bad options: one `error:` line, exit 2;
# so are bad overrides: `attnres-train --check-only` runs here once before torchrun starts any worker.
# A failed worker: one line and its exit code (2 bad input, 3 aborted, 128+N signal N), not torchrun's report
# (torchrun runs through attnres_train/cli/torchrun_main.py).
# Paths: the run starts in the caller's directory (a relative run_dir or data path means what the caller meant);
# the repository is found from this script's location and put on PYTHONPATH.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
NNODES="${NNODES:-1}"; NPROC="${NPROC_PER_NODE:-1}"; NODE_RANK_ARG="${NODE_RANK:-}"; JOB_ID="${SLURM_JOB_ID:-attnres}"
RDZV=""; MAX_RESTARTS=0; DRY_RUN=0; PY="${PYTHON:-$REPO/.venv/bin/python}"
if [ -n "${MASTER_ADDR:-}" ]; then RDZV="${MASTER_ADDR}:${MASTER_PORT:-29500}"; fi
[ -x "$PY" ] || PY=python3
die() { echo "error: $*" >&2; exit 2; }
need() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"; }
is_int() { case "$1" in ''|*[!0-9]*) return 1 ;; *) return 0 ;; esac; }
while [ $# -gt 0 ]; do
  case "$1" in
    --nnodes) need "$@"; NNODES="$2"; shift 2 ;;
    --nproc|--nproc-per-node) need "$@"; NPROC="$2"; shift 2 ;;
    --node-rank) need "$@"; NODE_RANK_ARG="$2"; shift 2 ;;
    --rdzv|--rdzv-endpoint) need "$@"; RDZV="$2"; shift 2 ;;
    --job-id) need "$@"; JOB_ID="$2"; shift 2 ;;
    --max-restarts) need "$@"; MAX_RESTARTS="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) die "unknown option $1 (put Hydra overrides after --)" ;;
  esac
done
for v in NNODES NPROC MAX_RESTARTS; do is_int "${!v}" || die "--$(echo "$v" | tr 'A-Z_' 'a-z-') must be a non-negative integer, got '${!v}'"; done
[ "$NNODES" -ge 1 ] && [ "$NPROC" -ge 1 ] || die "--nnodes and --nproc must be >= 1"

if [ "$NNODES" = "1" ] && [ -z "$RDZV" ]; then
  CMD=("$PY" -m attnres_train.cli.torchrun_main --standalone --nnodes 1 --nproc-per-node "$NPROC")
else
  [ -n "$RDZV" ] || die "--rdzv HOST:PORT (or MASTER_ADDR) is required with --nnodes $NNODES"
  case "$RDZV" in *:*) ;; *) RDZV="$RDZV:29500" ;; esac
  if [ -n "$NODE_RANK_ARG" ]; then  # static: fixed node ranks, node 0 hosts the store
    is_int "$NODE_RANK_ARG" && [ "$NODE_RANK_ARG" -lt "$NNODES" ] || die "--node-rank must be in 0..$((NNODES - 1)), got '$NODE_RANK_ARG'"
    CMD=("$PY" -m attnres_train.cli.torchrun_main --nnodes "$NNODES" --node-rank "$NODE_RANK_ARG" --nproc-per-node "$NPROC"
         --master-addr "${RDZV%:*}" --master-port "${RDZV##*:}")
  else  # c10d: ranks assigned at rendezvous, restarts allowed
    CMD=("$PY" -m attnres_train.cli.torchrun_main --nnodes "$NNODES" --nproc-per-node "$NPROC"
         --rdzv-backend c10d --rdzv-endpoint "$RDZV" --rdzv-id "$JOB_ID")
  fi
fi
[ "$MAX_RESTARTS" = "0" ] || CMD+=(--max-restarts "$MAX_RESTARTS")
CMD+=(-m attnres_train "$@")
if [ "$DRY_RUN" = "1" ]; then printf '%q ' "${CMD[@]}"; echo; exit 0; fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# SIGUSR1 = "save and exit 0" (slurm's --signal=USR1@N, scancel -s USR1): slurm delivers it to every process of
# the job step, so the workers get it themselves. torchrun's agent must not act on it: listed in
# TORCHELASTIC_SIGNALS_TO_HANDLE it turns it into a shutdown and then dies of it (the job step fails with exit
# 138 although every worker saved and exited 0); not listed, the default action kills the agent. So the agent
# ignores it (an ignored signal is inherited; the trainer installs its own SIGUSR1 handler in each worker).
if [ -n "${TORCHELASTIC_SIGNALS_TO_HANDLE:-}" ]; then
  TORCHELASTIC_SIGNALS_TO_HANDLE="$(echo "$TORCHELASTIC_SIGNALS_TO_HANDLE" | tr ',' '\n' | grep -vx 'SIGUSR1' | paste -sd, -)"
  export TORCHELASTIC_SIGNALS_TO_HANDLE
fi
trap '' USR1
# Bad input (config, run_dir) is refused here, once, before torchrun starts workers: the one `error:` line and
# exit 2, instead of every rank's line followed by torchrun's ChildFailedError report (docs/training.md).
WORLD_SIZE=$((NNODES * NPROC)) LOCAL_WORLD_SIZE="$NPROC" "$PY" -m attnres_train --check-only "$@" || exit $?
exec "${CMD[@]}"
