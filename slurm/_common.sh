# Shared body of slurm/pretrain.sh and slurm/finetune.sh (sourced, not run).
#
# One srun task per GPU runs `python -m train --config CONFIG key=value ...`; the trainer finds its
# rank from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and the rendezvous from MASTER_ADDR/MASTER_PORT,
# computed here once for all tasks. Config values never pass through a shell string: the config
# path and the overrides travel as separate, quoted arguments ("$@").
#
# Preemption / time limit: `#SBATCH --signal=USR1@N` (no "B:") signals every task N seconds before
# the limit; the trainer checkpoints at the next step boundary and exits with EXIT_REQUEUE (3);
# then this script requeues the job, which restarts with run.resume=latest.

EXIT_REQUEUE=3  # train.trainer.EXIT_REQUEUE

# run_training DEFAULT_CONFIG [CONFIG] [key=value ...]
run_training() {
  local default_config=$1; shift
  local config=$default_config
  # The first argument is the config file unless it is an override.
  if [ $# -gt 0 ] && [[ $1 != *=* ]]; then config=$1; shift; fi
  if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "not inside a SLURM job: submit with sbatch $0 [CONFIG] [key=value ...]" >&2; return 64
  fi

  local log_dir=${LOG_ROOT:-$SLURM_SUBMIT_DIR/logs}/${SLURM_JOB_NAME:-train}-${SLURM_JOB_ID}
  mkdir -p "$log_dir"
  echo "logs: $log_dir (restart ${SLURM_RESTART_COUNT:-0})"
  exec >>"$log_dir/batch.log" 2>&1

  # Rendezvous: rank 0 runs on the first node of the allocation; the port is derived from the job id
  # (same formula as train.distributed.slurm_master_port) so that jobs sharing a node do not collide
  # and a requeued job finds the same address.
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
  MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
  export MASTER_ADDR MASTER_PORT

  # First start: the user's overrides win (they may name a checkpoint to start from). After a
  # requeue the job must continue its own run, so resume=latest comes last.
  local args
  if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then
    args=("$@" run.resume=latest)
  else
    args=(run.resume=latest "$@")
  fi

  echo "$(date -Is) start job=$SLURM_JOB_ID restart=${SLURM_RESTART_COUNT:-0} nodes=$SLURM_JOB_NODELIST" \
       "tasks=${SLURM_NTASKS:-?} master=$MASTER_ADDR:$MASTER_PORT config=$config"
  printf '  arg: %q\n' "${args[@]}"

  # --kill-on-bad-exit=0: ranks leave at slightly different moments after a collective save, and an
  # early leaver must not kill a rank that is still writing its checkpoint shard.
  # --wait: but a rank that crashed must not leave the others hanging in a collective for hours.
  local rc=0
  srun --kill-on-bad-exit=0 --wait="${SRUN_WAIT_S:-600}" --open-mode=append \
       --output="$log_dir/rank-%t.log" \
       "${PYTHON:-python}" -m train --config "$config" "${args[@]}" || rc=$?
  echo "$(date -Is) srun exit code $rc"

  if [ "$rc" -eq "$EXIT_REQUEUE" ]; then
    echo "$(date -Is) checkpointed on signal: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" && return 0
    echo "scontrol requeue failed (job submitted with --no-requeue?)"
  fi
  return "$rc"
}
