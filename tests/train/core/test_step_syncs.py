"""Host syncs per training step, counted on a CPU: at most one all-reduce and one device-to-host copy.

``torch.cuda.set_sync_debug_mode`` needs a GPU, so this counts, in a real 2-rank DeepSpeed training (gloo,
ZeRO-1, ``Trainer.fit`` in 2 processes, accumulation over 2 micro-batches, a record logged at every step), the
calls that make the host wait for a GPU when the trainer runs on one:

- device-to-host reads: ``Tensor.item``, ``.tolist``, ``.cpu``, ``.numpy``, and ``bool()``, ``float()``,
  ``int()``, ``format()`` of a tensor (a ``TorchFunctionMode`` sees them all);
- blocking host-to-device copies: ``torch.tensor`` / ``torch.as_tensor`` with ``device=`` (a tensor built from
  Python values on the device: a copy, then a wait for the stream, on CUDA);
- collectives: every ``c10d`` operator (a ``TorchDispatchMode`` sees ``c10d.allreduce_`` and the others) but
  the loss's functional collectives (``_c10d_functional``: the feature gathers and the Gram all-reduce are
  the loss's data, and their wait is a stream wait on NCCL, not a host one).

Only the calls this project's code makes count: those whose innermost caller outside torch is a file of
train/ or common/. DeepSpeed's own (its ZeRO step's gradient reduction, norm and overflow checks) are not
ours to change; the failure message lists them. ``.to(device)`` is not counted: on a CPU trainer it cannot
be told apart from a no-op. A step is everything from fetching its batch to fetching the next one (the loader's
position, ``trainer.loader.next_step``, marks it); steps 2 to N-1 are the steady state (the first warms up, the
last writes the final checkpoint). Before the single sync a step made 5 collectives, 7 reads and 5 blocking
copies here: the trainer 3 all-reduces (finiteness, stop, logging), 3 reads and 3 copies (the lr among them), the
loss one all-gather of the row counts per micro-batch with 2 reads and a copy each (this test failed on it).
"""
from __future__ import annotations

import collections
import itertools
import os
import sys

import pytest
import torch.multiprocessing as mp
import typing_extensions

from common.net import free_port
from common.paths import REPO_ROOT
from tests.harness.data_fixtures import make_digits_dataset

pytestmark = pytest.mark.slow
STEPS = 5
READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "__format__"}
OURS = tuple(str(REPO_ROOT / d) + os.sep for d in ("train", "common"))


def _caller(torch_dir: str) -> str:
    """'ours path:line' or 'other path:line' for the innermost frame outside torch and this file."""
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename.startswith(torch_dir) or frame.f_code.co_filename in
                                 (__file__, typing_extensions.__file__)):  # (its @deprecated is a wrapper)
        frame = frame.f_back
    if frame is None:
        return "other ?"
    path = frame.f_code.co_filename
    return f"{'ours' if path.startswith(OURS) else 'other'} {os.path.relpath(path, REPO_ROOT)}:{frame.f_lineno}"


def _count_in_trainer(rank: int, port: int, data: str, root: str, out) -> None:
    """Spawned: rank ``rank`` of 2 runs its trainer's fit() under the counting modes and puts
    (rank, final step, {(step, kind, caller): count}) on ``out``."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from common.config_loader import load_config
    from train.config import TrainConfig
    from train.core.trainer import Trainer

    torch.set_num_threads(1)
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    cfg = load_config(TrainConfig, REPO_ROOT / "configs" / "pretrain_cyclip.yaml", [
        f"data.path={data}", f"run.run_dir={root}/run", "data.global_batch_size=8", "data.accum_freq=2",
        "data.num_workers=1", f"optim.steps={STEPS}", "checkpoint.every_steps=1000", "checkpoint.export=false",
        "logging.every_steps=1", "logging.progress_bar=false", "logging.tensorboard=false", "zero.stage=1"])
    events = collections.Counter()
    trainer = None

    class Reads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = getattr(func, "__name__", "")
            kind = "read" if name in READS else "write" if name in ("tensor", "as_tensor") and "device" in kwargs else None
            if kind is not None and trainer is not None:
                events[(trainer.loader.next_step, kind, _caller(torch_dir))] += 1
            return func(*args, **kwargs)

    class Collectives(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "c10d" in str(func) and "_c10d_functional" not in str(func) and trainer is not None:
                events[(trainer.loader.next_step, "collective", _caller(torch_dir))] += 1
            return func(*args, **(kwargs or {}))

    trainer = Trainer(cfg)
    try:
        with Reads(), Collectives():
            summary = trainer.fit()
    finally:
        trainer.close()
    out.put((rank, summary["step"], dict(events)))


def test_one_all_reduce_and_one_device_to_host_copy_per_step(tmp_path):
    data = make_digits_dataset(tmp_path / "digits", n_train=64, n_val=16, shard_size=32)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_count_in_trainer, args=(rank, port, str(data), str(tmp_path), out))
             for rank in range(2)]
    for proc in procs:
        proc.start()
    try:
        results = sorted(out.get(timeout=600) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    assert [final_step for _, final_step, _ in results] == [STEPS, STEPS]
    for (rank, _, events), step in itertools.product(results, range(2, STEPS)):
        here = {(kind, caller): n for (s, kind, caller), n in events.items() if s == step}
        ours = collections.Counter()
        for (kind, caller), n in here.items():
            if caller.startswith("ours"):
                ours[kind] += n
        why = f"rank {rank}, step {step}: " + "; ".join(f"{kind} x{n} from {caller}" for (kind, caller), n in sorted(here.items()))
        # exactly one: the loss's finiteness must be agreed every step, and a blind counter would see none
        assert ours["collective"] == 1 and ours["read"] == 1, why
        assert ours["write"] == 0, why
