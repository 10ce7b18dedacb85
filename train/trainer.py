"""The one training loop: DeepSpeed ZeRO, feature-cached accumulation, exact resume, preemption-safe.

Pretraining (CLIP, CyCLIP) and fine-tuning (m2-Mix, plain) are configs: the loss composition comes
from ``cfg.loss`` through ``ContrastiveObjective``, so nothing here branches per method.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from common.config_loader import load_config, to_dict, to_yaml
from train import data as data_lib
from train.checkpoint import CheckpointManager, code_version, set_rng_state, to_universal
from train.config import TrainConfig
from train.distributed import init_distributed_from_env
from train.export import export_engine
from train.losses import ContrastiveObjective
from train.model import build_model, weight_decay_groups

log = logging.getLogger("train")
EXIT_OK = 0
EXIT_REQUEUE = 3
"""Exit code after a checkpoint on SIGUSR1/SIGTERM (or run.stop_after_steps): the job should be requeued."""


def cosine_lr(step: int, cfg) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at cfg.steps (a function of step only)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def keep_freed_memory() -> bool:
    """glibc only: serve large allocations from the heap and keep freed memory there (see
    run.cpu_allocator_cache). Own code rather than jemalloc/tcmalloc: those need LD_PRELOAD before start."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


class MetricsWriter:
    """metrics.jsonl + TensorBoard on rank 0; a resumed run first drops lines past its checkpoint."""

    def __init__(self, run_dir: Path, resumed_step: int, tensorboard: bool):
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resumed_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.file = open(self.path, "a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resumed_step + 1)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step":
                    self.tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.rank, self.world_size, self.local_rank = init_distributed_from_env(device=cfg.run.device)
        self.per_rank = cfg.check_world_size(self.world_size)
        self.micro_batch = self.per_rank // cfg.data.accum_freq
        self.device = self._device()
        self.bf16 = cfg.zero.precision == "bf16" or (cfg.zero.precision == "auto" and self.device.type == "cuda")
        if self.device.type == "cpu" and cfg.run.cpu_allocator_cache:
            keep_freed_memory()  # ~240 MB of fresh gradient buffers a step (ViT-S-32) were page faults
        self.run_dir = Path(cfg.run.run_dir)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        self.checkpoints = CheckpointManager(self.run_dir, cfg.checkpoint.keep_last, self.rank)
        resume_from = self.checkpoints.resolve(cfg.run.resume)
        universal = False
        if resume_from is not None:
            saved = CheckpointManager.load_trainer_state(resume_from)
            # Elastic resume: ZeRO-1/2/3 partition the optimizer state by world size, so they go through one
            # universal-checkpoint conversion; stage 0 saves it whole and loads as it is on any world size.
            if saved["world_size"] != self.world_size and saved["config"]["zero"]["stage"] > 0:
                resume_from, universal = to_universal(resume_from, self.rank), True
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        model, self.train_transform, self.eval_transform, self.tokenizer = build_model(cfg.model, self.device)
        self.engine = self._build_engine(model, universal)
        self.objective = ContrastiveObjective(cfg.loss, cfg.run.seed)
        self.step = self.samples_seen = self.skipped_samples = self.nonfinite_total = self.nonfinite_in_row = 0
        if resume_from is not None:
            self.load(resume_from)
        self._stop_signal = False
        self._pending_skipped = 0  # corrupt samples replaced on this rank since the last log line
        self.loader = self._build_loader()
        self.metrics = MetricsWriter(self.run_dir, self.step, cfg.logging.tensorboard) if self.rank == 0 else None
        self.keys_file = None
        if cfg.logging.log_sample_keys:
            (self.run_dir / "sample_keys").mkdir(parents=True, exist_ok=True)
            self.keys_file = open(self.run_dir / "sample_keys" / f"rank{self.rank}.jsonl", "a")

    # ---------------------------------------------------------------- setup
    def _device(self) -> torch.device:
        wanted = self.cfg.run.device
        if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def deepspeed_config(self, universal: bool = False) -> dict:
        cfg = self.cfg
        bf16 = self.bf16
        zero = {"stage": cfg.zero.stage, "overlap_comm": cfg.zero.overlap_comm, "contiguous_gradients": True,
                "reduce_bucket_size": cfg.zero.reduce_bucket_size}
        if cfg.zero.stage in (1, 2):
            zero["allgather_bucket_size"] = cfg.zero.allgather_bucket_size
        if cfg.zero.offload_optimizer and cfg.zero.stage >= 2:
            zero["offload_optimizer"] = {"device": "cpu"}
        return {
            "train_batch_size": cfg.data.global_batch_size,
            "train_micro_batch_size_per_gpu": self.micro_batch,
            # DeepSpeed only sums the micro-batch gradients; the negatives come from feature caching.
            "gradient_accumulation_steps": cfg.data.accum_freq,
            "gradient_clipping": cfg.optim.grad_clip,
            # bf16 weights (the trainer casts images to bf16) or torch autocast over fp32 weights: zero.bf16_mode.
            "bf16": {"enabled": bf16 and cfg.zero.bf16_mode == "weights"},
            "torch_autocast": {"enabled": bf16 and cfg.zero.bf16_mode == "autocast", "dtype": "bfloat16"},
            "zero_optimization": zero,
            # A torch AdamW client optimizer: DeepSpeed's FusedAdam would JIT-compile for minutes on CPU.
            "zero_allow_untested_optimizer": True,
            "checkpoint": {"load_universal": universal},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }

    def _build_engine(self, model: torch.nn.Module, universal: bool):
        import deepspeed

        optim = self.cfg.optim
        # DeepSpeed hands this optimizer one flat fp32 partition per param group; unfused, AdamW streams it
        # through memory once per element-wise op, which at 1 rank on CPU cost a quarter of the step.
        optimizer = torch.optim.AdamW(weight_decay_groups(model, optim.weight_decay), lr=optim.lr,
                                      betas=(optim.beta1, optim.beta2), eps=optim.eps, fused=optim.fused_adamw)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                               config=self.deepspeed_config(universal))
        return engine

    def _build_loader(self):
        # The order is a pure function of (seed, step, world size, manifest): resuming needs only self.step.
        cfg = self.cfg
        loader = data_lib.build_loader(cfg.data, self.rank, self.world_size, cfg.run.seed, self.step, cfg.optim.steps,
                                       self.train_transform, self.tokenizer)
        if getattr(self, "_resumed_data", None):  # the checkpoint's order must be this run's order
            loader.dataset.order.check_resume(self._resumed_data)
        return loader

    # ---------------------------------------------------------------- one step
    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype images must have at the engine: its weights' (bf16 with zero.bf16_mode=weights)."""
        return torch.bfloat16 if self.engine.bfloat16_enabled() else torch.float32

    def _features(self, images: torch.Tensor, texts: torch.Tensor):
        image_features, text_features, scale = self.engine(images, texts)[:3]
        # The losses run in fp32 whatever the engine's dtype (METHODS: bf16 logits over a global batch lose
        # the small CyCLIP terms and the geodesic mixing); the cast's backward returns bf16 gradients.
        return (image_features.float(), text_features.float(),
                scale.float().clamp(max=self.cfg.optim.max_logit_scale))

    def forward_backward_step(self, images: torch.Tensor, texts: torch.Tensor, lam: Optional[dict]) -> Optional[dict]:
        """Forward, loss over the whole per-rank batch (all negatives), backward; None if the loss is not finite.

        With accum_freq = k > 1 (open_clip's --accum-freq): features of all k micro-batches are first
        computed without gradients; then each micro-batch is recomputed with gradients and the loss is
        evaluated with it in place among the cached rest. The k backwards sum to exactly the gradient of
        the big-batch loss. The logit scale enters every one of the k losses, so only the first one lets
        its gradient through (otherwise it would be counted k times).
        """
        k, m = self.cfg.data.accum_freq, self.micro_batch
        chunks = [(images[i * m:(i + 1) * m], texts[i * m:(i + 1) * m]) for i in range(k)]
        cached = None
        if k > 1:
            with torch.no_grad():
                cached = [self._features(*chunk)[:2] for chunk in chunks]
        terms = None
        for j, chunk in enumerate(chunks):
            image_features, text_features, scale = self._features(*chunk)
            if cached is not None:
                image_features = torch.cat([c[0] for c in cached[:j]] + [image_features] + [c[0] for c in cached[j + 1:]])
                text_features = torch.cat([c[1] for c in cached[:j]] + [text_features] + [c[1] for c in cached[j + 1:]])
                scale = scale if j == 0 else scale.detach()
            out = self.objective(image_features, text_features, scale, lam=lam)
            if j == 0:
                terms = {name: value.detach() for name, value in out.items()}
                terms["logit_scale"] = scale.detach().reshape(())
                if not self._all_finite(terms["loss"]):
                    return None
            self.engine.backward(out["loss"], scale_wrt_gas=False)
            self.engine.step()  # DeepSpeed only updates at the k-th call (its accumulation boundary)
        return terms

    def _all_finite(self, loss: torch.Tensor) -> bool:
        # Every tensor a collective touches lives on the trainer's device: NCCL (DeepSpeed's backend on
        # CUDA) rejects CPU tensors. isfinite stays on the device too (no host sync before the reduce).
        bad = (~torch.isfinite(loss.detach().float())).float().reshape(1).to(self.device)
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank must agree to skip, or collectives hang
        return bad.item() == 0.0

    def train_step(self, batch: dict) -> Optional[dict]:
        lr = cosine_lr(self.step, self.cfg.optim)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        lam = self.objective.draw_lambda() if self.cfg.loss.mixes else None
        images = batch["image"].to(self.device, dtype=self.input_dtype, non_blocking=True)
        texts = batch["text"].to(self.device, non_blocking=True)
        terms = self.forward_backward_step(images, texts, lam)
        self.step += 1
        self.samples_seen += self.cfg.data.global_batch_size
        if terms is None:
            self.nonfinite_total += 1
            self.nonfinite_in_row += 1
            log.warning("step %d: non-finite loss, step skipped (%d in a row)", self.step, self.nonfinite_in_row)
            if self.nonfinite_in_row >= self.cfg.optim.max_nonfinite_steps:
                raise FloatingPointError(
                    f"{self.nonfinite_in_row} consecutive steps had a NaN/inf loss (last at step {self.step}); "
                    "aborting. Lower optim.lr, check the data, or resume from an earlier checkpoint.")
            return None
        self.nonfinite_in_row = 0
        terms["lr"] = torch.tensor(lr, device=self.device)
        return terms

    # ---------------------------------------------------------------- state
    def trainer_state(self) -> dict:
        return {"step": self.step, "samples_seen": self.samples_seen, "skipped_samples": self.skipped_samples,
                "nonfinite_total": self.nonfinite_total, "nonfinite_in_row": self.nonfinite_in_row,
                "objective": self.objective.state_dict(), "world_size": self.world_size,
                "config": to_dict(self.cfg), "code_version": code_version(),
                "data": self.loader.dataset.order.state_dict()}

    def save(self) -> Path:
        return self.checkpoints.save(self.engine, self.step, self.trainer_state())

    def load(self, path: Path) -> None:
        self.engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                    load_lr_scheduler_states=False)
        state = CheckpointManager.load_trainer_state(path)
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        self.skipped_samples, self.nonfinite_total = state["skipped_samples"], state["nonfinite_total"]
        self.nonfinite_in_row = state["nonfinite_in_row"]
        self.objective.load_state_dict(state["objective"])
        self._resumed_data = state.get("data")  # checked against the rebuilt loader's order in _build_loader
        rng = CheckpointManager.load_rng(path, self.rank)
        if rng is not None:  # absent for ranks that did not exist in the saved run (elastic resume)
            set_rng_state(rng)
        if self.rank == 0:
            log.info("resumed from %s at step %d", path, self.step)

    def evaluate(self) -> dict:
        """The light periodic evaluation. Every rank runs it: under ZeRO-3 a forward needs all of them."""
        from train.periodic_eval import evaluate_model

        results = evaluate_model(self.engine, self.tokenizer, self.eval_transform, self.cfg.data.path,
                                 self.cfg.logging.eval_split, self.cfg.logging.eval_max_samples)
        return {f"eval/{name}": float(value) for name, value in results.items()}

    # ---------------------------------------------------------------- loop
    def _request_stop(self, signum, _frame) -> None:
        log.warning("signal %d: will checkpoint and exit with %d at the next step boundary", signum, EXIT_REQUEUE)
        self._stop_signal = True

    def _stop_agreed(self, steps_this_process: int) -> bool:
        limit = self.cfg.run.stop_after_steps
        flag = torch.tensor([1.0 if self._stop_signal or (limit and steps_this_process >= limit) else 0.0],
                            device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # a signal to any rank stops all of them together
        return flag.item() > 0

    def _log(self, terms: dict, wait_s: float, step_s: float) -> dict:
        names = sorted(terms)
        values = torch.stack([terms[n].float().reshape(()).to(self.device) for n in names]
                             + [torch.tensor(float(self._pending_skipped), device=self.device)])
        self._pending_skipped = 0
        if dist.is_initialized():
            dist.all_reduce(values)
            values /= self.world_size  # row-wise loss terms are rank shares that average to the global value
        values = values.tolist()  # one device-to-host copy for all terms
        record = dict(zip(names, values[:-1]))
        self.skipped_samples += int(round(values[-1] * self.world_size))
        record.update(step=self.step, samples_seen=self.samples_seen, samples_per_s=self.cfg.data.global_batch_size / step_s,
                      data_wait_frac=wait_s / step_s, skipped_samples=self.skipped_samples)
        return record

    def fit(self) -> dict:
        cfg = self.cfg
        for signum in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(signum, self._request_stop)
        bar = None
        if self.rank == 0 and cfg.logging.progress_bar:
            from tqdm import tqdm
            bar = tqdm(total=cfg.optim.steps, initial=self.step, desc="train", dynamic_ncols=True)
        # A run resumed from a checkpoint already holds a checkpoint at its current step.
        last, exit_code, steps_here = {}, EXIT_OK, 0
        saved_at = self.step if self.step > 0 else -1
        self.engine.train()
        batches = iter(self.loader)
        while self.step < cfg.optim.steps:
            t0 = time.perf_counter()
            batch = next(batches)
            wait_s = time.perf_counter() - t0
            if self.keys_file is not None:
                self.keys_file.write(json.dumps({"step": self.step, "keys": batch["keys"]}) + "\n")
                self.keys_file.flush()
            self._pending_skipped += batch["skipped"]
            terms = self.train_step(batch)
            steps_here += 1
            if terms is not None and (self.step % cfg.logging.every_steps == 0 or self.step == cfg.optim.steps):
                last = self._log(terms, wait_s, time.perf_counter() - t0)
                every = cfg.logging.eval_every_steps
                if every and (self.step % every == 0 or self.step == cfg.optim.steps):
                    last.update(self.evaluate())
                if self.metrics is not None:
                    self.metrics.write(last)
                if bar is not None:
                    bar.set_postfix({k: f"{last[k]:.4g}" for k in ("samples_per_s", "loss", *sorted(terms)) if k in last},
                                    refresh=False)
            if bar is not None:
                bar.update(1)
            if self.step % cfg.checkpoint.every_steps == 0 and self.step < cfg.optim.steps:
                self.save()
                saved_at = self.step
            if self.step < cfg.optim.steps and self._stop_agreed(steps_here):
                if saved_at != self.step:
                    self.save()
                exit_code = EXIT_REQUEUE
                break
        else:
            if saved_at != self.step:
                self.save()
            if cfg.checkpoint.export:
                export_engine(self.engine, self.run_dir / "export", cfg, self.rank, self.step)
        if bar is not None:
            bar.close()
        self.close()
        return {"step": self.step, "exit_code": exit_code, "run_dir": str(self.run_dir),
                "last": {k: v for k, v in last.items()}, "skipped_samples": self.skipped_samples,
                "nonfinite_steps": self.nonfinite_total}

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.keys_file is not None:
            self.keys_file.close()
        del self.loader  # stops DataLoader workers before the process group goes away


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train", description="DeepSpeed ZeRO CLIP/CyCLIP/m2-Mix trainer")
    parser.add_argument("--config", default=None, help="YAML config (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.steps=100 zero.stage=2")
    return parser.parse_args(argv)


def main(argv: list[str]) -> dict:
    """Run a whole training in this process (any launcher) and return its summary.

    The summary's ``exit_code`` is EXIT_REQUEUE when the run stopped early on a signal after
    checkpointing; ``python -m train`` exits with it.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # DeepSpeed calls torch collectives that torch has renamed; the warning is theirs, once per call.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    args = parse_args(argv)
    cfg = load_config(TrainConfig, args.config, args.overrides)
    return Trainer(cfg).fit()
