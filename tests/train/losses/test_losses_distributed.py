"""The losses under 2 real gloo processes against one process on the concatenated batch.

One spawn runs every check (each spawn costs seconds): the ranks hold 3 and 4 rows (unequal,
odd global N = 7, so V/L-Mix's middle row mixes with itself across the rank boundary). float64
makes the comparison exact to 1e-10. The convention checked (train/losses/objective.py docstring):
- the per-rank loss values average to the global loss;
- each rank's feature gradient is W × the global gradient of its rows (SUM-backward collectives);
- rank-averaged gradients of replicated parameters (a projection, a learnable logit scale) equal
  the single-process gradients: what DDP/DeepSpeed's gradient averaging needs.
"""
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from common.net import free_port
from train.config import LossConfig
from train.losses.objective import (ContrastiveObjective, clip_loss, cyclic_regularizers, lmix_loss,
                          m2mix_loss, vlmix_loss, vmix_loss)

ROWS_PER_RANK = (3, 4)
WORLD = len(ROWS_PER_RANK)
RAW_DIM, EMBED_DIM = 6, 5
LAM = 0.3
TOL = 1e-10
ALL_TERMS = LossConfig(cyclip_in_modal=0.25, cyclip_cross_modal=0.5, m2mix_weight=0.1, m2mix_logit_scale=3.0,
                       vmix_weight=0.2, lmix_weight=0.3, vlmix_weight=0.4)

LOSSES = {
    "clip": lambda I, T, s: clip_loss(I, T, s),
    "cyclip_in": lambda I, T, s: cyclic_regularizers(I, T)[0],
    "cyclip_cross": lambda I, T, s: cyclic_regularizers(I, T)[1],
    "m2mix": lambda I, T, s: m2mix_loss(I, T, s, LAM),
    "m2mix_learnable_mix_scale": lambda I, T, s: m2mix_loss(I, T, s, LAM, mix_logit_scale=s * 0.5),
    "vmix": lambda I, T, s: vmix_loss(I, T, s, LAM),
    "lmix": lambda I, T, s: lmix_loss(I, T, s, LAM),
    "vlmix": lambda I, T, s: vlmix_loss(I, T, s, LAM),
    "objective": lambda I, T, s: ContrastiveObjective(ALL_TERMS, seed=0)(I, T, s, lam=LAM)["loss"],
}


def make_global_data():
    """Raw per-sample inputs and a shared projection, identical on every process."""
    g = torch.Generator().manual_seed(0)
    n = sum(ROWS_PER_RANK)
    raw_image = torch.randn(n, RAW_DIM, generator=g, dtype=torch.float64)
    raw_text = torch.randn(n, RAW_DIM, generator=g, dtype=torch.float64)
    projection = torch.randn(RAW_DIM, EMBED_DIM, generator=g, dtype=torch.float64)
    return raw_image, raw_text, projection


def run_checks(raw_image, raw_text, projection):
    """Every loss on these rows: value, feature gradients, logit-scale and projection gradients."""
    results = {}
    features_image = F.normalize(raw_image @ projection, dim=-1)
    features_text = F.normalize(raw_text @ projection, dim=-1)
    for name, loss_fn in LOSSES.items():
        image, text = features_image.clone().requires_grad_(), features_text.clone().requires_grad_()
        log_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
        loss = loss_fn(image, text, log_scale.exp())
        loss.backward()
        scale_grad = log_scale.grad if log_scale.grad is not None else torch.zeros(())    # CyCLIP: no s
        results[name] = dict(loss=loss.detach(), image_grad=image.grad, text_grad=text.grad,
                             log_scale_grad=scale_grad)
    # A replicated parameter upstream of the features, as in a real model under DDP/DeepSpeed.
    weights = projection.clone().requires_grad_()
    log_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    image = F.normalize(raw_image @ weights, dim=-1)
    text = F.normalize(raw_text @ weights, dim=-1)
    LOSSES["objective"](image, text, log_scale.exp()).backward()
    results["projection"] = dict(weights_grad=weights.grad, log_scale_grad=log_scale.grad)
    return results


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        raw_image, raw_text, projection = make_global_data()
        start = sum(ROWS_PER_RANK[:rank])
        rows = slice(start, start + ROWS_PER_RANK[rank])
        torch.save(run_checks(raw_image[rows], raw_text[rows], projection), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def per_rank_and_single(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("losses_distributed")
    for attempt in range(2):
        try:
            mp.spawn(_rank_main, args=(free_port(), str(out_dir)), nprocs=WORLD, join=True)
            break
        except mp.ProcessRaisedException as error:
            # The free port can be taken by another process before rank 0 binds it: retry once.
            if "EADDRINUSE" not in str(error) or attempt == 1:
                raise
    per_rank = [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]
    assert not dist.is_initialized()
    return per_rank, run_checks(*make_global_data())


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=TOL, atol=TOL * float(expected.abs().max()))


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_and_gradients_match_single_process(per_rank_and_single, name):
    per_rank, single = per_rank_and_single
    ranks = [r[name] for r in per_rank]
    assert_close(torch.stack([r["loss"] for r in ranks]).mean(), single[name]["loss"])
    for key in ("image_grad", "text_grad"):
        # Each rank's own rows receive the gradients of every rank's loss: W × the global gradient.
        assert_close(torch.cat([r[key] for r in ranks]), WORLD * single[name][key])
    assert_close(torch.stack([r["log_scale_grad"] for r in ranks]).mean(), single[name]["log_scale_grad"])


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_rank_averaged_parameter_gradients_equal_global_gradient(per_rank_and_single):
    per_rank, single = per_rank_and_single
    for key in ("weights_grad", "log_scale_grad"):
        averaged = torch.stack([r["projection"][key] for r in per_rank]).mean(0)
        assert_close(averaged, single["projection"][key])
        # Guard against a vacuous pass: the ranks really do see different gradients.
        assert not torch.allclose(per_rank[0]["projection"][key], per_rank[1]["projection"][key])
