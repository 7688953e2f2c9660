#!/usr/bin/env bash
# The test command: sets up .venv (once) and runs the whole suite, slow tests included, on FEWBIT_TEST_WORKERS
# pytest-xdist workers (default 2, one per core; each takes whole test files, so a file's shared fixtures are
# built once; 0 runs in this process). `--quick` runs the quick tier instead: the tests not marked slow, without
# the CUDA build check and the wheel smoke test (the edit-test loop). Other arguments go to pytest, e.g.
# `bash scripts/test.sh -k tables -x`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
quick=0
args=()
for a in "$@"; do
  if [ "$a" = "--quick" ]; then quick=1; else args+=("$a"); fi
done
bash "$root/scripts/setup.sh"
cd "$root"
workers="${FEWBIT_TEST_WORKERS:-2}"
parallel=()
[ "$workers" = 0 ] || parallel=(-n "$workers" --dist loadfile)
py="${FEWBIT_VENV:-$root/.venv}/bin/python"
if [ "$quick" = 1 ]; then
  exec "$py" -m pytest -m "not slow" "${parallel[@]}" "${args[@]}"
fi
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
exec "$py" -m pytest -m "slow or not slow" "${parallel[@]}" "${args[@]}"
