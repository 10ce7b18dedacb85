"""The tiny open_clip model the evaluation tests share: trained here on real (sklearn digits) images."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from tests.harness.data_fixtures import make_digits_dataset
from train.evaluate.data import iter_samples

# Small enough to train on 2 CPU cores in seconds; registered with open_clip from a JSON file like a
# real export, so the CLI's loading path is the one a trained run uses.
TINY_CFG = {"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8,
                           "pool_type": "avg"},
            "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}

def clip_loss(image_features, text_features, logit_scale):
    logits = logit_scale.exp() * image_features @ text_features.T
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def train_tiny_clip(root: Path):
    """In ``root``: (dataset folder, model name, model, eval transform, tokenizer, loss log) after 120 steps of CLIP."""
    import open_clip

    data = make_digits_dataset(root / "digits", n_train=512, n_val=200, shard_size=128, image_size=32)
    cfg_dir = root / "model_cfg"
    cfg_dir.mkdir()
    (cfg_dir / "eval_test_tiny.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(cfg_dir)
    torch.manual_seed(0)
    model, _, eval_transform = open_clip.create_model_and_transforms("eval_test_tiny")
    tokenizer = open_clip.get_tokenizer("eval_test_tiny")
    samples = list(iter_samples(data, "train"))
    images = torch.stack([eval_transform(s.image.convert("RGB")) for s in samples])
    tokens = tokenizer([s.caption for s in samples])
    # Why these choices: mean-pooled patches (not a class token) and a frozen random token embedding
    # leave the 2-core run out of CLIP's early collapse sooner; batches of 2 images per class avoid
    # duplicate class-level captions among the negatives.
    model.token_embedding.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    by_class = {c: [i for i, s in enumerate(samples) if s.label == c] for c in range(10)}
    gen, log = torch.Generator().manual_seed(0), []
    for step in range(120):
        idx = torch.tensor([by_class[c][int(torch.randint(len(by_class[c]), (1,), generator=gen))]
                            for c in range(10) for _ in range(2)])
        img_f = F.normalize(model.encode_image(images[idx]), dim=-1)
        txt_f = F.normalize(model.encode_text(tokens[idx]), dim=-1)
        loss = clip_loss(img_f, txt_f, model.logit_scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        log.append({"step": step, "loss": loss.item(), "clip": loss.item(), "lr": 1e-3,
                    "logit_scale": model.logit_scale.exp().item(), "samples_per_s": 100.0})
    model.eval()
    return data, model, eval_transform, tokenizer, log


def write_run(run_dir: Path, model, log, loss_overrides: dict, seed: int):
    """A run folder as the trainer leaves it: config.yaml, metrics.jsonl, export/."""
    from train.model.hub import hub_config, write_export

    write_export(run_dir / "export", {k: v.float() for k, v in model.state_dict().items()},
                 hub_config(model, TINY_CFG), {"model_name": "eval_test_tiny", "step": len(log)})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    loss = "\n".join(f"  {k}: {v}" for k, v in loss_overrides.items())
    (run_dir / "config.yaml").write_text(
        f"model:\n  name: tiny\nloss:\n{loss}\nrun:\n  run_dir: {run_dir}\n  seed: {seed}\n")
