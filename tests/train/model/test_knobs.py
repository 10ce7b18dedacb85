"""The memory and speed knobs (issue 21, part 3): gradient checkpointing, torch.compile, patch dropout, LiT locks.

Real components: the tiny_vit open_clip model built by ``build_model``, trained by the trainer's own step,
optimizer and schedule (``train_in_process``); one real ``python -m train`` run (DeepSpeed ZeRO-1) for resume.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from common.config_loader import load_config
from common.errors import ConfigError
from train.config import LossConfig, ModelConfig, OptimConfig, TrainConfig
from train.core.engine import build_optimizer
from train.core.inprocess import train_in_process
from train.model.build import build_model, export_config
from train.model.knobs import compile_module, frozen_parameter_names

STEPS, BATCH = 3, 8
OPTIM = OptimConfig(steps=STEPS, lr=1e-3, warmup_steps=1)
LOSS = LossConfig(cyclip_in_modal=0.25, cyclip_cross_modal=0.25)
# Same ops, recomputed (checkpointing) or traced by AOTAutograd (compile, aot_eager): equal up to float
# reassociation. Measured: 0 difference for checkpointing, < 1e-6 relative for aot_eager.
LOSS_RTOL = 1e-5
PATCHES = (32 // 8) ** 2    # tiny_vit: 32 px images, 8 px patches; + 1 class token


def tiny(**knobs) -> torch.nn.Module:
    torch.manual_seed(0)    # the same initial weights for every variant
    return build_model(ModelConfig(name="tiny_vit", **knobs))[0]


def batches(n: int = STEPS) -> list:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 3, 32, 32, generator=gen), torch.randint(1, 49407, (BATCH, 32), generator=gen))
            for _ in range(n)]


def losses(model: torch.nn.Module) -> list:
    torch.manual_seed(2)
    records = train_in_process(model, batches(), OPTIM, LOSS, seed=0, record_every=1)
    assert len(records) == STEPS
    return [r["loss"] for r in records]


def assert_close(a: list, b: list) -> None:
    assert len(a) == len(b) and all(math.isclose(x, y, rel_tol=LOSS_RTOL) for x, y in zip(a, b)), (a, b)


def losses_logged(run_dir) -> list:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_gradient_checkpointing_recomputes_the_blocks_and_keeps_the_losses():
    calls = {}

    def counted(model, name):
        block = model.visual.transformer.resblocks[0]
        calls[name] = 0
        # a pre-hook: the recomputation stops early, once it has what backward needs, so no forward hook runs
        block.register_forward_pre_hook(lambda *_: calls.__setitem__(name, calls[name] + 1))
        return model

    plain = losses(counted(tiny(), "plain"))
    checkpointed = losses(counted(tiny(grad_checkpointing=True), "checkpointed"))
    assert calls == {"plain": STEPS, "checkpointed": 2 * STEPS}    # forward, then again in backward
    assert_close(plain, checkpointed)


def test_compile_in_place_keeps_the_losses_and_the_state_dict_keys():
    from torch._dynamo.utils import counters

    plain = tiny()
    keys = list(plain.state_dict())
    reference = losses(plain)
    counters.clear()
    compiled = compile_module(tiny(), "aot_eager")
    assert_close(reference, losses(compiled))
    assert counters["stats"]["unique_graphs"] >= 1    # it did run compiled
    assert list(compiled.state_dict()) == keys    # no _orig_mod. prefix: checkpoints and exports unchanged


@pytest.mark.parametrize("prob", [0.5, 0.75])
def test_patch_dropout_drops_the_configured_share_of_tokens_in_training_only(prob):
    model = tiny(patch_dropout=prob)
    tokens = []
    model.visual.transformer.register_forward_pre_hook(lambda _, args: tokens.append(args[0].shape[1]))
    images, texts = batches(1)[0]
    model.train()
    model(images, texts)
    model.eval()
    with torch.no_grad():
        model(images, texts)
    assert tokens == [1 + int(PATCHES * (1 - prob)), 1 + PATCHES]
    # Training-time only: the export's architecture has no patch dropout, and the weights are the plain model's.
    assert "patch_dropout" not in export_config(model, ModelConfig(name="tiny_vit"))["model_cfg"]["vision_cfg"]
    tiny().load_state_dict(model.state_dict(), strict=True)


def test_locked_towers_are_left_out_of_the_optimizer_and_stay_bit_identical():
    model = tiny(lock_image=True, lock_image_unlocked_groups=1, lock_text=True, lock_text_unlocked_layers=2)
    frozen = set(frozen_parameter_names(model))
    # open_clip's groups: the image tower's last is its projection; the text tower's last two its projection
    # and [last block, ln_final]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "visual.proj" in trainable and "visual.conv1.weight" in frozen
    assert "text_projection" in trainable and "transformer.resblocks.1.mlp.c_fc.weight" in trainable
    assert "transformer.resblocks.0.mlp.c_fc.weight" in frozen and "token_embedding.weight" in frozen
    in_optimizer = {id(p) for group in build_optimizer(model, OPTIM).param_groups for p in group["params"]}
    named = dict(model.named_parameters())
    assert not {id(named[n]) for n in frozen} & in_optimizer
    assert {id(named[n]) for n in trainable} == in_optimizer
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses(model)
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    assert all(not torch.equal(before[n], after[n]) for n in trainable)


@pytest.mark.parametrize("override,key", [
    ("model.patch_dropout=1.0", "model.patch_dropout"),
    ("model.patch_dropout=-0.1", "model.patch_dropout"),
    ("model.lock_image_unlocked_groups=-1", "model.lock_image_unlocked_groups"),
    ("model.lock_text_unlocked_layers=-2", "model.lock_text_unlocked_layers"),
    ("run.compile_backend=inductr", "run.compile_backend"),
    ("model.model_kwargs={force_patch_dropout: 0.3}", "model.patch_dropout"),
])
def test_a_knob_out_of_range_is_one_line_naming_it(override, key):
    extra = ["model.patch_dropout=0.5"] if "model_kwargs" in override else []
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, None, [override, *extra])
    assert "\n" not in str(err.value) and str(err.value).startswith(key), str(err.value)


def test_a_lock_open_clip_cannot_do_is_one_line_before_training():
    from train.core.preflight import check_model

    cfg = load_config(TrainConfig, None, ["model.lock_text=true", "model.lock_text_freeze_layer_norm=false"])
    with pytest.raises(ConfigError, match=r"^model.lock_text_freeze_layer_norm=false: tiny_vit's text tower") as err:
        check_model(cfg)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"^model.patch_dropout=0.5: RN50 has a ResNet image tower"):
        check_model(load_config(TrainConfig, None, ["model.name=RN50", "model.patch_dropout=0.5"]))


@pytest.mark.parametrize("overrides,message", [
    (["model.model_kwargs.force_patch_dropout=1.5"], "model.model_kwargs.force_patch_dropout must be a number"),
    (["model.model_kwargs.force_patch_dropout=abc"], "model.model_kwargs.force_patch_dropout must be a number"),
    (["model.name=RN50", "model.model_kwargs.force_patch_dropout=0.5"], "model.model_kwargs.force_patch_dropout=0.5: "
     "RN50 has a ResNet image tower"),
    (["model.model_kwargs.bogus_kwarg=1"], "model.model_kwargs.bogus_kwarg: not a keyword of open_clip's"),
    (["model.model_kwargs.embed_dim=3"], "model.model_kwargs.embed_dim: set by tiny_vit's model config"),
    (["model.model_kwargs.device=cpu"], "model.model_kwargs.device: the trainer sets it"),
])
def test_model_kwargs_open_clip_would_refuse_mid_run_are_one_line_in_the_preflight(overrides, message):
    """The free-form route (model.model_kwargs) meets the same checks as the knobs: before, each of these passed
    --dry-run and died in open_clip's constructor (TypeError, AssertionError) or was ignored (RN50)."""
    from train.core.preflight import check_model

    with pytest.raises(ConfigError) as err:
        check_model(load_config(TrainConfig, None, overrides))
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)


def test_model_kwargs_open_clip_takes_build_the_model():
    """The reference for the checks above: what they accept, open_clip builds (no keyword refused)."""
    from train.core.preflight import check_model
    from train.model.build import build_model

    cfg = load_config(TrainConfig, None, ["model.model_kwargs={force_quick_gelu: true, init_logit_bias: -10.0}"])
    check_model(cfg)
    model = build_model(cfg.model)[0]
    assert float(model.logit_bias) == -10.0


@pytest.mark.slow
@pytest.mark.parametrize("zero", [["zero.stage=1"], ["zero.stage=3", "zero.precision=bf16"],
                                  ["zero.stage=0", "zero.precision=bf16", "zero.bf16_mode=weights"]],
                         ids=["zero1", "zero3-bf16-autocast", "zero0-bf16-weights"])
def test_knobs_through_deepspeed_resume_and_export(tmp_path, zero):
    """One rank: locked towers with patch dropout, checkpointing and compile (aot_eager) train 2 steps; the
    resume drops checkpointing and compile (same math: allowed) and trains 2 more, with the losses of an
    uninterrupted run (ZeRO-1: the patch-dropout masks continue); unlocking is refused in one line;
    the export, live and from the checkpoint, holds the locked tower bit-identical to its initial weights
    (bf16 weights: to their bf16 rounding, DeepSpeed's copy), under plain keys. ZeRO-1 saves no locked
    parameters for zero_to_fp32; ZeRO-3 partitions them too; stage 0 keeps fp32 masters of the others only."""
    from safetensors.torch import load_file

    from tests.harness.data_fixtures import make_digits_dataset
    from tests.train.core.test_resume_faults import train
    from train.core.export import export_checkpoint
    from train.core.preflight import preflight

    data = make_digits_dataset(tmp_path / "ds", n_train=32, n_val=16, shard_size=16)
    run = tmp_path / "run"
    # the text tower locked too: its token embedding (3.2M elements) is the one ZeRO-3 partitions at 1 rank
    locks = dict(lock_image=True, lock_text=True, lock_text_unlocked_layers=1)
    knobs = [f"model.{key}={str(value).lower()}" for key, value in locks.items()] + zero + ["model.patch_dropout=0.5"]
    done = train(data, run, 2, *knobs, "model.grad_checkpointing=true", "run.compile=true",
                 "run.compile_backend=aot_eager")
    assert done.returncode == 0, done.stderr[-3000:]
    done = train(data, run, 4, *knobs, "run.resume=latest")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "at step 2" in done.stderr
    if zero == ["zero.stage=1"]:
        assert train(data, tmp_path / "uninterrupted", 4, *knobs).returncode == 0
        assert_close(*(losses_logged(r) for r in (run, tmp_path / "uninterrupted")))
    cfg = load_config(TrainConfig, str(run / "config.yaml"), ["model.lock_image=false", "run.resume=latest"])
    with pytest.raises(ConfigError, match=r"model.lock_image: True -> False") as err:
        preflight(cfg, 1)
    assert "\n" not in str(err.value)
    exported = load_file(run / "export" / "open_clip_model.safetensors")
    model = tiny(**locks)
    frozen, initial = frozen_parameter_names(model), model.state_dict()
    if "zero.bf16_mode=weights" in zero:
        initial = {k: v.bfloat16().float() for k, v in initial.items()}
    assert set(exported) == set(initial) and "visual.conv1.weight" in frozen and "token_embedding.weight" in frozen
    assert all(torch.equal(exported[k], initial[k]) for k in frozen)
    assert not torch.equal(exported["text_projection"], initial["text_projection"])
    offline = load_file(export_checkpoint(run, tmp_path / "offline") / "open_clip_model.safetensors")
    assert set(offline) == set(exported) and all(torch.equal(offline[k], exported[k]) for k in exported)
