#!/usr/bin/env bash
# Create a venv and install attnres-train with its dependencies in one step, reproducibly.
#  * Versions come from launch/constraints.txt (the lock: every package the suite was last run against, made by
#    `make lock`), so a new upstream release cannot change what `make setup` installs. LOCK=none installs the
#    newest versions pyproject.toml allows instead (what `make upgrade-check` does in a scratch venv).
#  * No NVIDIA GPU: install the CPU build of torch (local wheel if pip finds one, else PyTorch's CPU index)
#    and pin it with launch/constraints-cpu.txt so nothing pulls a CUDA build.
#  * NVIDIA GPU: the venv sees the system site-packages, so the user's CUDA torch is used as is.
#  * The other transformers releases of launch/transformers-tested.txt go to $VENV/transformers-alt/<version>
#    (--no-deps, pure Python) for tests/interop/test_hf_versions.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
EXTRAS="${EXTRAS:-dev,megatron}"
LOCK="${LOCK:-launch/constraints.txt}"
TORCH_VERSION="$(sed -n 's/^torch==//p' launch/constraints-cpu.txt)"

LOCK_ARGS=()
if [ "$LOCK" != none ]; then
  lock_py="$(sed -n 's/^# python: //p' "$LOCK")"
  here_py="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
  if [ "$lock_py" = "$here_py" ]; then
    LOCK_ARGS=(-c "$LOCK")
  else
    echo "[setup] WARNING: $LOCK was made on Python $lock_py, this is Python $here_py: installing the newest" \
         "versions pyproject.toml allows (not the tested lock)" >&2
  fi
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[setup] NVIDIA GPU found: using the system's CUDA torch (install one first if missing)"
  [ -d "$VENV" ] || "$PY" -m venv --system-site-packages "$VENV"
  "$VENV/bin/pip" install -q -e ".[${EXTRAS},gpu]" "${LOCK_ARGS[@]}"
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
  "$VENV/bin/pip" install -q -e ".[${EXTRAS}]" -c launch/constraints-cpu.txt "${LOCK_ARGS[@]}"
fi

installed_tf="$("$VENV/bin/python" -c 'import transformers; print(transformers.__version__)')"
grep -v '^#' launch/transformers-tested.txt | while read -r v; do
  [ -n "$v" ] && [ "$v" != "$installed_tf" ] || continue
  alt="$VENV/transformers-alt/$v"
  [ -f "$alt/transformers/__init__.py" ] || "$VENV/bin/pip" install -q --no-deps --target "$alt" "transformers==$v"
done
# The tensorboard extra is not installed (grpcio, tensorboard-data-server); its event-file writer and reader are
# pure Python, so tests/train/test_tensorboard.py runs the sink with these two wheels put on its child's path.
tb="$VENV/tensorboard-alt"
[ -f "$tb/tensorboard/__init__.py" ] || "$VENV/bin/pip" install -q --no-deps --target "$tb" tensorboard==2.21.0 absl-py==2.5.1
"$VENV/bin/python" -c "import torch, transformers, attnres_train; print('[setup] ok: torch', torch.__version__, '| transformers', transformers.__version__)"
