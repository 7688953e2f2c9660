#!/usr/bin/env bash
# The test command: sets up .venv (once) and runs the whole suite, slow tests included.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k tables -x`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec "${FEWBIT_VENV:-$root/.venv}/bin/python" -m pytest -m "slow or not slow" "$@"
