#!/usr/bin/env bash
# The GPU check: the configurations the CPU suite cannot run on a GPU (NCCL, CUDA bf16), in one script of a
# few minutes on ONE GPU. Every collective of the trainer runs at world size 1 too, so one GPU exercises
# them all on NCCL's device (a second rank on the same GPU is refused by NCCL).
#
#   bash bench/gpu_check.sh [OUT_DIR]        # default OUT_DIR: runs/gpu_check
#
# Prints one line per check, "PASS <check>: <what it measured>" or "FAIL <check>: <log file>", and exits
# non-zero if any check failed. Each check's full output is in OUT_DIR/<check>.log.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu_check}
mkdir -p "$out"
export MMOLRE_CACHE=${MMOLRE_CACHE:-$out/cache}
failed=0
steps=${GPU_CHECK_STEPS:-300}
common=(--epochs 2 --max_steps "$steps" --log_every 20 --output_dir "$out/runs" --synthetic_scale "${GPU_CHECK_SCALE:-0.25}")

summary() {  # one line from a finished run's results.json
  python - "$1" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1] + "/results.json"))
print(f"{r['global_step']} steps, test MAE {r['test']['sentiment']['mae']:.4f} (mean predictor "
      f"{r['baselines']['mean_mae']:.4f}), {r['train']['samples_per_s']:.0f} samples/s")
EOF
}

check() {  # check NAME COMMAND...: run, then report
  local name=$1; shift
  local log="$out/$name.log"
  local start=$SECONDS
  if "$@" > "$log" 2>&1; then
    echo "PASS $name: $(summary "$out/runs/$name" 2>/dev/null || tail -n 1 "$log") [$((SECONDS - start)) s]"
  else
    echo "FAIL $name: see $log"
    failed=1
  fi
}

train() {  # train NAME DS_CONFIG ARGS...
  local name=$1 config=$2; shift 2
  deepspeed --num_gpus 1 --master_port "${MASTER_PORT:-29500}" launch.py --ds_config "$config" \
    --run_name "$name" "${common[@]}" "$@"
}

python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" \
  || { echo "FAIL setup: no CUDA device"; exit 1; }

check fp32_grouped        train fp32_grouped ds_configs/zero2.json
check bf16_grouped        train bf16_grouped ds_configs/zero2_bf16.json
check bf16_stock_experts  train bf16_stock_experts ds_configs/zero2_bf16.json --grouped_experts false
check bf16_accumulate2    train bf16_accumulate2 ds_configs/zero2_bf16.json --grad_accum 2 --batch_size 16
check bf16_capacity       train bf16_capacity ds_configs/zero2_bf16.json --capacity_factor 1.0
check fp32_zero0_clip     train fp32_zero0_clip ds_configs/zero0.json

export_predict() {
  local run="$out/runs/bf16_grouped"
  python -m mmolre.cli export "$run" "$out/bf16_model" &&
  python -m mmolre.cli predict "$out/bf16_model" "$(python -c "import json; print(json.load(open('$run/data_meta.json'))['sources']['synthetic'])")" \
    --out "$out/bf16_predictions.csv" &&
  python - "$run" "$out/bf16_predictions.csv" <<'EOF'
import csv, sys
trainer = {r["id"]: float(r["sentiment_pred"]) for r in csv.DictReader(open(sys.argv[1] + "/predictions_test.csv"))}
exported = {r["id"]: float(r["sentiment_pred"]) for r in csv.DictReader(open(sys.argv[2]))}
assert trainer.keys() == exported.keys()
worst = max(abs(trainer[k] - exported[k]) for k in trainer)
# the trainer predicted with bf16 weights and activations, the export with the fp32 masters on the CPU
assert worst < 0.1, worst
print(f"{len(exported)} predictions from the fp32 export; largest difference from the bf16 trainer {worst:.4f}")
EOF
}
check export_predict export_predict

check moe_block python bench/moe_block.py --cuda --experts 8,128,512 --json "$out/moe_block_cuda.json"

exit $failed
