"""Every exit code of this project's entry points and the base class of a user mistake, written once.

A ``UserError`` is something the user can fix (a bad config value, a missing dataset folder or checkpoint,
a malformed input file): every entry point prints it as one line and exits with ``EXIT_USER_ERROR``,
through ``common.cli.run_entry_point``. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

EXIT_OK = 0
"""Done."""
EXIT_ABORTED = 1
"""The run aborted for a reason it names in one line (e.g. ``optim.max_nonfinite_steps`` NaN losses in a row)."""
EXIT_USER_ERROR = 2
"""A user mistake, found before work started where it can be: one line on stderr, nothing changed."""
EXIT_REQUEUE = 3
"""A training stopped on a signal (or ``run.stop_after_steps``) after saving a checkpoint: requeue it.
Shell scripts read it through ``python -m common.jobs exit-requeue``; launchers requeue on it alone."""


class UserError(Exception):
    """A mistake the user can fix; its message is one line that names the key, file or path at fault."""

    label = "error"
    """The word before the message on stderr (``error: ...``)."""


class ConfigError(UserError, ValueError):
    """A config file or override that does not fit its schema (unknown key, wrong type, out of bounds).

    Also a ValueError, so callers that catch ValueError around a config keep working."""

    label = "config error"


class InputError(UserError, ValueError):
    """A path or file the user pointed at that cannot be used (a missing dataset folder, run folder or
    checkpoint, a damaged manifest, an unreadable URL list)."""
