"""What a run writes as it goes, besides checkpoints: metrics.jsonl + TensorBoard, and the sample-key log."""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import List, Optional


class MetricsWriter:
    """metrics.jsonl + TensorBoard (+ wandb) on rank 0; a resumed run first drops lines past its checkpoint.

    TensorBoard tags: a key with a ``/`` is its own tag (``eval/…``, ``zeroshot/imagenet/top1``), any other
    key is ``train/<key>``. wandb gets the same records with ``step`` as their x-axis.
    """

    def __init__(self, run_dir: Path, resumed_step: int, tensorboard: bool, wandb_cfg=None, resumed: bool = False,
                 config: Optional[dict] = None):
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
        self.wandb = None
        if wandb_cfg is not None and wandb_cfg.project and wandb_cfg.mode != "disabled":
            self.wandb = start_wandb(run_dir, wandb_cfg, resumed, config or {})

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step":
                    self.tb.add_scalar(key if "/" in key else f"train/{key}", value, record["step"])
        if self.wandb is not None:
            self.wandb.log(record)

    def close(self, exit_code: int = 0) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish(exit_code=exit_code)
            self.wandb = None


WANDB_ID_FILE = "wandb_run_id"
"""RUN_DIR/wandb_run_id: the wandb run a resumed or requeued run continues."""


def start_wandb(run_dir: Path, cfg, resumed: bool, config: dict):
    """A wandb run in ``RUN_DIR/wandb/``: the one named in RUN_DIR/wandb_run_id when this run resumes from a
    checkpoint, else a new one (whose id is written there first). ``step`` is its x-axis, so steps redone
    after a crash are logged again instead of being refused as going backwards."""
    if cfg.mode != "online":    # wandb's error reporting (Sentry) resolves its server even offline
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
    import wandb

    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if resumed and id_file.is_file() else ""
    if not run_id:
        run_id = secrets.token_hex(4)    # wandb ids: [a-z0-9], 8 characters here
        id_file.write_text(run_id + "\n")
    run = wandb.init(project=cfg.project, entity=cfg.entity or None, name=cfg.name or run_dir.resolve().name,
                     tags=list(cfg.tags) or None, mode=cfg.mode, dir=str(run_dir), id=run_id, resume="allow",
                     config=config, settings=wandb.Settings(silent=True, console="off"))
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


class SampleKeysWriter:
    """RUN_DIR/sample_keys/rank{R}.jsonl: {step, keys} per step (logging.log_sample_keys)."""

    def __init__(self, run_dir: Path, rank: int):
        (run_dir / "sample_keys").mkdir(parents=True, exist_ok=True)
        self.file = open(run_dir / "sample_keys" / f"rank{rank}.jsonl", "a")

    def write(self, step: int, keys: List[str]) -> None:
        self.file.write(json.dumps({"step": step, "keys": keys}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
