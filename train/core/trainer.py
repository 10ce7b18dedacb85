"""The one training loop: DeepSpeed ZeRO, feature-cached accumulation, exact resume, preemption-safe.

Pretraining (CLIP, CyCLIP) and fine-tuning (m2-Mix, plain) are configs: the loss composition comes
from ``cfg.loss`` through ``ContrastiveObjective``, so nothing here branches per method.

Lifecycle (after torchtitan's trainer): ``Trainer(cfg)`` builds the engine and registers every stateful
component once with the ``CheckpointManager``, which saves and loads them all; ``fit()`` runs the loop;
``close()`` (called by ``main``'s ``finally``, on any exit) stops loader workers and closes the writers.
One step is ``forward_backward_step`` (gradients only: train/core/step.py) then ``optimizer_step`` (the
update). The decisions are asked of small objects, not made here: skip or abort on a non-finite loss
(``NonFinitePolicy``), stop on a signal (``StopPolicy``), agree across ranks (``RankAgreement``), save now
(``SaveSchedule``); the schedule, the engine and the step's math have their own modules.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

from common.config_loader import load_config, to_dict, to_yaml
from common.errors import EXIT_OK, EXIT_REQUEUE
from train.config import TrainConfig
from train.core.checkpoint import CheckpointManager, SaveSchedule, to_universal
from train.core.distributed import discover_launcher_env, init_distributed_from_env
from train.core.engine import build_optimizer, deepspeed_config, keep_freed_memory, pick_device, uses_bf16
from train.core.export import export_engine
from train.core.policies import NonFinitePolicy, RankAgreement, StepAgreement, StopPolicy
from train.core.preflight import preflight
from train.core.remote_checkpoint import remote_from_config
from train.core.run_lock import LOCK_NAME, hold_run_lock, release_run_lock
from train.core.run_log import MetricsWriter, SampleKeysWriter
from train.core.schedule import cosine_lr
from train.core.state import RNGState, StatefulLoader, TrainProgress
from train.core.step import ContrastiveStep, set_lr
from train.losses.objective import ContrastiveObjective
from train.model.build import build_model
from train.model.knobs import compile_module

log = logging.getLogger("train")


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self._closing = contextlib.ExitStack()  # what __init__ opened, closed in reverse order by close()
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------- setup
    def _setup(self) -> None:
        cfg = self.cfg
        self.rank, self.world_size, self.local_rank = init_distributed_from_env(device=cfg.run.device)
        self.per_rank = cfg.check_world_size(self.world_size)
        self.micro_batch = self.per_rank // cfg.data.accum_freq
        self.device = pick_device(cfg.run.device, self.local_rank)
        self.bf16 = uses_bf16(cfg.zero.precision, self.device)
        if self.device.type == "cpu" and cfg.run.cpu_allocator_cache:
            keep_freed_memory()  # ~240 MB of fresh gradient buffers a step (ViT-S-32) were page faults
        self.run_dir = Path(cfg.run.run_dir)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        self.checkpoints = CheckpointManager(self.run_dir, cfg.checkpoint.keep_last, self.rank,
                                             remote_from_config(cfg.checkpoint))
        self._closing.callback(self.checkpoints.wait_upload)  # any exit waits for the upload in flight
        resume_from, universal = self._resume_point()
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        model, self.train_transform, self.eval_transform, self.tokenizer = build_model(cfg.model, self.device)
        # From here on each rank draws its own (the model's draws: model.patch_dropout's masks), as in
        # open_clip_train; checkpoints hold each rank's generator (RNGState), so a resume continues them.
        torch.manual_seed(cfg.run.seed + self.rank)
        self.engine = self._build_engine(model, universal)
        # Every rank's batch holds b = B/W rows (the loader replaces unreadable samples, never drops them), so
        # the loss needs no per-step exchange of row counts (a host sync each on a GPU)
        self.objective = ContrastiveObjective(cfg.loss, cfg.run.seed, equal_rows=True)
        self.agree = RankAgreement(self.device, self.world_size)
        self.nonfinite = NonFinitePolicy(cfg.optim.max_nonfinite_steps)
        self.stop = StopPolicy(cfg.run.stop_after_steps)
        self.step_fn = ContrastiveStep(
            self.engine, self.objective, cfg.optim.max_logit_scale, cfg.data.accum_freq,
            backward=lambda loss: self.engine.backward(loss, scale_wrt_gas=False),
            set_boundary=self.engine.set_gradient_accumulation_boundary, all_finite=self._sync_step)
        self.agreed: Optional[StepAgreement] = None  # what the ranks agreed on at the current step's sync
        self.steps_here = 0  # steps this process has taken (run.stop_after_steps counts them)
        self.progress = TrainProgress()
        # Pinned batches on CUDA: only a copy from page-locked memory is asynchronous (train_step)
        self.loader = StatefulLoader(cfg.data, self.rank, self.world_size, cfg.run.seed, cfg.optim.steps,
                                     self.train_transform, self.tokenizer, pin_memory=self.device.type == "cuda")
        self._closing.callback(self.loader.close)  # DataLoader workers stop before the process group goes
        # The one list of what a checkpoint holds besides the engine.
        self.checkpoints.register(
            self.engine, states={"progress": self.progress, "data": self.loader, "objective": self.objective},
            rank_states={"rng": RNGState()}, meta={"world_size": self.world_size, "config": to_dict(cfg)})
        if resume_from is not None:
            self.checkpoints.load(resume_from)
            if self.rank == 0:
                log.info("resumed from %s at step %d", resume_from, self.progress.step)
        # A run resumed from a checkpoint already holds one at its current step.
        self.saves = SaveSchedule(cfg.checkpoint.every_steps, cfg.optim.steps,
                                  self.progress.step if resume_from is not None else None)
        self.pending_skipped = 0  # corrupt samples replaced on this rank since the last log line
        self.metrics = self.keys_file = None
        self._zeroshot_sets = {}
        if self.rank == 0:
            self.metrics = MetricsWriter(self.run_dir, self.progress.step, cfg.logging.tensorboard, cfg.logging.wandb,
                                         resumed=resume_from is not None, config=to_dict(cfg))
            self._closing.callback(self.metrics.close)
        if cfg.logging.log_sample_keys:
            self.keys_file = SampleKeysWriter(self.run_dir, self.rank)
            self._closing.callback(self.keys_file.close)

    def _resume_point(self) -> tuple[Optional[Path], bool]:
        """The checkpoint to resume from (None: fresh start), and whether it goes through the universal format."""
        resume_from = self.checkpoints.resolve(self.cfg.run.resume)
        if resume_from is None:
            return None, False
        saved = CheckpointManager.load_trainer_state(resume_from)
        # Elastic resume: ZeRO-1/2/3 partition the optimizer state by world size, so they go through one
        # universal-checkpoint conversion; stage 0 saves it whole and loads as it is on any world size.
        if saved["world_size"] != self.world_size and saved["config"]["zero"]["stage"] > 0:
            return to_universal(resume_from, self.rank), True
        return resume_from, False

    def _build_engine(self, model: torch.nn.Module, universal: bool):
        import deepspeed

        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=build_optimizer(model, self.cfg.optim),    # only requires_grad parameters
            config=deepspeed_config(self.cfg, self.micro_batch, self.bf16, universal))
        if self.cfg.run.compile:    # in place (the engine compiles its module): state_dict keys stay plain
            compile_module(engine, self.cfg.run.compile_backend)
        return engine

    # ---------------------------------------------------------------- one step
    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype images must have at the engine: its weights' (bf16 with zero.bf16_mode=weights)."""
        return torch.bfloat16 if self.engine.bfloat16_enabled() else torch.float32

    def forward_backward_step(self, images: torch.Tensor, texts: torch.Tensor, lam: Optional[dict]) -> Optional[dict]:
        """Forward, loss over the whole per-rank batch (all negatives), backward: gradients only, no update
        (train/core/step.py). Returns the loss terms, or None (no backward ran) when the loss is not finite
        on some rank."""
        return self.step_fn(images, texts, lam)

    def optimizer_step(self, lr: float) -> None:
        """The update: learning rate, gradient clipping, AdamW, and (ZeRO) the parameter all-gather."""
        set_lr(self.engine.optimizer, lr)
        self.engine.step()

    def _sync_step(self, terms: dict) -> bool:
        """ContrastiveStep's finiteness check, and the step's one host sync (docs/TRAINING.md, host syncs).

        Called between the first forward and any backward, where the ranks must agree on the loss anyway, so
        the stop wish and the skipped-sample count travel in the same all-reduce and the logged loss terms come
        back with it (``RankAgreement.step_sync``): nothing else in a step waits for the device."""
        self.agreed = self.agree.step_sync(terms, self.stop.wants_stop(self.steps_here + 1), self.pending_skipped)
        self.pending_skipped = 0
        return self.agreed.finite

    def train_step(self, batch: dict) -> Optional[dict]:
        """forward_backward_step, then optimizer_step unless the loss was not finite (the step is skipped).

        Returns the loss terms and "logit_scale" averaged over ranks and "lr", as floats; None when skipped."""
        lr = cosine_lr(self.progress.step, self.cfg.optim)
        lam = self.objective.draw_lambda() if self.cfg.loss.mixes else None
        # Copy, then cast on the device: a copy that also changes the dtype casts into a new pageable host
        # buffer first, and a copy from pageable memory is synchronous (the loader pins on CUDA).
        images = batch["image"].to(self.device, non_blocking=True).to(self.input_dtype)
        texts = batch["text"].to(self.device, non_blocking=True)
        self.agreed = None
        terms = self.forward_backward_step(images, texts, lam)  # sets self.agreed (_sync_step)
        if terms is not None:
            self.optimizer_step(lr)  # a Python float into the param groups: no tensor made from it
        progress = self.progress
        progress.step += 1
        progress.samples_seen += self.cfg.data.global_batch_size
        progress.skipped_samples += self.agreed.skipped
        self.nonfinite.record(progress, finite=terms is not None)    # raises after too many in a row
        return None if terms is None else {**self.agreed.terms, "lr": lr}

    def evaluate(self, step: int) -> dict:
        """The evaluations due at ``step`` (logging.eval_every_steps and each logging.zeroshot set), as flat
        metrics; {} when none is due. A pure function of the step, so resume does not move them. Every rank
        runs them: under ZeRO-3 a forward needs all of them."""
        from train.evaluate.periodic import EvalReadError, evaluate_model, zero_shot

        cfg, out = self.cfg.logging, {}
        every, last = cfg.eval_every_steps, self.cfg.optim.steps
        if every and (step % every == 0 or step == last):
            results = evaluate_model(self.engine, self.tokenizer, self.eval_transform, self.cfg.data.datasets()[0].path,
                                     cfg.eval_split, cfg.eval_max_samples)
            out.update({f"eval/{name}": float(value) for name, value in results.items()})
        for zs in cfg.zeroshot:
            if zs.due(step, last):
                try:
                    results = zero_shot(self.engine, self.tokenizer, self.eval_transform, self._zeroshot_set(zs),
                                        zs.max_samples, zs.templates, zs.batch_size, self.agree.any)
                except EvalReadError as err:    # every rank is here: skipped together, the run goes on
                    log.warning("step %d: zero-shot set %s skipped: %s", step, zs.name, err)
                    out[f"zeroshot/{zs.name}/skipped"] = 1.0
                    continue
                out.update({f"zeroshot/{zs.name}/{name}": float(value) for name, value in results.items()})
        return out

    def _zeroshot_set(self, zs):
        """The opened dataset of a logging.zeroshot entry (its class names and templates read once). A set that
        fails to open on any rank is an EvalReadError on every rank (agreed on, so none waits for the others)."""
        from train.evaluate.datasets import open_eval_set
        from train.evaluate.periodic import EvalReadError

        error = None
        if zs.name not in self._zeroshot_sets:
            try:
                self._zeroshot_sets[zs.name] = open_eval_set(zs.path, zs.split, f"logging.zeroshot {zs.name}: path",
                                                             zs.storage_options or None)
            except Exception as err:    # noqa: BLE001 - agreed on below, whatever it is
                error = err
        if self.agree.any(error is not None):
            raise EvalReadError(f"{zs.path}: {error or 'it failed to open on another rank'}")
        return self._zeroshot_sets[zs.name]

    # ---------------------------------------------------------------- loop
    def _log(self, terms: dict, wait_s: float, step_s: float) -> dict:
        """The step's record: its loss terms and lr (``train_step``, agreed at the step's sync: no collective
        here), the throughput of the last step window (``wait_s`` and ``step_s`` in seconds) and the skipped
        samples of all ranks so far."""
        record = {name: terms[name] for name in sorted(terms)}
        progress = self.progress
        record.update(step=progress.step, samples_seen=progress.samples_seen,
                      samples_per_s=self.cfg.data.global_batch_size / step_s, data_wait_frac=wait_s / step_s,
                      skipped_samples=progress.skipped_samples)
        record.update(self.loader.order.progress_record(progress.step))  # a mixture's samples and epoch per source
        return record

    def _report(self, terms: Optional[dict], wait_s: float, step_s: float, bar, evals: dict) -> dict:
        """Rank 0 writes the step's all-reduced loss terms (None: not logged this step) and the evaluations due
        at this step to metrics.jsonl, TensorBoard and wandb."""
        record = self._log(terms, wait_s, step_s) if terms is not None else {"step": self.progress.step}
        record.update(evals)
        if self.metrics is not None:
            self.metrics.write(record)
        if bar is not None and terms is not None:
            bar.set_postfix({k: f"{record[k]:.4g}" for k in ("samples_per_s", "loss", *sorted(terms)) if k in record},
                            refresh=False)
        return record

    def fit(self) -> dict:
        """Train to optim.steps, or until a stop signal / run.stop_after_steps (checkpoint, EXIT_REQUEUE)."""
        cfg, progress = self.cfg, self.progress
        self.stop.install()
        bar = None
        if self.rank == 0 and cfg.logging.progress_bar:
            from tqdm import tqdm
            bar = self._closing.enter_context(tqdm(total=cfg.optim.steps, initial=progress.step, desc="train",
                                                   dynamic_ncols=True))
        last, exit_code = {}, EXIT_OK
        self.engine.train()
        batches = iter(self.loader)
        # Throughput is timed start to start: a step's window runs from its start (before its batch is fetched,
        # so loader waits count) to the next step's start (its logging, evaluation and saving included). On
        # CUDA the host clock sees dispatch only, but each step waits at its one sync (_sync_step) for the GPU
        # work queued before it, so start-to-start windows add up to the wall time without a sync of their own.
        # A record reports the last complete window, the previous step's (a process's first step: its own, up
        # to its record).
        started = window = None  # the current step's start; the previous step's (window s, wait s)
        wait_s = 0.0  # the current step's wait for its batch (s)
        while progress.step < cfg.optim.steps:
            now = time.perf_counter()
            if started is not None:
                window = (now - started, wait_s)
            started = now
            batch = next(batches)
            wait_s = time.perf_counter() - started
            if self.keys_file is not None:
                self.keys_file.write(progress.step, batch["keys"])
            self.pending_skipped += batch["skipped"]
            terms = self.train_step(batch)
            self.steps_here += 1
            logged = terms is not None and (progress.step % cfg.logging.every_steps == 0
                                            or progress.step == cfg.optim.steps)
            evals = self.evaluate(progress.step)
            if logged or evals:
                step_s, step_wait_s = window or (time.perf_counter() - started, wait_s)
                last = self._report(terms if logged else None, step_wait_s, step_s, bar, evals)
            if bar is not None:
                bar.update(1)
            if self.saves.periodic(progress.step):
                self.save()
            if progress.step < cfg.optim.steps and self.agreed.stop:  # agreed at the step's sync
                if self.saves.final(progress.step):
                    self.save()
                exit_code = EXIT_REQUEUE
                break
        else:
            self._finish()
        return {"step": progress.step, "exit_code": exit_code, "run_dir": str(self.run_dir), "last": dict(last),
                "skipped_samples": progress.skipped_samples, "nonfinite_steps": progress.nonfinite_total}

    def save(self) -> int:
        """A checkpoint of the engine and every registered component at the current step; returns the step."""
        self.checkpoints.save(self.progress.step)
        self.saves.saved(self.progress.step)
        return self.progress.step

    def _finish(self) -> None:
        if self.saves.final(self.progress.step):
            self.save()
        if self.cfg.checkpoint.export:
            export_engine(self.engine, self.run_dir / "export", self.cfg, self.rank, self.progress.step)

    def close(self) -> None:
        """Stop loader workers, close the progress bar and writers (idempotent; any exit path)."""
        self._closing.close()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train", description="DeepSpeed ZeRO CLIP/CyCLIP/m2-Mix trainer")
    parser.add_argument("--config", default=None, help="YAML config (configs/*.yaml)")
    parser.add_argument("--dry-run", action="store_true",
                        help="only check the config, dataset, resume checkpoint and pretrained weights for "
                             "--world-size ranks (no model, no DeepSpeed), then exit")
    parser.add_argument("--world-size", type=int, default=None,
                        help="with --dry-run: the rank count to check for (default: the launcher's, else 1)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.steps=100 zero.stage=2")
    return parser.parse_intermixed_args(argv)  # flags may sit among the key=value overrides


def main(argv: list[str]) -> dict:
    """Run a whole training in this process (any launcher) and return its summary.

    Raises ConfigError for a user mistake, found before DeepSpeed starts (``train.core.preflight``) where it can
    be. The summary's ``exit_code`` is EXIT_REQUEUE when the run stopped early on a signal after
    checkpointing; ``python -m train`` exits with it. The process group stays up (a driver may run
    several trainings in one process); ``python -m train`` takes it down on exit.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # DeepSpeed calls torch collectives that torch has renamed; the warning is theirs, once per call.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    args = parse_args(argv)
    cfg = load_config(TrainConfig, args.config, args.overrides)
    world_size = args.world_size if args.dry_run and args.world_size is not None else None  # 0 is checked too
    world_size = int(discover_launcher_env()["WORLD_SIZE"]) if world_size is None else world_size
    finished = preflight(cfg, world_size)  # {step, message} when run.resume=latest finds this run already done
    if finished and not args.dry_run and discover_launcher_env()["RANK"] == "0":
        log.info("%s", finished["message"])
    if args.dry_run and discover_launcher_env()["RANK"] == "0":
        if (Path(cfg.run.run_dir) / LOCK_NAME).exists():  # a folder a training holds fails here, not after torchrun
            hold_run_lock(cfg.run.run_dir)
            release_run_lock(cfg.run.run_dir)
        log.info("dry run: config, data, model and launcher checks passed for %d rank(s); nothing was trained",
                 world_size)
    if args.dry_run or finished:
        return {"step": (finished or {}).get("step", 0), "exit_code": EXIT_OK, "run_dir": cfg.run.run_dir, "last": {}}
    leader = discover_launcher_env()["RANK"] == "0"
    if leader:  # one training per run folder (train/core/run_lock.py); the others' rendezvous then fails
        hold_run_lock(cfg.run.run_dir)
    try:
        trainer = Trainer(cfg)
        try:
            return trainer.fit()
        finally:
            trainer.close()
    finally:
        if leader:
            release_run_lock(cfg.run.run_dir)
