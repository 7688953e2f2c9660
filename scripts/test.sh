#!/usr/bin/env bash
# The test command: sets up .venv (once) and runs the whole suite, slow tests included.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k tables -x`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
# CI (CI=true) also compiles and links the CUDA kernels in an environment of their own (a 5+ GB CUDA build of
# torch, so not by default on a developer's machine: FEWBIT_CHECK_CUDA=1 asks for it, 0 skips it).
if [ "${FEWBIT_CHECK_CUDA:-${CI:+1}}" = "1" ]; then
  bash "$root/scripts/check_cuda_build.sh"
fi
# CI also builds the wheel, installs it outside the source tree and runs the smoke test from an empty folder
# (FEWBIT_CHECK_WHEEL=1 asks for it elsewhere, 0 skips it); tests/test_packaging.py then need not repeat it.
if [ "${FEWBIT_CHECK_WHEEL:-${CI:+1}}" = "1" ]; then
  bash "$root/scripts/wheel_smoke.sh"
  export FEWBIT_WHEEL_SMOKE_PASSED=1
fi
exec "${FEWBIT_VENV:-$root/.venv}/bin/python" -m pytest -m "slow or not slow" "$@"
