"""The study trains and evaluates through the trainer's core (issue: "a change to the trainer changes them").

- the in-process loop (train/core/inprocess.py) equals a hand-written CLIP + AdamW loop on the same batches;
- a short study run (lib.train_run) is bit-identical when nothing changes, and changes when the core's
  schedule or loss is patched;
- the study's inputs are the model's eval transform, its corrupted copies the evaluator's, and its
  evaluation equals `train.evaluate`'s on the same images.
"""
from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import train.core.schedule
import train.losses.objective
from train.config import LossConfig, OptimConfig
from train.core.inprocess import epoch_batches, train_in_process
from train.experiments.study import lib
from train.experiments.study.config import StudyConfig


class Toy(torch.nn.Module):
    """An open_clip-shaped model small enough to step by hand: linear image tower, mean-of-embeddings text tower."""

    def __init__(self):
        super().__init__()
        self.visual = torch.nn.Linear(3 * 4 * 4, 6)
        self.token_embedding = torch.nn.Embedding(30, 6)
        self.logit_scale = torch.nn.Parameter(torch.full((1,), math.log(1 / 0.07)))

    def forward(self, images, texts):
        image = F.normalize(self.visual(images.flatten(1)), dim=-1)
        text = F.normalize(self.token_embedding(texts).mean(1), dim=-1)
        return image, text, self.logit_scale.exp()


def reference_training(model, batches, o: OptimConfig):
    """CLIP + AdamW written out (Radford et al. 2021 loss; Loshchilov & Hutter 2019 update; torch's clip_grad_norm_)."""
    params = dict(model.named_parameters())
    decays = {n: p.ndim >= 2 for n, p in params.items()}    # weights decay; biases and logit_scale do not
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    v = {n: torch.zeros_like(p) for n, p in params.items()}
    losses = []
    for step, (images, texts) in enumerate(batches):
        if step < o.warmup_steps:
            lr = o.lr * (step + 1) / o.warmup_steps
        else:
            lr = o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * (step - o.warmup_steps) / (o.steps - o.warmup_steps)))
        image, text, scale = model(images, texts)
        logits = scale.clamp(max=o.max_logit_scale) * image @ text.T
        target = torch.arange(len(logits))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        losses.append(float(loss.detach()))
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
        norm = math.sqrt(sum(float(g.square().sum()) for g in grads.values()))
        coef = min(1.0, o.grad_clip / (norm + 1e-6))
        t = step + 1
        with torch.no_grad():
            for n, p in params.items():
                g = grads[n] * coef
                if decays[n]:
                    p.mul_(1 - lr * o.weight_decay)
                m[n] = o.beta1 * m[n] + (1 - o.beta1) * g
                v[n] = o.beta2 * v[n] + (1 - o.beta2) * g * g
                p.sub_(lr * (m[n] / (1 - o.beta1 ** t)) / ((v[n] / (1 - o.beta2 ** t)).sqrt() + o.eps))
    return losses


@pytest.mark.parametrize("fused", [False, True])
def test_in_process_loop_equals_a_hand_written_one(fused):
    # Every schema knob the study's own loop used to hard-code is off its default and active: min_lr,
    # betas, eps, clipping (the gradient norm is ~1, so 0.05 clips) and the logit-scale clamp (init 14.3 > 10).
    o = OptimConfig(steps=4, lr=0.05, min_lr=0.01, warmup_steps=2, weight_decay=0.1, beta1=0.8, beta2=0.95, eps=1e-5,
                    fused_adamw=fused, grad_clip=0.05, max_logit_scale=10.0)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 4, 4, generator=gen), torch.randint(30, (8, 5), generator=gen)) for _ in range(o.steps)]
    torch.manual_seed(0)
    model = Toy()
    reference = copy.deepcopy(model)
    records = train_in_process(model, batches, o, LossConfig(), seed=0, record_every=1)
    other = copy.deepcopy(reference)
    losses = reference_training(reference, batches, o)
    # float32 rounding (the clipping norm, fused kernels) moves the weights by a few 1e-6; the tolerance is
    # far below what any one schema knob changes: the same loop with min_lr = 0 lands > 1e-3 away.
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=2e-5, msg=name)
    reference_training(other, batches, dataclasses.replace(o, min_lr=0.0))
    assert (model.visual.weight - other.visual.weight).abs().max() > 1e-3
    assert [r["loss"] for r in records] == pytest.approx(losses, rel=1e-5)
    assert [r["logit_scale"] for r in records] == pytest.approx([10.0] * 4)
    assert [r["lr"] for r in records] == pytest.approx([0.025, 0.05, 0.05, 0.03])    # warmup, then cosine to 0.01


def test_epoch_batches_are_seeded_permutations_without_the_tail():
    first = list(zip(range(4), epoch_batches(10, 4, seed=3)))
    again = list(zip(range(4), epoch_batches(10, 4, seed=3)))
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(first, again))
    epoch = torch.cat([first[0][1], first[1][1]])    # 2 full batches per epoch of 10; rows 8, 9 of the order dropped
    assert len(set(epoch.tolist())) == 8 and first[2][1].tolist() != first[0][1].tolist()


def synthetic_split(n: int = 48, seed: int = 0) -> lib.Split:
    rng = np.random.default_rng(seed)
    labels = rng.integers(10, size=n)
    words = ["small", "large", "dark", "bright"]
    captions = [f"a {words[int(rng.integers(4))]} photo of item {int(y)}" for y in labels]
    return lib.Split(torch.from_numpy(rng.integers(0, 256, (n, 32, 32), dtype=np.uint8)),
                     torch.from_numpy(labels.astype(np.int64)), captions)


def short_run(split, tokens, cfg: StudyConfig):
    spec = lib.RunSpec(cfg.pretrain_optim(1e-3), cfg.pretrain_loss(0.25), batch=16, seed=0)
    model, records = lib.train_run(spec, split, tokens, torch.device("cpu"), log=lambda msg: None)
    return {k: v.clone() for k, v in model.state_dict().items()}, records


def differs(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_a_change_in_the_core_reaches_a_short_study_run(monkeypatch):
    cfg = StudyConfig(pretrain_steps=4, pretrain_warmup=2)
    split = synthetic_split()
    tokens = lib.Tokens(lib.new_model("cpu")[2], split.captions)
    weights, records = short_run(split, tokens, cfg)
    again, records_again = short_run(split, tokens, cfg)
    assert not differs(weights, again) and records == records_again    # nothing changed: bit-identical
    optim = cfg.pretrain_optim(1e-3)
    assert [r["lr"] for r in records] == [train.core.schedule.cosine_lr(r["step"], optim) for r in records]

    monkeypatch.setattr(train.core.schedule, "cosine_lr", lambda step, o: o.lr)    # the core's schedule
    patched, patched_records = short_run(split, tokens, cfg)
    assert differs(weights, patched) and patched_records[0]["lr"] == 1e-3 != records[0]["lr"]
    monkeypatch.undo()

    clip = train.losses.objective._clip    # the core's loss: CLIP at half the temperature-scaled logits
    monkeypatch.setattr(train.losses.objective, "_clip", lambda batch, scale: clip(batch, 0.5 * scale))
    patched, patched_records = short_run(split, tokens, cfg)
    assert differs(weights, patched) and patched_records[0]["clip"] != pytest.approx(records[0]["clip"])


def test_a_saved_run_loads_as_a_fine_tuning_init(tmp_path):
    torch.manual_seed(0)
    model, _, _ = lib.new_model("cpu")
    with torch.no_grad():
        model.logit_scale.fill_(math.log(150.0))
    lib.save_model(model, tmp_path / "model.pt", max_logit_scale=100.0)
    loaded = lib.new_model("cpu", tmp_path / "model.pt")[0]
    for (name, p), q in zip(model.named_parameters(), loaded.parameters()):
        if name != "logit_scale":
            assert torch.equal(p, q), name
    assert float(loaded.logit_scale.detach().exp()) == pytest.approx(100.0)    # clamped as the trainer's export does


def test_study_inputs_are_the_eval_transform_and_the_evaluators_corruptions():
    from train.evaluate.corruptions import corrupt

    _, preprocess, _ = lib.new_model("cpu")
    rng = np.random.default_rng(0)
    images28 = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    resized = torch.from_numpy(np.stack([lib.resize32(im) for im in images28]))
    reference = torch.stack([preprocess.eval_transform(Image.fromarray(im, "L").convert("RGB")) for im in images28])
    assert torch.equal(preprocess.batch(resized, "cpu"), reference)    # training batches
    per_image = torch.stack([preprocess(Image.fromarray(im.numpy(), "L").convert("RGB")) for im in resized])
    assert torch.equal(per_image, reference)    # evaluation's per-sample transform
    keys = [f"{i:014d}" for i in range(len(images28))]
    for corruption, severity in lib.SHIFTS[::4]:
        cached = torch.from_numpy(lib._corrupted(images28, keys, [(corruption, severity)] * len(keys)))
        on_the_fly = torch.stack([preprocess.eval_transform(corrupt(Image.fromarray(im, "L"), corruption, severity, k)
                                                            .convert("RGB")) for im, k in zip(images28, keys)])
        assert torch.equal(preprocess.batch(cached, "cpu"), on_the_fly), corruption


def test_the_training_probe_leaves_a_run_bit_identical_and_measures_its_features():
    from train.evaluate.metrics import alignment
    from train.losses.objective import cyclic_regularizers

    cfg = StudyConfig(pretrain_steps=4, pretrain_warmup=2)
    split = synthetic_split()
    _, preprocess, tokenizer = lib.new_model("cpu")
    tokens = lib.Tokens(tokenizer, split.captions)
    weights, records = short_run(split, tokens, cfg)
    probe = lib.Probe(split, tokenizer, preprocess, size=16, every=2, last=3, reference_batch=512,
                      max_logit_scale=100.0, device="cpu")
    spec = lib.RunSpec(cfg.pretrain_optim(1e-3), cfg.pretrain_loss(0.25), batch=16, seed=0)
    model, probed = lib.train_run(spec, split, tokens, torch.device("cpu"), log=lambda msg: None, probe=probe)
    assert not differs(weights, model.state_dict())    # probing changes nothing of the run
    # records come wherever the probe is due (every gcd(25, 2) = 1 step here); those of the unprobed run are equal
    assert [{k: v for k, v in r.items() if not k.startswith("probe_")} for r in probed
            if r["step"] in {q["step"] for q in records}] == records
    assert [r["step"] for r in probed if "probe_alignment" in r] == [0, 2, 3]    # every 2 steps and the last
    # the last probe by hand: the final model's features of the first 16 pairs, CLIP's feature gradient by
    # autograd through the N×N logits, the regularisers' at w = 512/16 (λ = 1 stated at N_ref 512)
    with torch.no_grad():
        image = model.encode_image(preprocess.batch(split.images[:16], "cpu"), normalize=True)
        text = model.encode_text(tokenizer(split.captions[:16]), normalize=True)
    i, t = image.clone().requires_grad_(), text.clone().requires_grad_()
    logits = float(model.logit_scale.detach().exp()) * i @ t.T
    target = torch.arange(16)
    clip = torch.autograd.grad((F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2, (i, t))
    i, t = image.clone().requires_grad_(), text.clone().requires_grad_()
    reg = torch.autograd.grad((512 / 16) * sum(cyclic_regularizers(i, t)), (i, t))
    share = math.sqrt(sum(float(g.square().sum()) for g in reg) / sum(float(g.square().sum()) for g in clip))
    assert probed[-1]["probe_share_per_lambda"] == pytest.approx(share, rel=1e-4)
    assert probed[-1]["probe_alignment"] == pytest.approx(alignment(image, text), rel=1e-6)
    assert model.training is False    # train_in_process leaves eval mode; the probe restored train mode in between
