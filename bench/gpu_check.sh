#!/usr/bin/env bash
# GPU readiness check (issue 12): one short run on a freshly lent CUDA machine (about 5 min on one H200, at most
# ~8 with setup). Picks a Python with CUDA torch (.venv, else `make setup` when .venv is missing, else python3),
# runs bench/gpu_check.py (sections a-d, see its docstring) and tees everything to
# bench/results/gpu_check-<date>.log (gitignored: bench/results/*.log). Exit status: gpu_check.py's (1 = a section
# printed ERROR, 2 = no CUDA). Usage: bench/gpu_check.sh [--quick] [--only a,b] ...; PY=python overrides the pick.
set -uo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET  # section a times the compiled kernels
BUDGET="${GPU_CHECK_BUDGET:-470}"  # seconds for setup + check
mkdir -p bench/results
LOG="bench/results/gpu_check-$(date +%Y-%m-%d-%H%M%S).log"

cuda_py() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; }

pick_python() {
  if [ -n "${PY:-}" ]; then echo "$PY"; return; fi
  if [ -x .venv/bin/python ] && cuda_py .venv/bin/python; then echo .venv/bin/python; return; fi
  if [ ! -e .venv ] && nvidia-smi -L >/dev/null 2>&1; then
    echo "[gpu_check] no .venv: make setup (system CUDA torch + [gpu] extra)" >&2
    PIP_RETRIES=0 PIP_DEFAULT_TIMEOUT=15 timeout 240 make setup >&2 || echo "[gpu_check] make setup failed" >&2
    if cuda_py .venv/bin/python; then echo .venv/bin/python; return; fi
  fi
  for p in python3 .venv/bin/python; do  # python3 with CUDA torch; then any torch (gpu_check.py reports no CUDA)
    if cuda_py "$p"; then echo "$p"; return; fi
  done
  for p in .venv/bin/python python3; do
    if "$p" -c 'import torch' >/dev/null 2>&1; then echo "$p"; return; fi
  done
  return 1
}

run() {
  echo "gpu_check $(date -Is) on $(hostname), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), args: $*"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: none"
  local py args=("$@")
  py="$(pick_python)" || { echo "ERROR setup: no Python with torch found"; return 1; }
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 300 ] && [[ " $* " != *" --quick "* ]]; then
    echo "[gpu_check] ${left}s left after setup: running --quick"; args+=(--quick)
  fi
  echo "python: $py ($("$py" -c 'import sys; print(sys.version.split()[0])'))"
  timeout -k 10 "$((left > 60 ? left : 60))" "$py" -u bench/gpu_check.py "${args[@]}"
  local rc=$?
  [ "$rc" -eq 124 ] && echo "ERROR gpu_check: timed out after ${left}s (sections after the last '==' did not run)"
  return "$rc"
}

run "$@" 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
echo "log: $LOG (gitignored), exit $rc"
exit "$rc"
