"""What a run writes as it goes, besides checkpoints: metrics.jsonl + TensorBoard, and the sample-key log."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List


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
