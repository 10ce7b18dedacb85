"""Training on shards this project did not make, and on mixtures: the loader side by side with its own shards.

* Indexed foreign shards: the same samples written as img2dataset writes them (``{shard}.tar`` plus
  ``{shard}_stats.json``, no sample index) in a folder the index never writes to, indexed in place by
  ``python -m pipeline index`` (counts from the stats files; the loader scans each tar's headers once per node),
  against the ingestion's own layout (manifest + per-shard sample index beside the tars).
* A mixture of 3 sources (``data.sources``, weights 2:1:1) holding the same samples as the one-source folder.

Same samples, transform (open_clip ViT-S-32 train preprocess), tokenizer, workers and batch in every row.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from benchmarks.bench_loader import BATCH, jpegs, make_dataset, ours
from common.paths import REPO_ROOT


def img2dataset_layout(own: Path, dest: Path) -> Path:
    """``own``'s train shards copied as img2dataset output: 00000.tar + 00000_stats.json, nothing else."""
    dest.mkdir(parents=True)
    for i, tar in enumerate(sorted((own / "train").glob("*.tar"))):
        target = dest / f"{i:05d}.tar"
        target.write_bytes(tar.read_bytes())
        with tarfile.open(target) as t:
            count = sum(1 for m in t.getmembers() if m.name.endswith(".jpg"))
        (dest / f"{i:05d}_stats.json").write_text(json.dumps({"count": count, "successes": count}))
    return dest


def index(shards: Path, out: Path) -> Path:
    n = len(list(shards.glob("*.tar")))
    cmd = [sys.executable, "-m", "pipeline", "index", "--shards", f"{shards}/{{00000..{n - 1:05d}}}.tar",
           "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO_ROOT,
                   env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    return out


def split_sources(images: list, root: Path, parts: int = 3) -> list:
    """``images`` split into ``parts`` datasets (22 shards each, the one-source folder's shard size)."""
    per = len(images) // parts
    return [make_dataset(root / f"part{p}", images[p * per:(p + 1) * per], 22) for p in range(parts)]


def run(quick: bool = False) -> str:
    import open_clip

    from benchmarks.bench_loader import WORKERS

    _, transform, _ = open_clip.create_model_and_transforms("ViT-S-32")
    tokenizer = open_clip.get_tokenizer("ViT-S-32")
    n, rounds = (2112, 2) if quick else (4224, 3)  # 66 shards: 3 sources x 22
    images = jpegs(n)
    speed: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        own = make_dataset(tmp / "own", images, 66)
        foreign = index(img2dataset_layout(own, tmp / "img2dataset"), tmp / "index")
        parts = split_sources(images, tmp / "mix")
        mix = {"sources": [{"path": str(p), "weight": w, "name": p.name} for p, w in zip(parts, (2, 1, 1))]}
        from train.config import DataSource

        mixture = [DataSource(**s) for s in mix["sources"]]
        for r in range(rounds):  # best of interleaved passes: the least disturbed one
            for name, path, extra in (("own", str(own), {}), ("foreign", str(foreign), {}),
                                      ("mix", "", {"sources": mixture})):
                cache = tmp / f"cache_{name}_{r}"  # a fresh cache: the foreign row pays its header scan every pass
                value, _ = ours(path, transform, tokenizer, n, cache_dir=str(cache), **extra)
                speed[name] = max(speed.get(name, 0), value)
    rows = [("this project's own shards (66 shards, sample index beside each)", "own", "1.00", ""),
            ("img2dataset shards indexed in place (stats files; tar headers scanned by the loader)", "foreign",
             f"{speed['foreign'] / speed['own']:.2f}", ">= 0.9"),
            ("3-source mixture, weights 2:1:1 (3 x 22 shards, the same samples)", "mix",
             f"{speed['mix'] / speed['own']:.2f}", ">= 0.9")]
    return "\n".join([
        "## Foreign shards and mixtures (python -m pipeline index, data.sources)", "",
        f"{n:,} samples (64x64 JPEG + caption), open_clip ViT-S-32 train preprocess + tokenizer, {WORKERS} DataLoader "
        f"workers, global batch {BATCH}, one epoch per pass from a fresh shard cache, best of {rounds} interleaved "
        "passes per row.", "",
        "| data | samples/s | vs own shards | target |", "|---|---|---|---|",
        *[f"| {label} | {speed[key]:.0f} | {ratio} | {target} |" for label, key, ratio, target in rows], "",
        "Index speed (shards/s from stats files and by scanning) is in the index section (bench_index).",
    ])


if __name__ == "__main__":
    print(run(quick=True))
