"""torch.distributed helpers: the one place the losses touch collectives.

Every helper is a no-op in a single process (no process group, or a group of one), so the
losses run unchanged in tests, notebooks and multi-rank jobs.

Gradient convention (what the losses rely on): the collectives below pass gradients back
with SUM semantics, i.e. the backward of a gather or an all-reduce adds up, on each rank,
the gradients that *every* rank's loss sends to this rank's input. With per-rank losses
whose average is the global loss, the gradient a rank sees on its own features is therefore
W x d(global loss)/d(its features), and DDP/DeepSpeed's averaging of parameter gradients over
the W ranks turns that back into exactly d(global loss)/d(parameters). See train/losses.py.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn


def is_distributed() -> bool:
    """True when a process group is initialised (even one of size 1)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_gather_sizes(local_size: int, device: torch.device | str = "cpu") -> list[int]:
    """Every rank's `local_size`, in rank order (one tiny all-gather)."""
    if get_world_size() == 1:
        return [int(local_size)]
    # NCCL only moves CUDA tensors; gloo only CPU ones: follow the feature tensor's device.
    size = torch.tensor([local_size], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def all_gather_with_grad(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate every rank's `x` along dim 0, passing gradients back to each rank.

    Ranks may hold different numbers of rows (the last batch of an epoch, uneven shards):
    rows are padded to the largest count for the collective and trimmed afterwards.
    `sizes` (every rank's row count, from `all_gather_sizes`) saves the size exchange when the
    caller already has it. Backward: each rank's input receives the SUM over ranks of the
    gradients flowing into its slice (see the module docstring).
    """
    if get_world_size() == 1:
        return x
    if sizes is None:
        sizes = all_gather_sizes(x.shape[0], x.device)
    max_rows = max(sizes)
    padded = x
    if x.shape[0] < max_rows:
        padding = x.new_zeros((max_rows - x.shape[0], *x.shape[1:]))
        padded = torch.cat([x, padding], dim=0)
    with warnings.catch_warnings():
        # torch marks these autograd collectives deprecated in favour of the private
        # _functional_collectives; they remain the public API with a documented backward.
        warnings.simplefilter("ignore", FutureWarning)
        gathered = dist_nn.all_gather(padded)
    return torch.cat([part[:rows] for part, rows in zip(gathered, sizes)], dim=0)


def all_reduce_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over ranks; backward sums the incoming gradients over ranks as well."""
    if get_world_size() == 1:
        return x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # see all_gather_with_grad
        return dist_nn.all_reduce(x, op=dist.ReduceOp.SUM)


# --- Launcher discovery (owned by the trainer) ------------------------------------------------
# DeepSpeed reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; without LOCAL_RANK it falls
# back to MPI discovery. These functions fill them in from whichever launcher started us.
import os as _os
import subprocess as _subprocess

DEFAULT_MASTER_PORT = 29500


def _first_slurm_host(nodelist: str) -> str:
    """First hostname of a compressed SLURM node list ("n[1-4]" -> "n1"), via `scontrol show hostnames`."""
    try:
        out = _subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                              check=True, timeout=30).stdout
        return out.split()[0]
    except (OSError, _subprocess.SubprocessError, IndexError):
        # No scontrol on this host (e.g. a container): a plain name or "prefix[a-b,...]" is still readable.
        head = nodelist.split(",")[0]
        if "[" in head:
            prefix, ranges = head.split("[", 1)
            return prefix + ranges.rstrip("]").split(",")[0].split("-")[0]
        return head


def slurm_master_port(job_id: str) -> int:
    """A port derived from the job id, so concurrent jobs sharing a node do not collide."""
    return 20000 + int(job_id) % 20000 if str(job_id).isdigit() else DEFAULT_MASTER_PORT


def discover_launcher_env(environ: dict | None = None) -> dict:
    """Set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT in ``environ`` and return them.

    Order: torchrun / deepspeed launcher (RANK + WORLD_SIZE present); SLURM (srun or submitit,
    SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID); submitit's local executor (submitit.JobEnvironment);
    else one process, rank 0 of 1. Values already set in the environment win.
    """
    env = _os.environ if environ is None else environ
    found = {}
    if "RANK" in env and "WORLD_SIZE" in env:
        found = {"RANK": env["RANK"], "WORLD_SIZE": env["WORLD_SIZE"], "LOCAL_RANK": env.get("LOCAL_RANK", "0")}
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        found = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"],
                 "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
                 "MASTER_ADDR": env.get("MASTER_ADDR") or _first_slurm_host(nodelist),
                 "MASTER_PORT": env.get("MASTER_PORT") or str(slurm_master_port(env.get("SLURM_JOB_ID", "")))}
    else:
        job_env = _submitit_local_env()
        if job_env is not None:
            found = job_env
    found.setdefault("RANK", "0")
    found.setdefault("WORLD_SIZE", "1")
    found.setdefault("LOCAL_RANK", "0")
    found.setdefault("MASTER_ADDR", env.get("MASTER_ADDR", "127.0.0.1"))
    found.setdefault("MASTER_PORT", env.get("MASTER_PORT", str(DEFAULT_MASTER_PORT)))
    for key, value in found.items():
        env[key] = str(value)
    return {k: str(v) for k, v in found.items()}


def _submitit_local_env() -> dict | None:
    """Rank info from submitit's local executor (it sets SUBMITIT_* variables, not SLURM_*)."""
    if not any(k.startswith("SUBMITIT_") for k in _os.environ):
        return None
    try:
        import submitit

        job = submitit.JobEnvironment()
        return {"RANK": job.global_rank, "WORLD_SIZE": job.num_tasks, "LOCAL_RANK": job.local_rank,
                "MASTER_ADDR": _os.environ.get("MASTER_ADDR", "127.0.0.1"),
                "MASTER_PORT": _os.environ.get("MASTER_PORT", str(slurm_master_port(str(job.job_id).split("_")[0])))}
    except Exception:  # not actually inside a submitit job
        return None


def init_distributed_from_env(timeout_s: int = 1800, device: str = "auto") -> tuple[int, int, int]:
    """Discover the launcher, then ``deepspeed.init_distributed`` (gloo on CPU, NCCL on GPU).

    On a GPU (``device`` 'auto' or 'cuda') the process selects cuda:LOCAL_RANK first, so NCCL's
    communicator and every collective tensor of this rank live on its own GPU. Returns (rank, world_size,
    local_rank).
    """
    from datetime import timedelta

    import deepspeed

    found = discover_launcher_env()
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(int(found["LOCAL_RANK"]))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_init_required=True, timeout=timedelta(seconds=timeout_s))
    return int(found["RANK"]), int(found["WORLD_SIZE"]), int(found["LOCAL_RANK"])
