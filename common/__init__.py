"""The shared core of ``pipeline/`` and ``train/``: what both stages must agree on, written once.

- ``config_loader``: YAML files + ``key=value`` overrides into typed dataclass configs (OmegaConf).
- ``validation``: the one bounds/choices checker of every schema; NaN and ±inf refused in every number.
- ``errors``: ``UserError`` (``ConfigError``, ``InputError``) and every exit code; ``cli``: the one
  entry-point wrapper (a user error is one line and exit 2).
- ``net`` (``free_port``), ``paths`` (the repository's folders).
- ``atomic_files``: write-then-rename, so a crash never leaves a half-written file under its real name.
- ``shard_folder``: the dataset folder contract (manifest, shards, per-shard sample index).
- ``jobs``: the launcher contract (the requeue exit code, the resume-after-requeue rule), readable from
  shell scripts through ``python -m common.jobs``.

No module here imports torch, DeepSpeed or img2dataset, so every stage, launcher and script can use them.
"""
