"""Submit training runs with submitit, to SLURM or to this machine, preemption-safe.

    from train.launch.executor import submit, sweep
    job = submit("configs/pretrain_cyclip.yaml", ["run.run_dir=runs/cyclip"], nodes=2, gpus_per_node=8,
                 partition="gpu", time=24 * 60)
    summary = job.results()[0]                               # rank 0's train.core.trainer.main(...) return
    jobs = sweep("configs/pretrain_cyclip.yaml", {"loss.cyclip_in_modal": [0, 0.25], "run.seed": [0, 1]},
                 nodes=1, gpus_per_node=8, time=600)      # one SLURM job array, one run folder per point

    python -m train.launch --config configs/pretrain_cyclip.yaml --nodes 2 --gpus-per-node 8 \
        --sweep loss.cyclip_in_modal=0,0.25 run.run_dir=runs/cyclip

How a preemption or time limit is survived: SLURM sends SIGUSR1 to every task ``signal_delay_s``
before the limit (or the cluster preempts with SIGTERM); the trainer checkpoints at the next step
boundary and returns EXIT_REQUEUE; :class:`TrainingJob` then has submitit requeue the job, which
restarts with ``run.resume=latest``. The submitted callable is a submitit ``Checkpointable``, so
submitit's own timeout path leads to the same place.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import itertools
import json
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import submitit
from submitit.core.job_environment import SignalHandler

from common.cli import run_entry_point
from common.config_loader import ConfigError
from common.jobs import EXIT_REQUEUE, LAUNCHER_VARS, resume_overrides  # torch-free: submitting stays light

TRAINER_ENTRY = "train.core.trainer:main"


def _resolve(entry: str) -> Callable[[list[str]], Any]:
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)


class TrainingJob(submitit.helpers.Checkpointable):
    """``python -m train`` as a submitit callable: ``TrainingJob()(config, overrides)``.

    ``entry`` ("module:function", taking the argv list) is the trainer's ``main`` by default; tests
    point it at a stand-in with the same contract.
    """

    def __init__(self, entry: str = "train.core.trainer:main", restarted: bool = False) -> None:
        self.entry = entry
        self.restarted = restarted  # True in the call that `checkpoint` hands to the requeued job

    def argv(self, config: str, overrides: Sequence[str] = ()) -> list[str]:
        """The trainer's argv, with the resume rule of common.jobs (first start or restart)."""
        return ["--config", str(config), *resume_overrides(overrides, restarted=self.restarted)]

    def __call__(self, config: str, overrides: Sequence[str] = ()) -> Any:
        # The job's ranks and rendezvous come from submitit (train.core.distributed): the copies of these that
        # the submitting shell passed on (sbatch and the local executor copy its environment) are stale.
        for key in LAUNCHER_VARS:
            os.environ.pop(key, None)
        # Stop requests before the trainer installs its own handlers must not kill the process
        # (SIGUSR1's default action); submitit's local executor warns with SIGUSR2: same meaning.
        signal.signal(signal.SIGUSR1, lambda signum, frame: None)
        signal.signal(signal.SIGUSR2, lambda signum, frame: os.kill(os.getpid(), signal.SIGUSR1))
        try:
            result = _resolve(self.entry)(self.argv(config, overrides))
        except SystemExit as stop:
            if stop.code != EXIT_REQUEUE:
                raise
            self._requeue()
        if isinstance(result, dict) and result.get("exit_code") == EXIT_REQUEUE:
            self._requeue()
        return result

    def checkpoint(self, config: str, overrides: Sequence[str] = ()) -> submitit.helpers.DelayedSubmission:
        """What the requeued job runs: the same call, marked as a restart (it continues from ``latest``)."""
        return submitit.helpers.DelayedSubmission(TrainingJob(self.entry, restarted=True), config, list(overrides))

    def _requeue(self) -> None:
        """The trainer saved a checkpoint and stopped: let submitit re-dump the call and requeue.

        On rank 0 this calls ``checkpoint``, writes the new call over the submitted pickle, runs
        ``scontrol requeue`` (the local executor restarts its tasks instead) and exits. Other ranks
        just exit; none writes a result, so the submitter keeps waiting for the requeued run.
        """
        env = submitit.JobEnvironment()
        delayed = submitit.helpers.DelayedSubmission.load(env.paths.submitted_pickle)
        SignalHandler(env, env.paths, delayed).checkpoint_and_try_requeue(signal.SIGUSR2)
        raise SystemExit(EXIT_REQUEUE)


def check_config(config: str | Path, overrides: Sequence[str], world_size: int, preflight: bool = True) -> None:
    """What ``python -m train`` checks on rank 0 before DeepSpeed starts, run here before anything is queued.

    Loads ``config`` with ``overrides`` into TrainConfig (missing file, bad key or value) and, unless
    ``preflight`` is False (data visible only on the compute nodes), runs train.core.preflight for
    ``world_size`` ranks (dataset folder and split, batch vs ranks, resume path, pretrained file).
    Raises ConfigError naming the key. Imports torch (train.config's loss and model sections), ~1.5 s.
    """
    from common.config_loader import load_config
    from train.config import TrainConfig

    cfg = load_config(TrainConfig, config, list(overrides))
    if preflight:
        from train.core.preflight import preflight as run_preflight

        run_preflight(cfg, world_size, device=False)  # the GPUs are the compute nodes', not this host's


@dataclass(frozen=True)
class LaunchOptions:
    """Where a run goes and how big it is: the scheduler side of :func:`submit` and :func:`sweep`, one field
    per ``python -m train.launch`` flag, with the same defaults. ``submit(config, overrides, nodes=2, ...)``
    takes the fields as keywords; ``launch=LaunchOptions(...)`` passes a prepared set (keywords win)."""

    cluster: str = "slurm"
    """"slurm" (sbatch, through submitit) or "local" (processes on this machine; then nodes must be 1)."""
    nodes: int = 1
    """Nodes per job."""
    gpus_per_node: int = 0
    """GPUs per node; one task (rank) per GPU unless ``tasks_per_node`` says otherwise."""
    tasks_per_node: Optional[int] = None
    """Ranks per node; None = one per GPU (1 without GPUs). E.g. 2 for a 2-rank CPU run on one node."""
    cpus_per_task: Optional[int] = None
    """CPU cores per rank; None = the cluster's default."""
    partition: Optional[str] = None
    """SLURM partition; None = the cluster's default."""
    time: int = 60
    """Time limit of each job, in minutes."""
    signal_delay_s: int = 300
    """SLURM signals SIGUSR1 this many seconds before the limit: the trainer checkpoints and the job requeues."""
    slurm_args: Optional[dict] = None
    """Raw extra sbatch options, e.g. {"qos": "high"}."""
    folder: Union[str, Path] = "logs/submitit"
    """submitit's pickles and each task's log (``%j_%t_log.out``)."""
    job_name: Optional[str] = None
    """The job's name; None = "clip-train" for :func:`submit`, "clip-sweep" for :func:`sweep`."""

    @property
    def world_size(self) -> int:
        """Ranks of one job: nodes x tasks per node."""
        return self.nodes * (self.tasks_per_node or max(self.gpus_per_node, 1))


def _launch_options(launch: Optional[LaunchOptions], options: dict, job_name: str) -> LaunchOptions:
    """``launch`` (default: all defaults) with the keyword ``options`` applied and a job name."""
    names = {f.name for f in dataclasses.fields(LaunchOptions)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f"unknown launch option(s) {', '.join(unknown)}; LaunchOptions has: {', '.join(sorted(names))}")
    opts = dataclasses.replace(launch or LaunchOptions(), **options)
    return opts if opts.job_name else dataclasses.replace(opts, job_name=job_name)


def _executor(opts: LaunchOptions, array_parallelism: int = 1) -> submitit.Executor:
    if opts.cluster not in ("slurm", "local"):
        raise ConfigError(f"cluster must be 'slurm' or 'local', got {opts.cluster!r}")
    if opts.cluster == "local" and opts.nodes != 1:
        raise ConfigError("cluster='local' runs on this machine: nodes must be 1")
    executor = submitit.AutoExecutor(folder=opts.folder, cluster=opts.cluster)
    params: dict[str, Any] = dict(
        name=opts.job_name, nodes=opts.nodes, timeout_min=opts.time,
        tasks_per_node=opts.tasks_per_node or max(opts.gpus_per_node, 1),  # one process per GPU
        gpus_per_node=opts.gpus_per_node)
    if opts.cpus_per_task:
        params["cpus_per_task"] = opts.cpus_per_task
    if opts.cluster == "slurm":
        params.update(
            slurm_signal_delay_s=opts.signal_delay_s, slurm_array_parallelism=array_parallelism,
            # The trainer's stop signal (submitit's default is USR2, which the trainer does not watch),
            # and requeue-ability even where the cluster default says otherwise.
            slurm_additional_parameters={"signal": f"USR1@{opts.signal_delay_s}", "requeue": True,
                                         **(opts.slurm_args or {})})
        if opts.partition is not None:
            params["slurm_partition"] = opts.partition
    executor.update_parameters(**params)
    return executor


def submit(config: str | Path, overrides: Sequence[str] = (), launch: Optional[LaunchOptions] = None, *,
           entry: str = TRAINER_ENTRY, preflight: bool = True, **options: Any) -> submitit.Job:
    """Submit one training run; ``job.results()[0]`` is rank 0's ``train.core.trainer.main`` return value.

    Where and how big: :class:`LaunchOptions`, as ``launch`` and/or its fields as keywords
    (``nodes=2, gpus_per_node=8, partition="gpu", time=24 * 60``). The config is checked first
    (:func:`check_config`; ConfigError, nothing submitted) when ``entry`` is the trainer; ``preflight=False``
    checks the config only (data that only the compute nodes see). ``entry`` ("module:function") is for tests.
    """
    opts = _launch_options(launch, options, "clip-train")
    if entry == TRAINER_ENTRY:
        check_config(config, overrides, opts.world_size, preflight)
    return _executor(opts).submit(TrainingJob(entry), str(config), list(overrides))


def grid_points(grid: dict[str, Iterable[Any]]) -> list[dict[str, Any]]:
    """The Cartesian product of ``grid``, in a stable order (the last key varies fastest)."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(list(grid[k]) for k in keys))]


def point_name(point: dict[str, Any]) -> str:
    """A folder name for one sweep point: {"loss.cyclip_in_modal": 0.25, "run.seed": 1} ->
    "cyclip_in_modal-0.25_seed-1"."""
    parts = [f"{key.rsplit('.', 1)[-1]}-{value}" for key, value in point.items()]
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", "_".join(parts))


def _base_run_dir(config: str | Path, overrides: Sequence[str]) -> str:
    for item in reversed(overrides):
        if item.startswith("run.run_dir="):
            return item.split("=", 1)[1]
    from common.config_loader import load_config
    from train.config import TrainConfig

    return load_config(TrainConfig, config, list(overrides)).run.run_dir


def sweep(config: str | Path, grid: dict[str, Iterable[Any]], overrides: Sequence[str] = (),
          launch: Optional[LaunchOptions] = None, *, array_parallelism: int = 64, entry: str = TRAINER_ENTRY,
          preflight: bool = True, **options: Any) -> list[submitit.Job]:
    """One job per point of ``grid`` (a SLURM job array, at most ``array_parallelism`` running at once), each
    in RUN_DIR/<point name>; ``launch`` and keywords as for :func:`submit`, for every job.

    Jobs come back in ``grid_points(grid)`` order. Every point's config is checked first
    (:func:`check_config`; ConfigError naming the point, nothing submitted) when ``entry`` is the trainer.
    """
    opts = _launch_options(launch, options, "clip-sweep")
    points = grid_points(grid)
    if not points:
        raise ConfigError("empty sweep grid")
    if entry == TRAINER_ENTRY:
        check_config(config, overrides, opts.world_size, preflight=False)
    base = _base_run_dir(config, overrides)
    per_point = [[*overrides, *(f"{k}={v}" for k, v in point.items()), f"run.run_dir={base}/{point_name(point)}"]
                 for point in points]
    if entry == TRAINER_ENTRY:
        for point, point_overrides in zip(points, per_point):
            try:
                check_config(config, point_overrides, opts.world_size, preflight)
            except ConfigError as err:
                raise ConfigError(f"sweep point {point_name(point)}: {err}") from None
    executor = _executor(opts, array_parallelism)
    return executor.map_array(TrainingJob(entry), [str(config)] * len(points), per_point)


def _parse_sweep(items: Sequence[str]) -> dict[str, list[str]]:
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ConfigError(f"--sweep wants key=v1,v2,..., got {item!r}")
        grid[key] = values.split(",")
    return grid


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="training config YAML")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument("--cluster", choices=("slurm", "local"), default="slurm")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=0)
    parser.add_argument("--tasks-per-node", type=int, default=None, help="default: one per GPU (1 on CPU)")
    parser.add_argument("--cpus-per-task", type=int, default=None)
    parser.add_argument("--partition", default=None)
    parser.add_argument("--time", type=int, default=60, help="time limit in minutes")
    parser.add_argument("--signal-delay-s", type=int, default=300, help="warning this long before the limit")
    parser.add_argument("--folder", default="logs/submitit", help="submitit pickles and per-task logs")
    parser.add_argument("--job-name", default=None)
    parser.add_argument("--sweep", nargs="+", default=None, metavar="KEY=V1,V2",
                        help="a job array over the product of these values")
    parser.add_argument("--no-preflight", action="store_true",
                        help="check only the config, not the dataset/resume/pretrained paths (for data that only "
                             "the compute nodes see)")
    parser.add_argument("--entry", default=TRAINER_ENTRY, help=argparse.SUPPRESS)  # tests: a stand-in
    parser.add_argument("--wait", action="store_true", help="wait and print each job's result as JSON")
    args = parser.parse_args(argv)
    common = dict(cluster=args.cluster, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                  partition=args.partition, time=args.time, folder=args.folder, cpus_per_task=args.cpus_per_task,
                  tasks_per_node=args.tasks_per_node, signal_delay_s=args.signal_delay_s, entry=args.entry,
                  preflight=not args.no_preflight)
    # A config mistake ends in one line (common/cli.py), before anything reaches sbatch.
    return run_entry_point(lambda _: _submit_from_args(args, common))


def _submit_from_args(args: argparse.Namespace, common: dict) -> int:
    if args.nodes < 1 or (args.tasks_per_node is not None and args.tasks_per_node < 1) or args.gpus_per_node < 0:
        raise ConfigError(f"--nodes and --tasks-per-node must be >= 1 and --gpus-per-node >= 0, got "
                          f"{args.nodes}, {args.tasks_per_node}, {args.gpus_per_node}")
    if args.sweep:
        jobs = sweep(args.config, _parse_sweep(args.sweep), args.overrides,
                     job_name=args.job_name or "clip-sweep", **common)
    else:
        jobs = [submit(args.config, args.overrides, job_name=args.job_name or "clip-train", **common)]
    for job in jobs:
        print(f"submitted {job.job_id} (logs: {job.paths.stdout})", flush=True)
    if args.wait:
        for job in jobs:
            print(json.dumps({"job_id": job.job_id, "result": job.results()[0]}, default=str), flush=True)
    return 0
