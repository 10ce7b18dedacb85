"""LossConfig's value checks: each bad value is one ConfigError line naming its key (what `python -m train`
prints), from the same checker as every other schema (common/validation.py)."""
import pytest

from common.config_loader import load_config
from common.errors import ConfigError
from train.config import LossConfig, TrainConfig


@pytest.mark.parametrize("key, value, rule", [
    ("cyclip_in_modal", -1.0, ">= 0"), ("cyclip_cross_modal", -0.5, ">= 0"), ("m2mix_weight", -0.01, ">= 0"),
    ("vmix_weight", -1.0, ">= 0"), ("lmix_weight", -1.0, ">= 0"), ("vlmix_weight", -1.0, ">= 0"),
    ("m2mix_alpha", 0.0, "> 0"), ("vmix_alpha", -1.0, "> 0"), ("lmix_alpha", 0.0, "> 0"), ("vlmix_alpha", 0.0, "> 0"),
    ("clip_logit_scale", 0.0, "> 0"), ("m2mix_logit_scale", -3.0, "> 0"), ("cyclip_reference_batch", 0, ">= 1"),
    ("mix_weight_schedule", "sometimes", "one of constant|inverse_epoch")])
def test_loss_config_errors_name_their_key_and_value_in_one_line(key, value, rule):
    with pytest.raises(ConfigError) as err:
        LossConfig(**{key: value}).validate()
    assert str(err.value) == f"loss.{key} must be {rule}, got {value!r}"
    LossConfig(**{key: 1 if key != "mix_weight_schedule" else "constant"}).validate()  # a valid value passes
    with pytest.raises(ConfigError, match=f"^loss.{key} must be"):    # and through the loader, as a user types it
        load_config(TrainConfig, None, [f"loss.{key}={value}"])


def test_inverse_epoch_schedule_without_epoch_steps_names_the_missing_key():
    with pytest.raises(ConfigError, match=r"^loss\.schedule_epoch_steps=0: .*inverse_epoch"):
        LossConfig(mix_weight_schedule="inverse_epoch").validate()
    assert LossConfig(mix_weight_schedule="inverse_epoch", schedule_epoch_steps=5).mix_weight_factor(5) == 0.5
