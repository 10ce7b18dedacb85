"""The last part: subprocess rows against the real open_clip_train (its own process, data path and logging).

open_clip_train on synthetic data (--dataset-type synthetic) and on real JPEGs (the same files as this trainer's
shards, through its CSV reader), and this trainer on those shards through its own loader, each the median
samples/s of its logged steps after the first third. This trainer's run is SIGKILLed once it has logged
``steps`` steps: its end-of-run checkpoint (GBs at ViT-B-32) is no part of a throughput figure, and the trainer
has no switch to skip it. Each process is killed after ``run_s`` seconds.
"""
from __future__ import annotations

import json
import statistics
import sys
import tarfile
import time
from pathlib import Path

from benchmarks.bench_trainer import open_clip_train, run_open_clip_train
from benchmarks.digits import make_digits_dataset
from benchmarks.gpu.parts import ROOT, Budget, check_env
from train.launch.local import launch_ranks, log_tail, wait_ranks


def shards_for(tmp: Path, s: dict) -> tuple[Path, Path]:
    """Real JPEG shards (scikit-learn digits, upscaled) in this project's format, and the same JPEGs as files with
    a CSV for open_clip_train: its webdataset reader expects the `fname` field of webdataset <= 0.2.86 (KeyError:
    'fname' with the 0.2.111 this project pins), its CSV reader works with any."""
    per_shard = 256 if s["batch"] >= 256 else 32
    data = make_digits_dataset(tmp / "shards", n_train=min(1536, per_shard * 6), n_val=16, shard_size=per_shard,
                               image_size=s["image"])
    files, rows = tmp / "jpgs", []
    files.mkdir(exist_ok=True)
    for shard in sorted((data / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name, member in members.items():
                if name.endswith(".jpg"):
                    (files / name).write_bytes(tar.extractfile(member).read())
                    caption = tar.extractfile(members[name[:-4] + ".txt"]).read().decode().replace("\t", " ")
                    rows.append(f"{files / name}\t{caption}")
    csv = tmp / "train.csv"  # repeated so that one epoch is exactly the benchmark's steps
    csv.write_text("filepath\ttitle\n" + "\n".join(rows[i % len(rows)] for i in range(s["batch"] * s["steps"])) + "\n")
    return data, csv


def ours_real(data: Path, tmp: Path, s: dict, limit: float) -> float:
    """This trainer on the real shards (bf16, ``workers`` loader workers): median samples/s of steps after the
    first third, the process SIGKILLed once ``steps`` steps are logged (or after ``limit`` s: an error)."""
    run_dir = tmp / "ours_real"
    args = ["--config", str(ROOT / "configs" / "pretrain_clip.yaml"), f"data.path={data}", f"run.run_dir={run_dir}",
            f"model.name={s['model']}", f"model.force_image_size={s['image']}", f"data.global_batch_size={s['batch']}",
            f"data.num_workers={s['workers']}", "optim.steps=1000000", "checkpoint.every_steps=1000000",
            "checkpoint.export=false", "logging.progress_bar=false", "logging.tensorboard=false",
            "zero.precision=bf16", "zero.bf16_mode=autocast"]
    (proc,) = launch_ranks(tmp, "ours_real", 1, args, threads=s["threads"], extra_env=check_env())
    metrics, deadline, rows = run_dir / "metrics.jsonl", time.monotonic() + limit, []
    while proc.poll() is None and time.monotonic() < deadline:
        rows = metrics.read_text().splitlines() if metrics.is_file() else []
        if len(rows) >= s["steps"]:
            break
        time.sleep(0.2)
    proc.kill()
    code = wait_ranks([proc])[0]
    if len(rows) < s["steps"]:
        raise RuntimeError(f"this trainer logged {len(rows)} of {s['steps']} steps (exit {code}) in {limit:.0f} s: "
                           f"{log_tail(tmp, 'ours_real')}")
    rates = [json.loads(l)["samples_per_s"] for l in rows[:s["steps"]]]
    return statistics.median(rates[len(rates) // 3:])


def open_clip_real(log_dir: Path, csv: Path, s: dict, limit: float) -> float:
    """open_clip_train on the same JPEGs (CSV dataset): the synthetic-data call with --train-data instead."""
    args = [sys.executable, "-m", "open_clip_train.main", "--model", s["model"], "--force-image-size", str(s["image"]),
            "--train-data", str(csv), "--dataset-type", "csv", "--csv-img-key", "filepath", "--csv-caption-key",
            "title", "--batch-size", str(s["batch"]), "--precision", "amp_bf16", "--device", s["device"],
            "--epochs", "1", "--workers", str(s["workers"]), "--log-every-n-steps", "1", "--logs", str(log_dir),
            "--name", "real", "--save-frequency", "0", "--report-to", "", "--warmup", "2", "--lr", "5e-4",
            "--grad-clip-norm", "1.0"]
    return run_open_clip_train(args, log_dir, s["threads"], "open_clip_train (JPEG files)", timeout=limit)


def rows(tmp: Path, s: dict, budget: Budget) -> dict:
    """The three subprocess rows (samples/s); a row that fails is reported as its error, the others still run."""
    check_env()
    data, csv = shards_for(tmp, s)
    out, errors = {}, {}
    calls = {
        "open_clip_train synthetic": lambda limit: open_clip_train(
            _fresh(tmp / "oc_syn"), s["model"], s["image"], s["batch"], s["steps"], s["threads"], device=s["device"],
            precision="amp_bf16", workers=s["workers"], timeout=limit),
        "this trainer, real shards": lambda limit: ours_real(data, tmp, s, limit),
        "open_clip_train, real shards": lambda limit: open_clip_real(_fresh(tmp / "oc_real"), csv, s, limit),
    }
    for name, call in calls.items():
        limit = min(s["run_s"], budget.left())
        if limit < 5:
            errors[name] = "skipped: the part's budget is spent"
            continue
        try:
            out[name] = call(limit)
        except Exception as err:  # noqa: BLE001 (the row's error is its result)
            errors[name] = f"{type(err).__name__}: {str(err)[-2500:]}"
    if errors and not out:
        raise RuntimeError("; ".join(f"{k}: {v}" for k, v in errors.items()))
    return {"samples_per_s": out, "errors": errors, "ok": not errors}


def _fresh(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
