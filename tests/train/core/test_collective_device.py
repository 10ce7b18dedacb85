"""Every tensor the trainer hands to a collective lives on the trainer's device, caught without a GPU.

On a GPU DeepSpeed picks NCCL, which rejects CPU tensors; on this machine gloo takes CPU tensors, so a
tensor created without ``device=`` would pass unnoticed. The test therefore makes "created without a
device" and "on the trainer's device" two different places: the trainer's own methods run with torch's
default device set to ``meta`` while the trainer's device is the CPU, and ``DeviceCheckedCollectives``
(a test double around torch.distributed's collectives, over a real 1-process gloo group) rejects any
collective whose tensor is not on the trainer's device. A forgotten ``device=`` now lands on ``meta``
and fails here exactly as it would fail under NCCL. Verified to fail on the trainer before this check.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from common.net import free_port
from train.core.policies import RankAgreement

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all_single", "gather", "scatter")


class DeviceCheckedCollectives:
    """Test double: wraps torch.distributed's collectives; each one first checks that every tensor it is
    given (directly or in a list) is on ``device``, then runs the real collective."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, device: torch.device):
        self.device, self.calls = torch.device(device), []
        for name in COLLECTIVES:
            monkeypatch.setattr(dist, name, self._checked(name, getattr(dist, name)))

    def _checked(self, name, real):
        def collective(*args, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            tensors += [t for a in (*args, *kwargs.values()) if isinstance(a, (list, tuple))
                        for t in a if isinstance(t, torch.Tensor)]
            for t in tensors:
                if t.device != self.device:
                    raise AssertionError(f"dist.{name} got a tensor on {t.device}; the process group's device "
                                         f"is {self.device} (NCCL would reject it)")
            self.calls.append(name)
            return real(*args, **kwargs)
        return collective


@pytest.fixture(scope="module")
def process_group():
    """A real 1-process gloo group (the trainer's collectives run whenever one is initialised)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_the_double_rejects_a_tensor_off_the_groups_device(process_group, monkeypatch):
    """The check can fail: a tensor made under the meta default device is refused before any reduction."""
    checked = DeviceCheckedCollectives(monkeypatch, "cpu")
    with torch.device("meta"), pytest.raises(AssertionError, match="got a tensor on meta"):
        dist.all_reduce(torch.zeros(1))
    dist.all_reduce(torch.ones(1, device="cpu"))
    assert checked.calls == ["all_reduce"]


def test_trainer_collectives_use_the_trainer_device(process_group, monkeypatch):
    checked = DeviceCheckedCollectives(monkeypatch, "cpu")
    agree = RankAgreement(torch.device("cpu"), world_size=1)
    on_device = dict(device="cpu")
    terms = {"loss": torch.tensor(2.5, **on_device), "clip": torch.tensor([2.0], **on_device),
             "logit_scale": torch.tensor(14.0, dtype=torch.bfloat16, **on_device)}
    with torch.device("meta"):  # anything created without device= lands here, not on the trainer's device
        step = agree.step_sync(terms, stop=False, skipped=2)
        nan = agree.step_sync({"loss": torch.tensor(float("nan"), **on_device)}, stop=True, skipped=0)
        bf16 = agree.step_sync({"loss": torch.tensor(3.0, dtype=torch.bfloat16, **on_device)}, stop=False, skipped=0)
        keep_going = agree.any(False)
        stop = agree.any(True)
    assert (step.finite, step.stop, nan.finite, nan.stop, bf16.finite, keep_going, stop) == \
        (True, False, False, True, True, False, True)
    assert checked.calls == ["all_reduce"] * 5
    # world size 1: the all-reduced values are the inputs themselves
    assert step.terms == {"clip": 2.0, "logit_scale": 14.0, "loss": 2.5} and step.skipped == 2
