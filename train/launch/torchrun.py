"""`python -m train.launch.torchrun [TORCHRUN ARGS] -m train --config FILE ...`: torchrun that keeps exit 3.

torchrun reports any non-zero worker exit as a failure and exits 1 (pytorch/pytorch#20728), so the
trainer's EXIT_REQUEUE (3: stopped with a checkpoint, requeue me, after a stop signal or
run.stop_after_steps) never reaches the scheduler. This wrapper runs torchrun unchanged (all arguments pass
through) with ``TRAIN_EXIT_DIR`` set to a fresh folder; ``python -m train`` writes ``rank-<RANK>`` there
("<exit code> <world size>", train/__main__.py) as it leaves. When torchrun fails and every rank of the world asked for a
requeue, the wrapper exits 3; otherwise torchrun's own code. SIGTERM/SIGUSR1/SIGINT to the wrapper go to
torchrun (which passes them to its workers); a second one is forwarded too, never a kill of the wrapper.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from common.errors import EXIT_REQUEUE

EXIT_DIR_ENV = "TRAIN_EXIT_DIR"


def all_ranks_requeue(folder: Path) -> bool:
    """True when every rank of the world wrote EXIT_REQUEUE (a missing or other rank means a real failure)."""
    markers = [p.read_text().split() for p in folder.glob("rank-*")]
    if not markers:
        return False
    world = int(markers[0][1])
    return len(markers) == world and all(int(code) == EXIT_REQUEUE for code, _ in markers)


def main(argv: list[str]) -> int:
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    with tempfile.TemporaryDirectory(prefix="train-exit-") as folder:
        proc = subprocess.Popen(cmd + argv, env=dict(os.environ, **{EXIT_DIR_ENV: folder}))
        for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(signum, lambda s, _f: proc.poll() is None and proc.send_signal(s))
        code = proc.wait()
        if code != 0 and all_ranks_requeue(Path(folder)):
            print(f"torchrun exited {code}, but every rank stopped with a checkpoint: exit {EXIT_REQUEUE} "
                  "(requeue me)", file=sys.stderr, flush=True)
            return EXIT_REQUEUE
        return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
