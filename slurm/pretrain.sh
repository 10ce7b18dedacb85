#!/bin/bash
# Contrastive pretraining (CyCLIP by default) on SLURM: one task per GPU.
#   sbatch [--nodes=16 --time=...] slurm/pretrain.sh [CONFIG] [key=value ...]
# Every #SBATCH default below can be overridden on the sbatch command line. On the time-limit warning
# the trainer checkpoints and this job requeues itself; the requeued job resumes from `latest`.
#SBATCH --job-name=clip-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
# sbatch runs a spooled copy of this file; the job record names the original, next to _common.sh.
: "${SLURM_JOB_ID:?not inside a SLURM job: submit with sbatch $0 [CONFIG] [key=value ...]}"
source "$(dirname "$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')")/_common.sh" || exit 70
run_training configs/pretrain_cyclip.yaml "$@"
