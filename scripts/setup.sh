#!/usr/bin/env bash
# Creates .venv beside the repository root (once) and installs the project with its pinned stack.
# Safe to run again: it only installs what is missing. FEWBIT_VENV overrides the location.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FEWBIT_VENV:-$root/.venv}"
stamp="$venv/.fewbit-setup-$(cat "$root/requirements.txt" "$root/setup.py" | sha1sum | cut -c1-12)"
if [ -f "$stamp" ]; then exit 0; fi

log() { printf '[setup] %s\n' "$*" >&2; }

if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv"
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
pip() { "$py" -m pip --disable-pip-version-check -q "$@"; }

# torch first, from the pinned CPU build, so that no later requirement resolves to another build.
pip install "$(grep -E '^torch==' "$root/requirements.txt")"
pip install -r "$root/requirements.txt"
pip install --no-build-isolation "deepspeed==0.19.8"

# MPI for the mpirun entry point: Debian's Open MPI where it is missing and we may install it.
if ! command -v mpicc >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing Open MPI from Debian"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null) \
      || log "could not install Open MPI; mpirun support stays unavailable"
  else
    log "mpicc not found and cannot install it; mpirun support stays unavailable"
  fi
fi
if command -v mpicc >/dev/null 2>&1; then
  pip install mpi4py || log "mpi4py failed to build; mpirun support stays unavailable"
fi

pip install --no-build-isolation --no-deps -e "$root"
rm -f "$venv"/.fewbit-setup-*
touch "$stamp"
log "done: $("$py" -c 'import torch, fewbit_dist; print("torch", torch.__version__, "fewbit_dist", fewbit_dist.__version__)')"
