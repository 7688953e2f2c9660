#!/usr/bin/env bash
# The main job on its embedded default: today the CPU demo (a small RoBERTa trained before and after
# fewbit_dist.convert, printing saved-activation memory). Extra arguments go to launch/demo.py.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec "${FEWBIT_VENV:-$root/.venv}/bin/python" launch/demo.py "$@"
