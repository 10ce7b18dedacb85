"""The shard folder format: the interface between ingestion and training/evaluation.

A finished dataset folder looks like::

    OUT/
      manifest.json          # this module's Manifest, written last (its presence means "complete")
      summary.json           # row accounting of the run that built it (see pipeline.summary)
      classnames.txt         # optional: one class name per line (classification sets)
      train/000000.tar ...   # WebDataset shards: {key}.jpg, {key}.txt (caption), {key}.json (metadata)
      train.wids.json        # wids shard index of the split (random access for exact resume)
      val/000000.tar ...
      val.wids.json

Sample keys are 14-digit strings, unique across the dataset and stable across reruns. The per-sample
``.json`` holds at least ``key``, ``url``, ``caption``, ``sha256``, ``width``, ``height`` and any extra
input columns the user asked to keep (the demo keeps ``label`` and ``class_name``).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


@dataclass
class ShardInfo:
    path: str
    """Tar path relative to the dataset folder."""
    num_samples: int
    sha256: str = ""
    """Checksum of the tar file (empty if not computed)."""


@dataclass
class SplitInfo:
    shards: List[ShardInfo] = field(default_factory=list)
    wids_index: str = ""
    """Relative path of the split's wids index JSON."""

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)


@dataclass
class Manifest:
    splits: Dict[str, SplitInfo] = field(default_factory=dict)
    fields: Dict[str, str] = field(default_factory=lambda: {"image": "jpg", "caption": "txt", "metadata": "json"})
    seed: int = 0
    version: int = FORMAT_VERSION
    root: str = ""
    """Absolute folder the manifest was read from (not stored)."""

    def shard_paths(self, split: str) -> List[str]:
        """Absolute tar paths of a split, in order."""
        return [os.path.join(self.root, s.path) for s in self.split(split).shards]

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise KeyError(f"split '{name}' not in manifest {self.root}/{MANIFEST_NAME} "
                           f"(has: {sorted(self.splits)})")
        return self.splits[name]

    def wids_index_path(self, split: str) -> str:
        return os.path.join(self.root, self.split(split).wids_index)

    def classnames(self) -> List[str] | None:
        path = Path(self.root) / "classnames.txt"
        return path.read_text().splitlines() if path.is_file() else None


def read_manifest(folder: str | os.PathLike) -> Manifest:
    folder = Path(folder).resolve()
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a finished dataset folder (run `make shards` first)")
    raw = json.loads(path.read_text())
    if raw.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported manifest version {raw.get('version')!r}")
    splits = {
        name: SplitInfo(shards=[ShardInfo(**s) for s in info["shards"]], wids_index=info.get("wids_index", ""))
        for name, info in raw["splits"].items()
    }
    return Manifest(splits=splits, fields=raw.get("fields", {}), seed=raw.get("seed", 0),
                    version=raw["version"], root=str(folder))


def write_manifest(folder: str | os.PathLike, manifest: Manifest) -> Path:
    """Write the split wids indexes, then manifest.json atomically (it marks the folder complete)."""
    folder = Path(folder)
    for name, split in manifest.splits.items():
        split.wids_index = split.wids_index or f"{name}.wids.json"
        index = {"wids_version": 1, "name": name,
                 "shardlist": [{"url": s.path, "nsamples": s.num_samples} for s in split.shards]}
        atomic_write_text(folder / split.wids_index, json.dumps(index, indent=1))
    data = asdict(manifest)
    data.pop("root")
    for name, split in manifest.splits.items():
        data["splits"][name]["num_samples"] = split.num_samples
    return atomic_write_text(folder / MANIFEST_NAME, json.dumps(data, indent=1))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write to a temporary name, fsync, rename: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
