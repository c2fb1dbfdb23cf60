#!/usr/bin/env bash
# Start training on this machine with the right number of processes, then forward every argument.
#
#   ./launch.sh                          # all GPUs, or 2 CPU processes when there is no GPU
#   NPROC=4 ./launch.sh --num_experts 64 # choose the process count yourself
#   DS_CONFIG=ds_configs/zero1.json ./launch.sh --epochs 3
#
# Variables:
#   NPROC      processes to start (default: number of GPUs; without GPUs, min(2, CPU cores))
#   DS_CONFIG  DeepSpeed config used when the arguments carry no --ds_config (default ds_configs/zero2.json)
#   MASTER_PORT  rendezvous port (default 29500)
# On CPU it sets DS_ACCELERATOR=cpu and one OpenMP thread share per process.
set -euo pipefail
cd "$(dirname "$0")"

gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi

if [ "$gpus" -gt 0 ]; then
  nproc=${NPROC:-$gpus}
else
  export DS_ACCELERATOR=cpu
  cores=$(nproc)
  nproc=${NPROC:-$(( cores < 2 ? 1 : 2 ))}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / nproc > 0 ? cores / nproc : 1 ))}
fi

args=("$@")
case " $* " in
  *" --ds_config"*) ;;
  *) args=(--ds_config "${DS_CONFIG:-ds_configs/zero2.json}" "${args[@]}") ;;
esac

echo "launch.sh: $nproc process(es) on $([ "$gpus" -gt 0 ] && echo "$gpus GPU(s)" || echo "CPU")" >&2
exec deepspeed --num_gpus "$nproc" --master_port "${MASTER_PORT:-29500}" launch.py "${args[@]}"
