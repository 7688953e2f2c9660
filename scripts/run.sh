#!/usr/bin/env bash
# The main job on its embedded default: launch/train.py on configs/roberta-tiny.json under DeepSpeed ZeRO-3,
# one rank per GPU, or 2 ranks on CPU (gloo) when there is no GPU. Extra arguments go to launch/train.py,
# e.g. `bash scripts/run.sh --max-steps 10` or `bash scripts/run.sh --fewbit-config configs/roberta.json`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
venv="${FEWBIT_VENV:-$root/.venv}"
gpus=$("$venv/bin/python" -c 'import torch; print(torch.cuda.device_count())')
if [ "$gpus" -gt 0 ]; then
  nproc=$gpus
else
  nproc=2
  export DS_ACCELERATOR=cpu
fi
exec "$venv/bin/torchrun" --standalone --nproc_per_node "$nproc" launch/train.py \
  --fewbit-config configs/roberta-tiny.json --deepspeed_config configs/ds/zero3.json --metrics-out metrics.json "$@"
