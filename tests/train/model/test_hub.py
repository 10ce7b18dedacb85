"""The export is open_clip's hub layout: `open_clip.create_model_and_transforms("local-dir:…")` (the real
loader) returns the trained model with the run's eval preprocessing, for built-in and custom configs, with
model.force_image_size and model.model_kwargs carried over. The reference each time is the model the trainer
built from the same ModelConfig (train.model.build.build_model), compared output for output."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from train.config import ModelConfig
from train.core.export import _write
from train.evaluate.data import load_model
from train.model.build import build_model
from train.model.hub import CONFIG_FILE, WEIGHTS_FILE, export_model_cfg, weights_file

CASES = {
    "custom config (configs/model/tiny_vit.json)": ModelConfig(name="tiny_vit"),
    "custom config, forced size, FLIP patch dropout, own mean/std and interpolation": ModelConfig(
        name="tiny_vit", force_image_size=48,
        model_kwargs={"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3], "force_patch_dropout": 0.5,
                      "image_interpolation": "bilinear", "image_resize_mode": "squash"}),
    "built-in RN50 at 64 px": ModelConfig(name="RN50", force_image_size=64),
    "built-in ViT-S-32 with an init logit scale": ModelConfig(name="ViT-S-32", force_image_size=64,
                                                             model_kwargs={"init_logit_scale": 2.0}),
}


def _image(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(71, 53, 3, generator=g) * 255).to(torch.uint8).numpy())


@pytest.mark.parametrize("name", list(CASES))
def test_local_dir_loads_the_trained_model_with_its_preprocessing(name, tmp_path):
    import open_clip

    cfg = CASES[name]
    torch.manual_seed(0)
    model, _, eval_transform, tokenizer = build_model(cfg)
    with torch.no_grad():    # weights that differ from any fresh init, so a silent re-init would show
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    export = _write(model.state_dict(), tmp_path / "export", model, cfg, 100.0, {"step": 7})
    assert sorted(p.name for p in export.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, "info.json"])

    loaded, _, loaded_transform = open_clip.create_model_and_transforms(f"local-dir:{export}")
    loaded_tokenizer = open_clip.get_tokenizer(f"local-dir:{export}")
    model.eval(), loaded.eval()
    images = [_image(i) for i in range(3)]
    x, y = (torch.stack([t(im) for im in images]) for t in (eval_transform, loaded_transform))
    assert torch.equal(x, y), "the export's preprocessing differs from the run's eval transform"
    texts = ["a photo of a shirt", "two shoes"]
    assert torch.equal(tokenizer(texts), loaded_tokenizer(texts))
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), loaded.encode_image(y))
        assert torch.equal(model.encode_text(tokenizer(texts)), loaded.encode_text(loaded_tokenizer(texts)))
    assert loaded.logit_scale.shape == () and torch.equal(loaded.logit_scale, model.logit_scale.reshape(()))

    pre = json.loads((export / CONFIG_FILE).read_text())["preprocess_cfg"]
    kwargs = cfg.model_kwargs
    if cfg.force_image_size:
        assert list(pre["size"] if isinstance(pre["size"], list) else [pre["size"]])[0] == cfg.force_image_size
    for key, field in (("image_mean", "mean"), ("image_std", "std"), ("image_interpolation", "interpolation"),
                       ("image_resize_mode", "resize_mode")):
        if key in kwargs:
            assert pre[field] == kwargs[key], field
    if "force_patch_dropout" in kwargs:    # FLIP: active in training mode only, like the run's model
        assert loaded.visual.patch_dropout.prob == kwargs["force_patch_dropout"]

    # this project's evaluator reads the same folder the same way
    ours, ours_transform, ours_tokenizer, _ = load_model(export)
    assert torch.equal(ours_transform(images[0]), y[0])
    with torch.no_grad():
        assert torch.equal(ours.encode_image(y), loaded.encode_image(y))


def test_export_model_cfg_applies_overrides_as_open_clip_does():
    base = {"embed_dim": 8, "vision_cfg": {"image_size": 32, "patch_size": 8}, "text_cfg": {"context_length": 16}}
    out = export_model_cfg(base, 64, {"force_patch_dropout": 0.3, "force_context_length": 20, "force_quick_gelu": True,
                                      "image_mean": [0.1, 0.1, 0.1], "nonscalar_logit_scale": True,
                                      "init_logit_bias": -10.0})
    assert out == {"embed_dim": 8, "vision_cfg": {"image_size": 64, "patch_size": 8, "patch_dropout": 0.3},
                   "text_cfg": {"context_length": 20}, "quick_gelu": True, "init_logit_bias": -10.0}
    assert base["vision_cfg"] == {"image_size": 32, "patch_size": 8}    # the registered config is untouched


def test_pretrained_names_an_export_folder_or_its_file(tmp_path):
    cfg = ModelConfig(name="tiny_vit")
    torch.manual_seed(1)
    model = build_model(cfg)[0]
    export = _write(model.state_dict(), tmp_path / "export", model, cfg, 100.0, {"step": 1})
    (export / "model.pt").write_bytes(b"stale")    # a retired-layout file is removed by the next export
    export = _write(model.state_dict(), export, model, cfg, 100.0, {"step": 2})
    assert not (export / "model.pt").exists() and weights_file(export) == export / WEIGHTS_FILE
    assert weights_file(export / WEIGHTS_FILE) == export / WEIGHTS_FILE and weights_file(tmp_path / "none") is None
    for pretrained in (str(export), str(export / WEIGHTS_FILE)):
        torch.manual_seed(2)    # another init: only loading the weights can make them equal
        again = build_model(ModelConfig(name="tiny_vit", pretrained=pretrained))[0]
        assert all(torch.equal(a, b.reshape(a.shape)) for a, b in zip(model.state_dict().values(),
                                                                      again.state_dict().values()))


def test_fine_tuning_from_an_export_of_another_size_says_what_differs(tmp_path, caplog):
    """model.pretrained names a 48 px export with its own mean/std; the config builds a 32 px model: the weights
    load into the configured model (open_clip resizes the position embedding), and a warning names each
    difference, instead of dropping the export's preprocessing silently."""
    src = ModelConfig(name="tiny_vit", force_image_size=48, model_kwargs={"image_mean": [0.5] * 3, "image_std": [0.25] * 3})
    model = build_model(src)[0]
    export = _write(model.state_dict(), tmp_path / "export", model, src, 100.0, {"step": 1})
    with caplog.at_level("WARNING", logger="train"):
        build_model(ModelConfig(name="tiny_vit", pretrained=str(export)))
    lines = [r.getMessage() for r in caplog.records if r.name == "train"]
    assert any("model_cfg.vision_cfg" in line and "48" in line for line in lines), lines
    assert any("preprocess_cfg.mean" in line for line in lines) and any("preprocess_cfg.size" in line for line in lines)
    caplog.clear()
    with caplog.at_level("WARNING", logger="train"):    # the same settings: nothing to say
        build_model(dataclasses.replace(src, pretrained=str(export)))
    assert not [r for r in caplog.records if r.name == "train"]
