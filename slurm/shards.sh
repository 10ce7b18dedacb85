#!/bin/bash
# Ingestion on SLURM: one array task per input part (input + download + filter + dedup scatter),
# then one dependent job for the global stages (dedup, reshard, manifest).
#   sbatch [--cpus-per-task=32 --partition=cpu] slurm/shards.sh --urls PARTS_DIR --out OUT \
#          [--config configs/shards_web.yaml] [key=value ...]
# This first job only registers the parts and submits the two others (with its own partition,
# CPUs and time limit), so it needs one CPU for a few seconds. SHARDS_WAIT=1 makes it wait for
# the global job (useful in scripts). Every job is idempotent: resubmitting after a crash or a
# timeout redoes only unfinished work.
#SBATCH --job-name=clip-shards
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
if [ -n "${SLURM_JOB_ID:-}" ]; then
  # sbatch runs a spooled copy of this file; the job record still names the original path.
  script=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n1)
else
  echo "submit with: sbatch $0 --urls ... --out ... [key=value ...]" >&2; exit 64
fi
cd "${SLURM_SUBMIT_DIR:-.}"
# The project's python, the same rule as slurm/_common.sh: $PYTHON, else the submit folder's venv, else python.
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python
  [ -x .venv/bin/python ] && PYTHON=$PWD/.venv/bin/python
fi
if ! "$PYTHON" -c "import pipeline" 2>/dev/null; then
  echo "error: PYTHON=$PYTHON cannot import the project's pipeline package: submit with" \
       "PYTHON=/path/to/clip-pipeline/.venv/bin/python sbatch ..., or activate the project's venv first" >&2
  exit 70
fi
export NO_ALBUMENTATIONS_UPDATE=1   # albumentations (via img2dataset) phones PyPI at import otherwise
log_dir=${LOG_ROOT:-$PWD/logs}/${SLURM_JOB_NAME:-clip-shards}-${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}
mkdir -p "$log_dir"

case "${SHARDS_MODE:-submit}" in
  submit)
    n_parts=$("$PYTHON" -m pipeline parts "$@" | tail -n1)
    echo "$(date -Is) $n_parts input parts; logs in $log_dir"
    # Same resources as this job, unless the sbatch environment says otherwise.
    common=(--parsable --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --time="${SHARDS_TIME:-24:00:00}")
    [ -n "${SLURM_JOB_PARTITION:-}" ] && common+=(--partition="$SLURM_JOB_PARTITION")
    array_id=$(SHARDS_MODE=part LOG_ROOT=${LOG_ROOT:-$PWD/logs} sbatch "${common[@]}" --export=ALL \
      --array="0-$((n_parts - 1))%${SHARDS_MAX_PARALLEL:-64}" --job-name=clip-shards-part \
      --output="$log_dir/part-%a.log" "$script" "$@")
    global_id=$(SHARDS_MODE=global LOG_ROOT=${LOG_ROOT:-$PWD/logs} sbatch "${common[@]}" --export=ALL \
      --dependency="afterok:$array_id" --job-name=clip-shards-global --output="$log_dir/global.log" \
      "$script" "$@")
    echo "array job $array_id ($n_parts tasks) -> global job $global_id"
    if [ "${SHARDS_WAIT:-0}" = 1 ]; then
      while squeue -h -j "$global_id" 2>/dev/null | grep -q .; do sleep 2; done
      out_dir=$(printf '%s\n' "$@" | sed -n '/^--out$/{n;p}' | head -n1)
      [ -f "$out_dir/manifest.json" ] || { echo "global job $global_id did not finish the dataset"; exit 1; }
      echo "$(date -Is) done: $out_dir"
    fi
    ;;
  part)
    echo "$(date -Is) part $SLURM_ARRAY_TASK_ID on $(hostname)"
    exec "$PYTHON" -m pipeline part --index "$SLURM_ARRAY_TASK_ID" "$@" "num_workers=${SLURM_CPUS_PER_TASK:-1}"
    ;;
  global)
    echo "$(date -Is) global stages on $(hostname)"
    exec "$PYTHON" -m pipeline global "$@" "num_workers=${SLURM_CPUS_PER_TASK:-1}"
    ;;
esac
