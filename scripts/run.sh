#!/usr/bin/env bash
# The main job: launch/train.py under DeepSpeed ZeRO-3 with the best measured preset (max-saving), one rank per
# GPU, or 2 ranks on CPU (gloo) when there is no GPU. By default the embedded task (configs/roberta-tiny.json);
# extra arguments go to launch/train.py and win over these, e.g.
#   bash scripts/run.sh --max-steps 10
#   FEWBIT_REAL=1 bash scripts/run.sh --fewbit-config configs/smollm2.json --max-steps 50   # SmolLM2 on Shakespeare
#   bash scripts/run.sh --fewbit-config configs/roberta.json --fewbit fewbit-paper          # FewBit's own setting
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
  # glibc keeps freed blocks below its dynamic mmap threshold (up to 32 MiB each) in the heap: the ranks' peak
  # RSS would count memory that no tensor holds. A fixed 64 KiB threshold hands freed tensors back at once.
  export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-65536}"
fi
exec "$venv/bin/torchrun" --standalone --nproc_per_node "$nproc" launch/train.py \
  --fewbit-config configs/roberta-tiny.json --fewbit max-saving --deepspeed_config configs/ds/zero3.json \
  --metrics-out metrics.json "$@"
