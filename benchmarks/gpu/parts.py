"""What every part of the GPU check shares: sizes, budgets, the results file, the GPU's bf16 peak.

Each part runs under ``run_part``: its own wall-clock budget (seconds), any exception caught, and one JSON line
appended to OUT/results.jsonl the moment it ends ({"part", "ok", "seconds", "result" | "error", "log"}), so that a
later part hanging or the whole command being killed still leaves every earlier result behind. A failing part's
log tail is appended to OUT/failed.log under the part's name (one file whatever fails: the device tool returns
at most 8) (OUT: $OUT on the device machine, else logs/gpu-check/).
"""
from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
RENDEZVOUS_TIMEOUT_S = 60
"""Every trainer of the check (in process and subprocesses) waits at most this long for its process group
(train/core/distributed.py reads RENDEZVOUS_TIMEOUT_S; it bounds the rendezvous only: collectives get torch's
30 minutes after it, so each part's own timeout is what stops a hung collective), not 180 s."""

PEAK_BF16_TFLOPS = [
    # (substring of torch.cuda.get_device_name, dense bf16 TFLOP/s), most specific first. NVIDIA's data sheets
    # give sparse figures with an asterisk; these are the dense ones (half of them).
    ("H200 NVL", 835.0), ("H200", 989.4),               # H200 SXM is named plainly 'NVIDIA H200'
    ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4),   # 'NVIDIA H100 80GB HBM3' is the SXM part
    ("GH200", 989.4), ("H800", 989.4), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
    ("L40", 181.0), ("A10G", 70.0), ("A10", 125.0), ("L4", 121.0), ("RTX 4090", 165.0), ("RTX 6000 Ada", 364.0),
    ("A6000", 155.0)]
"""Dense bf16 tensor-core peaks in TFLOP/s by device name (`--peak-tflops` overrides)."""


def peak_tflops(gpu: str) -> float | None:
    """The dense bf16 peak (TFLOP/s) of the device named ``gpu``, or None when the table has none."""
    for key, peak in PEAK_BF16_TFLOPS:
        if key.lower() in gpu.lower():
            return peak
    return None


def sizes(dry: bool) -> dict:
    """Model, image px, batch, step windows and the per-part budgets (s) for the GPU or the --cpu-dry-run."""
    if dry:
        return dict(model="ViT-S-32", image=64, batch=8, steps=6, window=3, warmup=1, rounds=2, tiny_steps=6,
                    tiny_every=2, workers=1, device="cpu", threads=2, compile_backend="aot_eager", compile_s=20,
                    big_model="ViT-S-32", big_image=64, big_batch0=4, big_batch_cap=16,
                    budget=dict(throughput=400, mfu_memory=200, loss_costs=300, knobs=400, largest_batch=200,
                                resume=900, rows=900), run_s=300)
    # GPU estimate (H200, ViT-B-32 at 224 px, batch 256: ~50 ms a step): throughput ~40 s (trainer built, 2 x 3
    # windows of 20 steps), MFU/memory ~15 s, loss costs ~25 s (3 x 3 windows), knobs ~80 s (4 windows,
    # inductor compiles twice: ~30 s each), largest ViT-L-14 batch ~40 s (about 5 + 7 single steps), resume ~100 s
    # (3 short processes), rows ~120 s (3 processes of 30 steps, cut by its budget); ~7 min expected, the
    # budgets below sum to 480 s (gpu_device.sh's timeout: 500 s). Most valuable first: what is cut is last.
    return dict(model="ViT-B-32", image=224, batch=256, steps=30, window=20, warmup=3, rounds=3, tiny_steps=30,
                tiny_every=10, workers=8, device="cuda", threads=8, compile_backend="inductor", compile_s=30,
                big_model="ViT-L-14", big_image=224, big_batch0=128, big_batch_cap=8192,
                budget=dict(throughput=70, mfu_memory=30, loss_costs=45, knobs=90, largest_batch=50, resume=115,
                            rows=80), run_s=60)


class OverBudget(RuntimeError):
    """A part ran out of its wall-clock budget."""


class Budget:
    """A part's wall-clock allowance: ``left()`` seconds remain; ``check(what)`` raises OverBudget when none do."""

    def __init__(self, seconds: float):
        self.seconds, self.t0 = seconds, time.perf_counter()

    def left(self) -> float:
        """Seconds left of the budget (negative once over)."""
        return self.seconds - (time.perf_counter() - self.t0)

    def check(self, what: str) -> None:
        """Raise OverBudget (naming ``what``) when the budget is spent."""
        if self.left() <= 0:
            raise OverBudget(f"over its {self.seconds:.0f} s budget at {what}")


class Results:
    """OUT/results.jsonl, appended one line per part as each ends; OUT/failed.log, a failing part's traceback."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / "results.jsonl"
        self.parts: dict[str, dict] = {}
        self.failed: dict[str, str] = {}

    def write(self, record: dict) -> None:
        """Append ``record`` as one JSON line, flushed to disk at once."""
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def run_part(self, name: str, budget_s: float, fn: Callable[[Budget], dict]) -> dict | None:
        """``fn(Budget(budget_s))`` guarded: its result dict, or None when it raised (the error and its log tail
        go to the JSON line and OUT/failed.log). Prints one line as it starts and one as it ends."""
        print(f"gpu-check: {name} (budget {budget_s:.0f} s)", flush=True)
        t0 = time.perf_counter()
        try:
            result = fn(Budget(budget_s))
        except Exception as err:  # a failing part must not take the later ones with it
            log = self.out / "failed.log"
            with open(log, "a") as f:
                f.write(f"==== {name}\n{traceback.format_exc()[-20000:]}\n")
            self.failed[name] = f"{type(err).__name__}: {err}"
            self.write(dict(part=name, ok=False, seconds=round(time.perf_counter() - t0, 1),
                            error=f"{type(err).__name__}: {str(err)[-1500:]}", log=log.name))
            print(f"gpu-check: {name} FAILED after {time.perf_counter() - t0:.0f} s: {type(err).__name__}: "
                  f"{str(err).splitlines()[0] if str(err) else ''} (see {log})", flush=True)
            return None
        self.parts[name] = result
        self.write(dict(part=name, ok=bool(result.get("ok", True)), seconds=round(time.perf_counter() - t0, 1),
                        result=result))
        print(f"gpu-check: {name} done in {time.perf_counter() - t0:.0f} s: {json.dumps(result, default=str)}",
              flush=True)
        return result


def check_env() -> dict:
    """What every trainer and open_clip_train of the check gets on top of os.environ (set in this process too)."""
    env = dict(NO_ALBUMENTATIONS_UPDATE="1", RENDEZVOUS_TIMEOUT_S=str(RENDEZVOUS_TIMEOUT_S),
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions")))
    os.environ.update(env)
    return env
