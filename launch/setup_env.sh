#!/usr/bin/env bash
# Create .venv and install attnres-train with its dependencies in one step.
#  * No NVIDIA GPU: install the CPU build of torch (local wheel if pip finds one, else PyTorch's CPU index)
#    and pin it with launch/constraints-cpu.txt so nothing pulls a CUDA build.
#  * NVIDIA GPU: the venv sees the system site-packages, so the user's CUDA torch is used as is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
EXTRAS="${EXTRAS:-dev,megatron}"
TORCH_VERSION="$(sed -n 's/^torch==//p' launch/constraints-cpu.txt)"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[setup] NVIDIA GPU found: using the system's CUDA torch (install one first if missing)"
  [ -d "$VENV" ] || "$PY" -m venv --system-site-packages "$VENV"
  "$VENV/bin/pip" install -q -e ".[${EXTRAS},gpu]"
else
  echo "[setup] no NVIDIA GPU: installing the CPU build torch==${TORCH_VERSION}"
  [ -d "$VENV" ] || "$PY" -m venv "$VENV"
  if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '${TORCH_VERSION}' else 1)" 2>/dev/null; then
    # The explicit +cpu local version can only resolve to a CPU wheel (a local wheel directory, a configured
    # mirror, or PyTorch's CPU index as the fallback); a bare torch==X on PyPI would be the CUDA build.
    "$VENV/bin/pip" install -q "torch==${TORCH_VERSION}+cpu" \
      || "$VENV/bin/pip" install -q --timeout 20 --retries 1 "torch==${TORCH_VERSION}+cpu" \
           --extra-index-url https://download.pytorch.org/whl/cpu
  fi
  "$VENV/bin/pip" install -q -e ".[${EXTRAS}]" -c launch/constraints-cpu.txt
fi
"$VENV/bin/python" -c "import torch, attnres_train; print('[setup] ok: torch', torch.__version__)"
