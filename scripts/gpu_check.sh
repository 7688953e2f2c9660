#!/usr/bin/env bash
# GPU check, in under 8 minutes on one GPU:
#   1. build the CUDA ops (the DeepSpeed OpBuilder, or torch.utils.cpp_extension where DeepSpeed is absent),
#   2. run tests/test_cuda.py (the CUDA kernels against the reference, bit for bit),
#   3. measure per-preset peak memory and step time (launch/gpu_check.py): RoBERTa-base fp32, batch 128 x 128
#      (FewBit's table) and SmolLM2-135M-shaped Llama, bf16 autocast, batch 8 x 512;
# and write OUT_DIR/results.json, OUT_DIR/results.md and the build and test logs.
#
#   scripts/gpu_check.sh OUT_DIR            # on a GPU machine (torch with CUDA, transformers; DeepSpeed optional)
#   scripts/gpu_check.sh OUT_DIR --dry-run  # the measuring code path on the CPU, tiny models, no CUDA build
#
# PYTHON picks the interpreter (default: python3). No network access is needed.
set -euo pipefail
if [ $# -lt 1 ] || [ $# -gt 2 ] || { [ $# -eq 2 ] && [ "$2" != "--dry-run" ]; }; then
  echo "usage: $0 OUT_DIR [--dry-run]" >&2
  exit 2
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$1"
py="${PYTHON:-python3}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
log() { printf '[gpu-check] %s\n' "$*" >&2; }

if [ "${2:-}" = "--dry-run" ]; then
  log "dry run on the CPU (nothing CUDA is built)"
  exec "$py" launch/gpu_check.py "$out" --dry-run
fi

"$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
  || { log "no CUDA device visible to torch (use --dry-run for the CPU code path)"; exit 1; }
export FEWBIT_NATIVE=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$("$py" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}"

start=$(date +%s)
log "1/3 building the CUDA ops for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST (log: $out/build.log)"
build_rc=0
timeout 300 "$py" - > "$out/build.log" 2>&1 <<'PY' || build_rc=$?
import time
t = time.time()
from fewbit_dist.ops import native
mod = native.native_module("cuda")
print("cuda:", native.native_state("cuda"), "functions:", sorted(n for n in dir(mod) if not n.startswith("_")))
print(f"build took {time.time() - t:.0f} s")
PY
build_s=$(( $(date +%s) - start ))
log "build rc=$build_rc in ${build_s} s"

test_rc=0
if [ "$build_rc" -eq 0 ]; then
  log "2/3 tests/test_cuda.py (log: $out/test_cuda.log)"
  timeout 150 "$py" -m pytest tests/test_cuda.py -q -p no:cacheprovider > "$out/test_cuda.log" 2>&1 || test_rc=$?
  log "tests rc=$test_rc: $(tail -n 1 "$out/test_cuda.log")"
else
  test_rc=skipped
  log "2/3 skipped: the build failed (see $out/build.log); measuring on the reference kernels"
  export FEWBIT_NATIVE=0
fi

log "3/3 peak memory and step time per preset"
left=$(( 450 - ($(date +%s) - start) ))
budget=$(( left > 160 ? left - 120 : 40 ))
timeout $(( left > 60 ? left : 60 )) "$py" launch/gpu_check.py "$out" --budget-s "$budget" \
  --note "build_rc=$build_rc" --note "build_s=$build_s" --note "test_cuda_rc=$test_rc" \
  --note "test_cuda=$(tail -n 1 "$out/test_cuda.log" 2>/dev/null || echo none)"
log "done in $(( $(date +%s) - start )) s: $out/results.md"
[ "$build_rc" -eq 0 ] && [ "$test_rc" = 0 ]
