"""The shared core of ``pipeline/`` and ``train/``: what both stages must agree on, written once.

- ``config_loader``: YAML files + ``key=value`` overrides into typed dataclass configs (OmegaConf).
- ``atomic_files``: write-then-rename, so a crash never leaves a half-written file under its real name.
- ``shard_folder``: the dataset folder contract (manifest, shards, per-shard sample index).
- ``jobs``: the launcher contract (the requeue exit code, the resume-after-requeue rule), readable from
  shell scripts through ``python -m common.jobs``.

No module here imports torch, DeepSpeed or img2dataset, so every stage, launcher and script can use them.
"""
