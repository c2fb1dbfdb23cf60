# Sourced by every sbatch script here. Launches one task per GPU (or CPU process) with srun; launch.py
# reads its rank from SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS, so no ssh, pdsh or hostfile is needed.
# We chose srun over the DeepSpeed launcher's --no_ssh mode because Slurm then owns every rank: it
# delivers signals to each of them, kills them all if one fails (--kill-on-bad-exit), and accounts for them.
#
# Preemption and time limits: the scripts ask for `--signal=B:USR1@<seconds>` and `--requeue`. The batch
# shell forwards USR1 to the ranks, every rank checkpoints at the next step and exits 0, and the shell
# requeues the job; the requeued job finds the checkpoint and continues with --resume (same run directory,
# global step continuing). `scancel --signal=USR1 <job>` (signal to the ranks directly) works too: a run
# that exits 0 without results.json was stopped early, and the script requeues it.
#
# Variables: DS_CONFIG (default ds_configs/zero2.json), OUTPUT_DIR (default runs; on a file system every
# node sees), RUN_NAME (default job<id>), DS_ACCELERATOR=cpu for CPU nodes, MASTER_PORT.

cd "${SLURM_SUBMIT_DIR:-.}"
# Ranks come from srun's SLURM_* variables in each task; stale values from the submitting shell must not win.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_SIZE
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
OUTPUT_DIR=${OUTPUT_DIR:-runs}

run_training() {  # run_training RUN_NAME [launch.py arguments...]
  local name=$1; shift
  local resume=()
  if compgen -G "$OUTPUT_DIR/$name/checkpoints/step*/mmolre_complete.json" >/dev/null; then
    resume=(--resume)
    echo "mmolre: restart ${SLURM_RESTART_COUNT:-0} of job $SLURM_JOB_ID, resuming $OUTPUT_DIR/$name"
  fi
  srun --kill-on-bad-exit=1 python -u launch.py --ds_config "${DS_CONFIG:-ds_configs/zero2.json}" \
    --output_dir "$OUTPUT_DIR" --run_name "$name" "${resume[@]}" "$@" &
  SRUN_PID=$!
  trap 'forward_and_requeue' USR1
  wait "$SRUN_PID"
  local code=$?
  if [ "$code" -eq 0 ] && [ ! -f "$OUTPUT_DIR/$name/results.json" ]; then
    echo "mmolre: stopped early with a checkpoint; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  return "$code"
}

forward_and_requeue() {
  echo "mmolre: USR1 received; asking every rank to checkpoint"
  kill -USR1 "$SRUN_PID" 2>/dev/null
  wait "$SRUN_PID"
  local code=$?
  if [ "$code" -eq 0 ]; then
    echo "mmolre: checkpoint written; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  exit "$code"
}
