"""LossConfig's value checks: each bad value is one line naming its key (what `python -m train` prints)."""
import pytest

from train.config import LossConfig


@pytest.mark.parametrize("key, value", [
    ("cyclip_in_modal", -1.0), ("cyclip_cross_modal", -0.5), ("m2mix_weight", -0.01), ("vmix_weight", -1.0),
    ("lmix_weight", -1.0), ("vlmix_weight", -1.0), ("m2mix_alpha", 0.0), ("vmix_alpha", -1.0),
    ("lmix_alpha", 0.0), ("vlmix_alpha", 0.0), ("clip_logit_scale", 0.0), ("m2mix_logit_scale", -3.0),
    ("cyclip_reference_batch", 0), ("mix_weight_schedule", "sometimes")])
def test_loss_config_errors_name_their_key_and_value_in_one_line(key, value):
    with pytest.raises(ValueError) as err:
        LossConfig(**{key: value})
    message = str(err.value)
    assert message.startswith(f"loss.{key}={value}:") and "\n" not in message
    assert "LossConfig(" not in message                      # not the whole config dump
    LossConfig(**{key: 1 if key != "mix_weight_schedule" else "constant"})   # a valid value of the key passes


def test_inverse_epoch_schedule_without_epoch_steps_names_the_missing_key():
    with pytest.raises(ValueError, match=r"^loss\.schedule_epoch_steps=0: .*inverse_epoch"):
        LossConfig(mix_weight_schedule="inverse_epoch")
    assert LossConfig(mix_weight_schedule="inverse_epoch", schedule_epoch_steps=5).mix_weight_factor(5) == 0.5
