"""CLI.

    python -m train.evaluate --checkpoint PATH|RUN_DIR [--config FILE] [key=value ...]
    python -m train.evaluate compare RUN_DIR... --out DIR

The first evaluates one model (EvalConfig fields as overrides, e.g. ``max_samples=1000``) and writes
eval.json, eval.md and the plots to ``out_dir`` (default RUN_DIR/eval); the second puts evaluated runs
side by side.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from common.config_loader import ConfigError, load_config

from .compare import compare
from .config import EvalConfig
from .core import evaluate
from .data import load_model
from .report import write_eval_outputs


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def main_evaluate(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="RUN_DIR (uses export/) or a state-dict file")
    parser.add_argument("--config", default=None, help="YAML file of EvalConfig fields")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of EvalConfig fields")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(EvalConfig, args.config, args.overrides)
    except (ConfigError, ValueError) as err:
        parser.error(str(err))
    device = pick_device(cfg.device)
    model, eval_transform, tokenizer, run_dir = load_model(args.checkpoint, cfg.model_name, cfg.model_config, device)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else (run_dir / "eval" if run_dir else Path("eval"))
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
    compare(args.runs, args.out)
    print(f"wrote {args.out}/compare.md, compare.json, metric_bars.png")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["compare"]:
        return main_compare(argv[1:])
    return main_evaluate(argv)


if __name__ == "__main__":
    sys.exit(main())
