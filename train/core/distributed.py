"""torch.distributed helpers: the one place the losses touch collectives, and launcher discovery.

Every collective helper is a no-op in a single process (no process group, or a group of one), so the
losses run unchanged in tests, notebooks and multi-rank jobs.

Gradient convention (what the losses rely on): the collectives below pass gradients back
with SUM semantics, i.e. the backward of a gather or an all-reduce adds up, on each rank,
the gradients that *every* rank's loss sends to this rank's input. With per-rank losses
whose average is the global loss, the gradient a rank sees on its own features is therefore
W x d(global loss)/d(its features), and DDP/DeepSpeed's averaging of parameter gradients over
the W ranks turns that back into exactly d(global loss)/d(parameters). See train/losses/objective.py and
docs/METHODS.md.
"""
from __future__ import annotations

import logging
import os
import socket

import torch
import torch.distributed as dist
# torch's functional collectives carry autograd: all_gather_single's backward is a reduce-scatter SUM,
# all_reduce's backward an all_reduce with the same op (gloo and NCCL alike in torch 2.14).
import torch.distributed._functional_collectives as funcol

from common.errors import ConfigError
from common.net import free_port

log = logging.getLogger(__name__)


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
    gathered = funcol.all_gather_single(padded.contiguous(), 0, dist.group.WORLD)  # (W * max_rows, ...)
    return torch.cat([gathered[r * max_rows:r * max_rows + rows] for r, rows in enumerate(sizes)], dim=0)


def all_reduce_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over ranks; backward sums the incoming gradients over ranks as well."""
    if get_world_size() == 1:
        return x
    return funcol.all_reduce(x.contiguous(), "sum", dist.group.WORLD)


# --- Launcher discovery ------------------------------------------------------------------------
# DeepSpeed reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (without LOCAL_RANK it tries MPI
# discovery); submitit derives them for its own jobs, slurm/*.sh and a bare srun step.



def discover_launcher_env() -> dict[str, str]:
    """Fill RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT in ``os.environ`` and return them.

    Values are strings. Whichever launcher started this process decides, in this order:

    1. torchrun or the ``deepspeed`` launcher: RANK and WORLD_SIZE are already set and kept as they are.
    2. A submitit job environment: submitit's own jobs and slurm/*.sh (``SUBMITIT_EXECUTOR`` = slurm or
       local), or a bare ``srun`` step (SLURM_STEP_ID set). ``submitit.helpers.TorchDistributedEnvironment``
       gives the ranks (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, or the local executor's), MASTER_ADDR =
       the first host of SLURM_JOB_NODELIST and MASTER_PORT drawn from a generator seeded with the job id,
       so every task of a job, and the job again after a requeue, agree without talking. A MASTER_ADDR or
       MASTER_PORT already in the environment wins.
    3. Otherwise one process: rank 0 of 1 on 127.0.0.1.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        env.setdefault("LOCAL_RANK", "0")
    elif env.get("SUBMITIT_EXECUTOR") or env.get("SLURM_STEP_ID"):
        from submitit.helpers import TorchDistributedEnvironment

        # A bare srun step is a SLURM job environment too; submitit recognises it by this variable.
        env.setdefault("SUBMITIT_EXECUTOR", "slurm")
        found = TorchDistributedEnvironment()
        found.master_addr = env.get("MASTER_ADDR", found.master_addr)
        found.export(set_cuda_visible_devices=False, overwrite=True)  # each rank picks its GPU by LOCAL_RANK
    else:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:    # a group of one needs no agreed port, and a fixed one (torchrun's 29500)
        env["MASTER_PORT"] = str(free_port())    # collides with any other single-process run on the host
    return {key: env[key] for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


RENDEZVOUS_TIMEOUT_ENV = "RENDEZVOUS_TIMEOUT_S"
DEFAULT_RENDEZVOUS_TIMEOUT_S = 180  # long enough for a slow node's start-up; not torch's 30 min of silence
COLLECTIVE_TIMEOUT_S = 1800  # each collective after the rendezvous: torch's default, as before


def rendezvous_timeout_s() -> int:
    """Seconds the rendezvous waits for every rank (env RENDEZVOUS_TIMEOUT_S, default 180). Raises ConfigError
    for a value that is not a positive integer."""
    raw = os.environ.get(RENDEZVOUS_TIMEOUT_ENV, "")
    if not raw:
        return DEFAULT_RENDEZVOUS_TIMEOUT_S
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"{RENDEZVOUS_TIMEOUT_ENV}={raw!r}: must be a whole number of seconds >= 1")
    return int(raw)


def _rendezvous_error(err: BaseException, found: dict, timeout_s: int) -> ConfigError:
    """The one line for a rendezvous that failed: which rank, which world size, which address, and why."""
    where = f"rank {found['RANK']} of {found['WORLD_SIZE']} at {found['MASTER_ADDR']}:{found['MASTER_PORT']}"
    text = " ".join(str(err).split()).lower()
    if "address already in use" in text or "eaddrinuse" in text:
        why = "MASTER_PORT is already in use on this host: pick a free MASTER_PORT (or unset it)"
    elif "timed out" in text or "timeout" in text or isinstance(err, TimeoutError):
        why = (f"not every rank arrived within {timeout_s} s ({RENDEZVOUS_TIMEOUT_ENV}): start all "
               f"{found['WORLD_SIZE']} ranks, or unset a stale WORLD_SIZE/RANK left in the environment")
    elif "name or service not known" in text or "resolve" in text or "gaierror" in text or "nodename" in text:
        why = "MASTER_ADDR does not resolve to an address of this network"
    else:
        why = " ".join(str(err).split())[:300]
    return ConfigError(f"rendezvous failed for {where}: {why}")


def init_distributed_from_env(timeout_s: int | None = None, device: str = "auto") -> tuple[int, int, int]:
    """Discover the launcher, then ``deepspeed.init_distributed`` (gloo on CPU, NCCL on GPU).

    On a GPU (``device`` 'auto' or 'cuda') the process selects cuda:LOCAL_RANK first, so NCCL's
    communicator and every collective tensor of this rank live on its own GPU. Returns (rank, world_size,
    local_rank). The rendezvous waits at most ``timeout_s`` (default ``rendezvous_timeout_s()``) and says,
    in one log line, whom it waits for; a busy MASTER_PORT, a missing peer (e.g. a stale WORLD_SIZE) or an
    unresolvable MASTER_ADDR raise ConfigError (one line) instead of a traceback or a silent hang.
    """
    from datetime import timedelta

    import deepspeed

    timeout_s = rendezvous_timeout_s() if timeout_s is None else timeout_s
    found = discover_launcher_env()
    log.info("rank %s of %s (local rank %s), rendezvous %s:%s", found["RANK"], found["WORLD_SIZE"],
             found["LOCAL_RANK"], found["MASTER_ADDR"], found["MASTER_PORT"])
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(int(found["LOCAL_RANK"]))
    if not dist.is_initialized():
        if found["WORLD_SIZE"] != "1":
            log.info("rank %s waits up to %d s (%s) for all %s ranks at %s:%s", found["RANK"], timeout_s,
                     RENDEZVOUS_TIMEOUT_ENV, found["WORLD_SIZE"], found["MASTER_ADDR"], found["MASTER_PORT"])
        try:
            # Resolve first: torch retries an unknown host until the timeout, then throws from C++.
            socket.getaddrinfo(found["MASTER_ADDR"], int(found["MASTER_PORT"]))
            deepspeed.init_distributed(dist_init_required=True, timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, OSError, ValueError) as err:   # DistNetworkError/DistStoreError are RuntimeErrors
            error = _rendezvous_error(err, found, timeout_s)
            if found["RANK"] != "0":   # the entry point prints rank 0's line only; each rank fails on its own
                log.error("%s", error)
            raise error from err
        set_timeout = getattr(dist, "set_timeout", None) or dist.distributed_c10d._set_pg_timeout
        # The rendezvous bound must not bound collectives too: a rank waits at a barrier while rank 0 writes a
        # large checkpoint, and NCCL's watchdog would abort the job after the rendezvous timeout.
        set_timeout(timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    return int(found["RANK"]), int(found["WORLD_SIZE"]), int(found["LOCAL_RANK"])
