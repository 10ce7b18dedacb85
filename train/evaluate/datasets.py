"""The evaluation sets `python -m train.evaluate` and the trainer's periodic zero-shot read, in either format:

* **this project's dataset folder**: ``manifest.json`` + shards, labels in each sample's ``json``,
  ``classnames.txt`` beside the manifest (common/shard_folder.py);
* **CLIP_benchmark's webdataset format** (``clip_benchmark/datasets/builder.py: build_wds_dataset``), the form
  in which ImageNet-1k and its variants, VTAB, COCO and Flickr are distributed for CLIP evaluation::

      ROOT/classnames.txt                          one class name per line (classification)
      ROOT/zeroshot_classification_templates.txt   one prompt per line, ``{c}`` = the class name
      ROOT/dataset_type.txt                        optional: ``retrieval`` or ``multilabel`` (else classification)
      ROOT/SPLIT/nshards.txt                       N: the shards are SPLIT/0.tar … SPLIT/{N-1}.tar
      sample members: image ``webp``/``png``/``jpg``/``jpeg`` (the first present, in that order), label ``cls``
      (an ASCII integer), or for retrieval ``txt`` with one caption per line (several captions per image).

Both are read from a local folder, ``file://``, ``http(s)://``, ``s3://``, ``gs://`` or a ``pipe:`` command, in
shard order, in one process. Multilabel sets (``npy`` labels, mean average precision) are refused in one line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, List, Optional

from common.shard_folder import read_manifest, read_text_at
from train.data.decode import decode_image
from train.data.shard_source import join

from .config import EvalInputError
from .data import Sample, _tar_samples, iter_samples

BENCHMARK_IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")
"""The image members CLIP_benchmark's reader accepts, in the order it takes them."""


@dataclass
class EvalSet:
    """One split of an evaluation dataset, opened (its metadata read, its samples not yet)."""

    location: str
    """The dataset folder or URL, as the user gave it."""
    split: str
    """The split evaluated."""
    format: str
    """``manifest`` (this project's folders) or ``clip_benchmark`` (CLIP_benchmark's webdataset format)."""
    task: str
    """``classification``, ``retrieval`` or (manifest folders, which may carry both) ``auto``."""
    classnames: Optional[List[str]] = None
    """The dataset's class names, or None."""
    templates: Optional[List[str]] = None
    """The dataset's own zero-shot prompt templates (``{c}`` or ``{}`` = the class name), or None."""
    num_samples: Optional[int] = None
    """Samples in the split when the format states it (manifest folders), else None."""
    shard_urls: List[str] = field(default_factory=list)
    """The split's shards, in order."""
    storage_options: Optional[dict] = None
    """fsspec options for remote locations."""

    def samples(self, max_samples: int = 0) -> Iterator[Sample]:
        """The split's samples in shard order, the first ``max_samples`` of them (0 = all). A missing or damaged
        shard raises EvalInputError naming it: evaluation numbers never silently cover fewer samples."""
        if self.format == "manifest":
            yield from iter_samples(self.location, self.split, max_samples, self.storage_options)
            return
        count = 0
        for url in self.shard_urls:
            for raw in _tar_samples(url, self.storage_options):
                if max_samples and count >= max_samples:
                    return
                count += 1
                yield self._benchmark_sample(raw, url)

    def _benchmark_sample(self, raw: dict, url: str) -> Sample:
        ext = next((e for e in BENCHMARK_IMAGE_EXTS if e in raw), None)
        if ext is None:
            raise EvalInputError(f"sample {raw['__key__']} in {url} has no image member "
                                 f"({'/'.join(BENCHMARK_IMAGE_EXTS)}; it has {sorted(k for k in raw if k != '__key__')})")
        image = decode_image(raw[ext])
        if self.task == "retrieval":
            if "txt" not in raw:
                raise EvalInputError(f"sample {raw['__key__']} in {url} has no txt member (captions of a retrieval set)")
            captions = raw["txt"].decode("utf-8").splitlines()    # CLIP_benchmark: str.splitlines
            if not captions:
                raise EvalInputError(f"sample {raw['__key__']} in {url} has an empty txt member (no caption)")
            return Sample(key=raw["__key__"], image=image, label=None, caption=captions[0], captions=captions)
        if "cls" not in raw:
            raise EvalInputError(f"sample {raw['__key__']} in {url} has no cls member (the label of a "
                                 "classification set)")
        try:
            label = int(raw["cls"].decode("utf-8").strip())
        except ValueError:
            raise EvalInputError(f"sample {raw['__key__']} in {url}: cls member {raw['cls'][:20]!r} is not an "
                                 "integer label") from None
        return Sample(key=raw["__key__"], image=image, label=label, caption=None)


def is_benchmark_set(location: str, split: str, storage_options: Optional[dict] = None) -> bool:
    """True if ``location`` has ``SPLIT/nshards.txt`` (CLIP_benchmark's webdataset format)."""
    try:
        read_text_at(location, f"{split}/nshards.txt", storage_options)
        return True
    except FileNotFoundError:
        return False


def open_eval_set(location: str, split: str, what: str = "dataset",
                  storage_options: Optional[dict] = None) -> EvalSet:
    """Open ``split`` of a dataset in either format. EvalInputError (one line, naming ``what``) if it is
    neither, or the split is missing or empty."""
    location = str(location)
    if is_benchmark_set(location, split, storage_options):
        return _open_benchmark(location, split, what, storage_options)
    try:
        manifest = read_manifest(location, storage_options)
    except (FileNotFoundError, ValueError, OSError) as err:
        benchmark_hint = ""
        if _has_benchmark_metadata(location, storage_options):
            benchmark_hint = f" (a CLIP_benchmark dataset, but it has no {split}/nshards.txt: no split '{split}')"
        raise EvalInputError(f"{what}={location}: neither this project's dataset folder nor a CLIP_benchmark "
                             f"webdataset folder{benchmark_hint} ({' '.join(str(err).split())[:200]})") from None
    if split not in manifest.splits:
        raise EvalInputError(f"{what}={location} has no split '{split}' (has: {', '.join(sorted(manifest.splits))})")
    return EvalSet(location, split, "manifest", "auto", classnames=manifest.classnames(storage_options),
                   num_samples=manifest.splits[split].num_samples, shard_urls=manifest.shard_paths(split),
                   storage_options=storage_options)


def _has_benchmark_metadata(location: str, storage_options: Optional[dict]) -> bool:
    for name in ("classnames.txt", "dataset_type.txt", "zeroshot_classification_templates.txt"):
        try:
            read_text_at(location, name, storage_options)
            return True
        except (FileNotFoundError, OSError):
            continue
    return False


def _optional_lines(location: str, name: str, storage_options: Optional[dict]) -> Optional[List[str]]:
    try:
        lines = [line.strip() for line in read_text_at(location, name, storage_options).splitlines()]
    except FileNotFoundError:
        return None
    return [line for line in lines if line] or None


def _open_benchmark(location: str, split: str, what: str, storage_options: Optional[dict]) -> EvalSet:
    raw = read_text_at(location, f"{split}/nshards.txt", storage_options).strip()
    try:
        nshards = int(raw)
    except ValueError:
        raise EvalInputError(f"{what}={location}: {split}/nshards.txt holds {raw[:30]!r}, not a shard count") from None
    if nshards < 1:
        raise EvalInputError(f"{what}={location}: {split}/nshards.txt says {nshards} shards: split '{split}' is empty")
    kind = (_optional_lines(location, "dataset_type.txt", storage_options) or ["classification"])[0].lower()
    if kind == "multilabel":
        raise EvalInputError(f"{what}={location} is a multilabel CLIP_benchmark set (npy labels, mean average "
                             "precision): not supported by this evaluator; use clip_benchmark eval for it")
    task = "retrieval" if kind == "retrieval" else "classification"
    classnames = _optional_lines(location, "classnames.txt", storage_options)
    templates = _optional_lines(location, "zeroshot_classification_templates.txt", storage_options)
    urls = [join(location, f"{split}/{i}.tar") for i in range(nshards)]
    return EvalSet(location, split, "clip_benchmark", task, classnames=classnames, templates=templates,
                   shard_urls=urls, storage_options=storage_options)
