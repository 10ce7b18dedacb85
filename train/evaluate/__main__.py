"""CLI.

    python -m train.evaluate --checkpoint PATH|RUN_DIR [--config FILE] [key=value ...]
    python -m train.evaluate compare RUN_DIR... --out DIR

The first evaluates one model (EvalConfig fields as overrides, e.g. ``max_samples=1000``) on a dataset in this
project's format or CLIP_benchmark's webdataset format (``dataset=ROOT``, local or remote), and writes
eval.json, eval.md and the plots to ``out_dir`` (default RUN_DIR/eval); the second puts evaluated runs
side by side. A user mistake (bad key or value, missing dataset folder, split, reference dataset or
checkpoint) ends with one line on stderr and exit code 2, checked before the model is loaded.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from common.cli import run_entry_point
from common.config_loader import load_config
from common.shard_folder import read_manifest
from train.data.shard_source import is_remote

from .compare import compare
from .config import EvalConfig, EvalInputError
from .core import evaluate
from .datasets import open_eval_set
from .data import load_model
from .report import write_eval_outputs



def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _split_size(folder: str, split: str, what: str) -> int:
    """Samples in ``folder``'s ``split``; EvalInputError naming ``what`` if the folder or split is missing."""
    try:
        manifest = read_manifest(folder)
    except (FileNotFoundError, ValueError, OSError) as err:
        raise EvalInputError(f"{what}={folder}: {err}") from None
    if split not in manifest.splits:
        raise EvalInputError(f"{what}={folder} has no split '{split}' (has: {', '.join(sorted(manifest.splits))})")
    # Local shards are stat'ed now, not found missing minutes into the run. Evaluation never skips a missing
    # or damaged shard (the numbers would silently cover fewer samples): data.iter_samples raises too.
    check_local_shards(manifest.shard_paths(split), f"{what}={folder}", split, "listed in its manifest.json")
    return manifest.splits[split].num_samples


def check_local_shards(urls, what: str, split: str, listed: str) -> None:
    """EvalInputError naming the first local shard of ``urls`` that is missing (remote ones are read later)."""
    missing = [p for p in urls if not is_remote(p) and not os.path.isfile(p.removeprefix("file://"))]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise EvalInputError(f"{what}: shard {missing[0]}{more} of split '{split}' is {listed} but missing: "
                             "restore it or rebuild the dataset")


def check_inputs(cfg: EvalConfig) -> None:
    """The dataset folders and splits a user names, checked before the (slow) model load."""
    eval_set = open_eval_set(cfg.dataset, cfg.split, storage_options=cfg.storage_options or None)
    if eval_set.format == "clip_benchmark":
        check_local_shards(eval_set.shard_urls, f"dataset={cfg.dataset}", cfg.split,
                           f"counted in {cfg.split}/nshards.txt ({len(eval_set.shard_urls)})")
    else:
        available = _split_size(cfg.dataset, cfg.split, "dataset")
        if available == 0:
            raise EvalInputError(f"dataset={cfg.dataset}: split '{cfg.split}' has no samples")
        if cfg.max_samples > available:    # like `head -n`: evaluate what there is, and say so once
            print(f"note: max_samples={cfg.max_samples} > {available} samples in {cfg.split}; evaluating all "
                  f"{available}", file=sys.stderr)
    if cfg.reference_dataset:
        for split in (cfg.reference_split, cfg.calibration_split):
            _split_size(cfg.reference_dataset, split, "reference_dataset")


def main_evaluate(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="RUN_DIR (uses its export/), an export folder (open_clip's hub layout) or a weights file")
    parser.add_argument("--config", default=None, help="YAML file of EvalConfig fields")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of EvalConfig fields")
    args = parser.parse_args(argv)
    cfg = load_config(EvalConfig, args.config, args.overrides)
    check_inputs(cfg)    # load_model checks the checkpoint before it builds anything
    model, eval_transform, tokenizer, run_dir = load_model(args.checkpoint, cfg.model_name, cfg.model_config,
                                                           pick_device(cfg.device))
    out_dir = Path(cfg.out_dir) if cfg.out_dir else (run_dir / "eval" if run_dir else Path("eval"))
    # A shard that vanishes or is damaged while it is read is an EvalInputError too: one line, exit 2.
    results = evaluate(model, eval_transform, tokenizer, cfg, progress=lambda msg: print(msg, flush=True))
    results["model"]["checkpoint"] = str(args.checkpoint)
    title = f"Evaluation of {run_dir.name if run_dir else Path(args.checkpoint).name}"
    for path in write_eval_outputs(results, out_dir, run_dir, title):
        print(f"wrote {path}")
    return 0


def main_compare(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate compare",
                                     description="Side-by-side table of evaluated runs")
    parser.add_argument("runs", nargs="+", help="RUN_DIRs (each with eval/eval.json); the first group is the baseline")
    parser.add_argument("--out", required=True, help="output folder for compare.md/.json and metric_bars.png")
    args = parser.parse_args(argv)
    try:
        compare(args.runs, args.out)
    except OSError as err:    # --out not writable
        raise EvalInputError(f"--out {args.out}: {err}") from None
    print(f"wrote {args.out}/compare.md, compare.json, metric_bars.png")
    return 0


def _dispatch(argv) -> int:
    if argv[:1] == ["compare"]:
        return main_compare(argv[1:])
    return main_evaluate(argv)


def main(argv=None) -> int:
    """`python -m train.evaluate ...`; a user error is one line and exit 2 (common/cli.py)."""
    return run_entry_point(_dispatch, sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
