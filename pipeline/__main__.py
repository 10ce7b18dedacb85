"""`python -m pipeline`: the ingestion stages, together or one at a time.

  run       --urls FILE|DIR --out OUT [--config YAML] [key=value ...]   every stage
  demo      --out data/fmnist [--fast] [--port N]                        embedded Fashion-MNIST, offline
  parts     --urls FILE|DIR --out OUT       register + normalise the input parts and drop duplicate URLs
                                            (before any download); print their count (array size)
  part      --out OUT --index I             input + download + filter + scatter of part I (an array task)
  global    --out OUT                       dedup + reshard + finalize (after all parts)
  dedup     --out OUT [--partition P]       the two dedup passes (or one partition of each)
  reshard   --out OUT [--partition P]       final shards (or one partition)
  finalize  --out OUT                       summary.json + manifest.json
  serve     DIR [--port N]                  serve a folder on 127.0.0.1 (for trials with local files)
  index     --shards SPEC [--shards SPEC ...] --out DIR [--split NAME] [--subset FILE] [workers=N]
            [storage_options={...}]         a manifest for shards you already have (img2dataset, DataComp,
                                            LAION, CC12M), read where they are (pipeline/index.py)

A stage run alone reads the config saved in OUT/_work/config.yaml by the first command.
A user error (missing file, bad column, bad config) ends with one line on stderr and exit code 2;
--debug (anywhere on the line) shows the traceback instead.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # before anything can import img2dataset

from omegaconf import OmegaConf  # noqa: E402

from pipeline import run as stages  # noqa: E402
from common.config_loader import ConfigError, flat_fields, load_config, to_dict, to_yaml  # noqa: E402
from common.atomic_files import atomic_write_text  # noqa: E402
from pipeline.stages.read_input import InputError, list_input_files  # noqa: E402
from pipeline.settings import IngestConfig  # noqa: E402
from common.cli import run_entry_point  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "configs" / "shards_demo.yaml"


# Settings that change how fast the work runs, never what it writes: a rerun may change them.
RERUN_FREE = {"num_workers", "download.processes_count", "download.thread_count"}


def check_unchanged(saved: Path, cfg: IngestConfig) -> None:
    """A work folder resumes only with the settings it started with (mixed settings would mix shards)."""
    before = flat_fields(to_dict(load_config(IngestConfig, saved)))
    after = flat_fields(to_dict(cfg))
    changed = sorted(k for k in before.keys() | after.keys() if k not in RERUN_FREE and before.get(k) != after.get(k))
    if changed:
        first = changed[0]
        raise InputError(f"{saved}: settings changed since this work folder was started ({', '.join(changed)}; "
                         f"{first} was {before.get(first)!r}, now {after.get(first)!r}); use a new OUT or delete "
                         f"{saved.parent}")


def resolve_config(args, out: Path) -> IngestConfig:
    """--config + overrides on the first command; afterwards the saved copy, unless given again (then it must
    match the saved one, except for RERUN_FREE)."""
    saved = stages.work_dir(IngestConfig(), out) / "config.yaml"
    path = args.config
    if path is None and saved.exists():
        path = saved
    cfg = load_config(IngestConfig, path, args.overrides)
    # Until a part is normalised no output depends on the settings: a run stopped by a setting error
    # (say input.url_col) may be rerun with the fix in the same OUT.
    if saved.exists() and (args.config or args.overrides) and any(saved.parent.glob("input/part-*.json")):
        check_unchanged(saved, cfg)
    work = stages.work_dir(cfg, out)
    work.mkdir(parents=True, exist_ok=True)
    if not saved.exists() or args.config or args.overrides:
        atomic_write_text(work / "config.yaml", to_yaml(cfg))  # array tasks may race here
    return cfg


def cmd_demo(args) -> None:
    from pipeline.demo.source import build_source, demo_sizes, write_classnames
    from pipeline.demo.http_server import LoopbackServer

    out = Path(args.out)
    source = Path(f"{out}_source")
    test_out = Path(f"{out}_test")
    cfg = load_config(IngestConfig, args.config or DEMO_CONFIG, args.overrides)
    test_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cfg), {
        "reshard": {"train_split": "test", "val_fraction": 0.0}, "dedup": {"by_content": False}}))
    sizes = demo_sizes(args.fast)
    sizes = {"train": args.train_per_class or sizes["train"], "test": args.test_per_class or sizes["test"]}
    # A fixed port keeps the URL list identical between runs, so a rerun resumes instead of re-downloading.
    try:
        server_context = LoopbackServer(source / "images", port=args.port)
    except OSError as err:
        raise SystemExit(f"cannot serve the demo images on 127.0.0.1:{args.port} ({err}); "
                         "pass --port N (make shards ARGS='--port N') with a free port") from err
    with server_context as server:
        print(f"serving {source / 'images'} at {server.base_url}")
        for split, dataset, split_cfg in (("train", out, cfg), ("test", test_out, test_cfg)):
            urls = build_source(source, split, server.base_url, sizes[split], seed=cfg.reshard.seed)
            print(f"== Fashion-MNIST {split}: {urls}")
            stages.run_all(urls, dataset, split_cfg)
            write_classnames(dataset)
    print(f"train/val: {out}   held-out test: {test_out}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "demo", "parts", "part", "global", "dedup", "reshard", "finalize"):
        p = sub.add_parser(name)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        p.add_argument("--out", required=True, help="dataset folder to write")
        p.add_argument("--config", default=None, help="YAML config (see configs/shards_*.yaml)")
        p.add_argument("overrides", nargs="*", help="key=value config overrides")
        if name in ("run", "parts"):
            p.add_argument("--urls", required=True, help="URL list file, or a folder of parts")
        elif name != "demo":  # accepted (and unused) so that one argument list serves every stage
            p.add_argument("--urls", default=None, help=argparse.SUPPRESS)
        if name == "part":
            p.add_argument("--index", type=int, required=True)
        if name in ("dedup", "reshard"):
            p.add_argument("--partition", type=int, default=None, help="one partition (an array task)")
        if name == "dedup":
            p.add_argument("--pass", dest="dedup_pass", choices=["url", "content"], default=None,
                           help="with --partition: which pass (all url partitions before any content one)")
        if name == "demo":
            p.add_argument("--fast", action="store_true", help="500 train / 100 test images per class")
            p.add_argument("--port", type=int, default=18765, help="loopback port of the demo server")
            p.add_argument("--train-per-class", type=int, default=None, help="subset size (default: all)")
            p.add_argument("--test-per-class", type=int, default=None, help="subset size (default: all)")
    p = sub.add_parser("index", help="a manifest for existing WebDataset shards, read in place")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--shards", action="append", required=True,
                   help="folder, glob or brace pattern; local, file://, http(s)://, s3://, gs:// or pipe: (repeatable)")
    p.add_argument("--out", required=True, help="folder for manifest.json and the sample indexes")
    p.add_argument("--split", default=None, help="split name (default train; also split=NAME)")
    p.add_argument("--subset", default=None, help="keep only these samples: DataComp .npy uids, .parquet (uid or "
                   "key column) or text, one id per line")
    p.add_argument("overrides", nargs="*", help="workers=N, storage_options={...}, split=NAME")
    p = sub.add_parser("serve")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("folder")
    p.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if "--debug" in (args.overrides if hasattr(args, "overrides") else []):
        args.overrides.remove("--debug")  # after a positional, argparse hands it to overrides
        args.debug = True
    # A user mistake: one line (common/cli.py); --debug shows the traceback too.
    return run_entry_point(lambda _: dispatch(args), user_errors=OS_USER_ERRORS, debug=args.debug,
                           hint="  (--debug shows the traceback)")


# Besides UserError (ConfigError, InputError, EmptyDatasetError): the OS errors of a path the user gave.
# Anything else is a bug and shows its traceback.
OS_USER_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def dispatch(args) -> int | None:
    if args.command == "serve":
        from pipeline.demo.http_server import LoopbackServer

        if not Path(args.folder).is_dir():
            raise InputError(f"serve {args.folder}: no such folder")

        with LoopbackServer(args.folder, port=args.port) as server:
            print(f"serving {args.folder} at {server.base_url} (Ctrl-C stops)")
            while True:
                time.sleep(3600)
    if args.command == "demo":
        return cmd_demo(args)
    if args.command == "index":
        from pipeline.index import main as index_main

        return index_main(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; it must be a dataset folder (new or started by this command)")
    saved = stages.work_dir(IngestConfig(), out) / "config.yaml"
    if args.command not in ("run", "parts") and not saved.exists() and args.config is None:
        raise InputError(f"{out} is not a started ingestion folder (no {saved}): run `python -m pipeline parts "
                         f"--urls URLS --out {out}` (or `run`) first")
    if args.command in ("run", "parts"):
        list_input_files(args.urls)    # a missing URL list is refused before OUT is created
    cfg = resolve_config(args, out)
    work = stages.work_dir(cfg, out)
    if args.command == "run":
        stages.run_all(args.urls, out, cfg)
    elif args.command == "parts":
        print(len(stages.prepare_parts(args.urls, cfg, work)))
    elif args.command == "part":
        stages.run_part(args.index, stages.registered_parts(work), cfg, work)
    elif args.command == "global":
        n = len(stages.registered_parts(work))
        stages.run_dedup(n, cfg, work)
        stages.run_reshard(cfg, work, out)
        stages.run_finalize(n, cfg, work, out)
    elif args.command == "dedup":
        n = len(stages.registered_parts(work))
        if args.partition is None:
            stages.run_dedup(n, cfg, work)
        elif args.dedup_pass is None:
            raise InputError("dedup --partition needs --pass url|content (all url partitions before any content one)")
        else:
            stages.dedup_partition(args.partition, args.dedup_pass, n, cfg, work)
    elif args.command == "reshard":
        stages.run_reshard(cfg, work, out, only=args.partition)
    elif args.command == "finalize":
        stages.run_finalize(len(stages.registered_parts(work)), cfg, work, out)
    return None


if __name__ == "__main__":
    sys.exit(main())
