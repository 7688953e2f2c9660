#!/usr/bin/env bash
# Compile and link the CUDA extension (csrc/cuda + csrc/include) through fewbit_dist's DeepSpeed OpBuilder,
# on a machine without a GPU, in an environment of its own (a CUDA build of torch is 5+ GB: it stays out of
# .venv). A broken .cu or header fails this script. Needs nvcc (CUDA_HOME, default /usr/local/cuda): without
# it the script fails under CI (CI set, as CI machines have nvcc) and prints SKIPPED elsewhere.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FEWBIT_CUDA_VENV:-$root/.venv-cuda}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
if [ ! -x "$CUDA_HOME/bin/nvcc" ] && ! command -v nvcc >/dev/null 2>&1; then
  case "$(printf '%s' "${CI:-}" | tr '[:upper:]' '[:lower:]')" in
    ""|0|false|no)
      echo "[cuda-build] SKIPPED: no nvcc on this machine (CUDA_HOME=$CUDA_HOME)"
      exit 0 ;;
  esac
  echo "[cuda-build] FAILED: CI is set but there is no nvcc (CUDA_HOME=$CUDA_HOME); CI must build the CUDA kernels" >&2
  exit 1
fi
log() { printf '[cuda-build] %s\n' "$*" >&2; }
stamp="$venv/.fewbit-cuda-setup"
if [ ! -f "$stamp" ]; then
  log "creating $venv (torch 2.14.1 CUDA build, DeepSpeed)"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip --disable-pip-version-check -q install torch==2.14.1 ninja pybind11 numpy setuptools
  "$venv/bin/python" -m pip --disable-pip-version-check -q install --no-build-isolation deepspeed==0.19.8
  touch "$stamp"
fi
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# The CUDA build of torch ships CUDA 13 headers (cccl, ...) that the system toolkit layout lacks.
for inc in "$site"/nvidia/cu13/include "$site"/nvidia/*/include; do
  [ -d "$inc" ] && export CPATH="$inc${CPATH:+:$CPATH}"
done
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export DS_ACCELERATOR=cuda MAX_JOBS="${MAX_JOBS:-2}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
cd "$root"
start=$(date +%s)
PYTHONPATH="$root" "$venv/bin/python" - "$out" <<'PY'
import importlib.util
import sys

from fewbit_dist.ops.builder import build_cuda_extension

path = build_cuda_extension(sys.argv[1])
spec = importlib.util.spec_from_file_location("fewbit_dist_cuda_ops", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)  # links against torch's CUDA libraries; imports without a GPU
assert hasattr(module, "encode_pack") and hasattr(module, "unpack_scale"), dir(module)
print(f"[cuda-build] OK: built, linked and imported {path.name} (TORCH_CUDA_ARCH_LIST={__import__('os').environ['TORCH_CUDA_ARCH_LIST']})")
PY
log "took $(( $(date +%s) - start )) s"
