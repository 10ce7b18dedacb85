# Shared body of slurm/pretrain.sh and slurm/finetune.sh, sourced by them inside the job.
#
# One srun task per GPU runs `$PYTHON -m train --config CONFIG key=value ...`. The trainer takes its
# rank and rendezvous from submitit's TorchDistributedEnvironment (train/core/distributed.py): ranks from
# SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, MASTER_ADDR = first host of the allocation, MASTER_PORT
# seeded by the job id, so every task and the requeued job agree; each rank logs it in rank-N.log.
# Config values never pass through a shell string: the config path and the overrides travel as
# separate, quoted arguments ("$@").
#
# Preemption / time limit: `#SBATCH --signal=USR1@N` (no "B:") signals every task N seconds before
# the limit; the trainer checkpoints at the next step boundary and exits with common.jobs.EXIT_REQUEUE;
# then this script requeues the job, which restarts with run.resume=latest (common.jobs' resume rule).
set -uo pipefail
# The project's python (slurm/shards.sh uses the same rule): $PYTHON if set (sbatch passes the submitting
# shell's environment on), else the venv that `make setup` built in the submit folder, else `python` on PATH.
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python
  [ -x "${SLURM_SUBMIT_DIR:-.}/.venv/bin/python" ] && PYTHON=${SLURM_SUBMIT_DIR:-.}/.venv/bin/python
fi

# run_training DEFAULT_CONFIG [CONFIG] [key=value ...]
run_training() {
  local default_config=$1; shift
  local config=$default_config
  # The first argument is the config file unless it is an override.
  if [ $# -gt 0 ] && [[ $1 != *=* ]]; then config=$1; shift; fi

  local log_dir=${LOG_ROOT:-$SLURM_SUBMIT_DIR/logs}/${SLURM_JOB_NAME:-train}-${SLURM_JOB_ID}
  mkdir -p "$log_dir"
  echo "logs: $log_dir (restart ${SLURM_RESTART_COUNT:-0})"

  # The requeue exit code, the resume rule and the stale launcher variables are defined once, in
  # common/jobs.py. NUL-separated arguments: an override may hold spaces, quotes or newlines.
  # Asked before output moves to batch.log, so a python without the project fails in the job's .out file.
  local exit_requeue="" stale="" args=()
  exit_requeue=$("$PYTHON" -m common.jobs exit-requeue) && stale=$("$PYTHON" -m common.jobs launcher-vars) \
    && mapfile -d '' args < <("$PYTHON" -m common.jobs train-args "${SLURM_RESTART_COUNT:-0}" "$@")
  if [ -z "$exit_requeue" ] || [ "${#args[@]}" -eq 0 ]; then
    local msg="error: PYTHON=$PYTHON cannot run the project (\`$PYTHON -m common.jobs\` failed): submit with"
    msg+=" PYTHON=/path/to/clip-pipeline/.venv/bin/python sbatch ..., or activate the project's venv first"
    echo "$msg" >&2
    echo "$msg" >>"$log_dir/batch.log"
    return 70
  fi
  exec >>"$log_dir/batch.log" 2>&1
  # Ranks and rendezvous come from this job (submitit's SLURM job environment), never from the shell
  # that ran sbatch (it passes its environment on).
  # shellcheck disable=SC2086
  unset $stale
  export SUBMITIT_EXECUTOR=slurm

  echo "$(date -Is) start job=$SLURM_JOB_ID restart=${SLURM_RESTART_COUNT:-0} nodes=$SLURM_JOB_NODELIST" \
       "tasks=${SLURM_NTASKS:-?} config=$config"
  printf '  arg: %q\n' "${args[@]}"

  # --kill-on-bad-exit=0: ranks leave at slightly different moments after a collective save, and an
  # early leaver must not kill a rank that is still writing its checkpoint shard.
  # --wait: but a rank that crashed must not leave the others hanging in a collective for hours.
  local rc=0
  srun --kill-on-bad-exit=0 --wait="${SRUN_WAIT_S:-600}" --open-mode=append \
       --output="$log_dir/rank-%t.log" \
       "$PYTHON" -m train --config "$config" "${args[@]}" || rc=$?
  echo "$(date -Is) srun exit code $rc"

  if [ "$rc" -eq "$exit_requeue" ]; then
    echo "$(date -Is) stopped on a signal (exit $exit_requeue: checkpointed, or still starting up): requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" && return 0
    echo "scontrol requeue failed (job submitted with --no-requeue?)"
  fi
  return "$rc"
}
