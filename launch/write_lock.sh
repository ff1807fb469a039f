#!/usr/bin/env bash
# Write launch/constraints.txt (the lock `make setup` installs from) from the packages of a venv that passed the
# suite: `make upgrade-check` (scratch venv, newest allowed versions) then `make lock`. torch and triton stay in
# launch/constraints-cpu.txt (CPU) or are the user's own (CUDA); the project itself is not locked.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-upgrade}"
OUT="${OUT:-launch/constraints.txt}"
[ -x "$VENV/bin/python" ] || { echo "error: no venv at $VENV (run 'make upgrade-check' first)" >&2; exit 2; }
py="$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
{
  echo "# The lock: every package of the test venv, as last run green (written by launch/write_lock.sh)."
  echo "# Move it forward with 'make upgrade-check' then 'make lock' (docs/hf_interop.md, 'Pinned versions')."
  echo "# python: $py"
  "$VENV/bin/pip" freeze --exclude-editable --all | grep -viE '^(torch|triton|pip|setuptools|wheel|attnres-train)(==| @)' \
    | sed 's/+cpu$//'
} > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo "wrote $OUT ($(grep -vc '^#' "$OUT") packages, python $py)"
