"""End-to-end evaluation on a real tiny open_clip model trained here on real (sklearn digits) images."""
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.harness.data_fixtures import CLASS_NAMES, TEMPLATES
from tests.harness.eval_fixtures import write_run
from train.evaluate import metrics
from train.evaluate.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from train.evaluate.__main__ import main
from train.evaluate.compare import group_runs
from train.evaluate.data import iter_samples
from train.evaluate.periodic import evaluate_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    Image.open(io.BytesIO(data)).verify()  # raises on a truncated or corrupt file


# ---- corruptions --------------------------------------------------------------------------------

def test_corruptions_are_deterministic_per_key_and_grow_with_severity():
    rng = np.random.default_rng(0)
    img = Image.fromarray((rng.uniform(size=(28, 28)) * 255).astype(np.uint8), "L")
    base = np.asarray(img, dtype=np.float32)
    for name in CORRUPTIONS:
        diffs = []
        for severity in SEVERITIES:
            a, b = corrupt(img, name, severity, "00000000000001"), corrupt(img, name, severity, "00000000000001")
            assert a.tobytes() == b.tobytes(), name
            assert a.size == img.size and a.mode == img.mode
            diffs.append(np.abs(np.asarray(a, dtype=np.float32) - base).mean())
        assert 0 < diffs[0] < diffs[1] < diffs[2], (name, diffs)
    noisy = [corrupt(img, "gaussian_noise", 2, k).tobytes() for k in ("00000000000001", "00000000000002")]
    assert noisy[0] != noisy[1]  # the seed comes from the key
    with pytest.raises(ValueError):
        corrupt(img, "fog", 1, "k")


def test_contrast_keeps_the_mean_and_rotation_keeps_a_symmetric_image():
    img = Image.fromarray(np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1)), "L")
    low = np.asarray(corrupt(img, "contrast", 3, "k"))
    # by hand: every pixel pulled towards the image mean (124) to 0.15 of its distance (severity 3), rounded
    pixels = np.asarray(img, dtype=np.float64)
    assert low.dtype == np.uint8 and np.array_equal(low, np.rint((pixels - 124.0) * 0.15 + 124.0))
    flat = Image.new("RGB", (16, 16), (40, 80, 120))
    assert corrupt(flat, "rotation", 3, "k").tobytes() == flat.tobytes()  # border fill: no black corners


def encode_by_hand(model, eval_transform, tokenizer, samples, unique):
    """fp64 (images n×d, distinct captions u×d, class prototypes C×d): the model's own encoders in one batch
    each, the prompt ensemble averaged and renormalised by hand (the reference the evaluator is checked with)."""
    with torch.no_grad():
        img = F.normalize(model.encode_image(torch.stack([eval_transform(s.image.convert("RGB")) for s in samples])),
                          dim=-1).double()
        txt = F.normalize(model.encode_text(tokenizer(unique)), dim=-1).double()
        classes = torch.stack([F.normalize(F.normalize(model.encode_text(tokenizer([t.format(c) for t in TEMPLATES])),
                                                       dim=-1).mean(0), dim=0) for c in CLASS_NAMES]).double()
    return img, txt, classes


def test_periodic_eval_of_trained_tiny_model_matches_a_manual_computation(trained):
    """Every number evaluate_model returns, against the same 200 samples encoded here in one batch with the
    model's own encode_image/encode_text, each metric by its formula in plain torch and Python loops."""
    data, model, eval_transform, tokenizer, _ = trained
    out = evaluate_model(model, tokenizer, eval_transform, str(data), "val", 200, CLASS_NAMES, TEMPLATES)
    samples = list(iter_samples(data, "val", 200))
    n, labels, captions = len(samples), [s.label for s in samples], [s.caption for s in samples]
    unique = list(dict.fromkeys(captions))
    img, txt, classes = encode_by_hand(model, eval_transform, tokenizer, samples, unique)
    ranked = [(img[i] @ classes.T).argsort(descending=True).tolist() for i in range(n)]    # classes, best first
    sim, paired = img @ txt.T, txt[[unique.index(c) for c in captions]]
    ref = {"num_samples": n,
           "zero_shot_top1": sum(r[0] == y for r, y in zip(ranked, labels)) / n,
           "zero_shot_top5": sum(y in r[:5] for r, y in zip(ranked, labels)) / n,
           "alignment": sum((img[i] - paired[i]).norm().item() ** 2 for i in range(n)) / n,
           "modality_gap": (img.mean(0) - paired.mean(0)).norm().item()}
    for k in (1, 5):    # identical captions merged: a hit when one relevant item is among the k most similar
        ref[f"i2t_R_at_{k}"] = sum(unique.index(captions[i]) in sim[i].argsort(descending=True)[:k].tolist()
                                   for i in range(n)) / n
        ref[f"t2i_R_at_{k}"] = sum(any(captions[i] == unique[t]
                                       for i in sim[:, t].argsort(descending=True)[:k].tolist())
                                   for t in range(len(unique))) / len(unique)
    assert set(out) == set(ref)
    for key, value in ref.items():
        assert out[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # The fixture learned (chance is 0.1 on 10 classes), so the comparison above is not one of tied scores.
    assert ref["zero_shot_top1"] > 0.2


def test_periodic_eval_restores_mode_and_matches_a_manual_computation(trained):
    data, model, eval_transform, tokenizer, _ = trained
    model.train()
    out = evaluate_model(model, tokenizer, eval_transform, str(data), "val", 50, CLASS_NAMES, TEMPLATES)
    assert model.training
    model.eval()
    # Independent reference: encode sample by sample, prompt-ensemble by hand.
    samples = list(iter_samples(data, "val", 50))
    with torch.no_grad():
        img = F.normalize(model.encode_image(torch.stack([eval_transform(s.image.convert("RGB")) for s in samples])), dim=-1)
        classes = []
        for name in CLASS_NAMES:
            t = F.normalize(model.encode_text(tokenizer([tpl.format(name) for tpl in TEMPLATES])), dim=-1).mean(0)
            classes.append(t / t.norm())
        pred = (img @ torch.stack(classes).T).argmax(1)
    top1 = (pred == torch.tensor([s.label for s in samples])).float().mean().item()
    assert out["zero_shot_top1"] == pytest.approx(top1)


def naive_metrics(trained, split: str, n: int) -> dict:
    """Zero-shot top-1, ECE, leave-one-out prototype consistency, caption-level recall@k, alignment and
    C_in/C_cross, each by its textbook formula with Python loops (docs/METHODS.md §4)."""
    data, model, eval_transform, tokenizer, _ = trained
    samples = list(iter_samples(data, split, n))
    captions, labels = [s.caption for s in samples], [s.label for s in samples]
    unique = list(dict.fromkeys(captions))
    img, txt, classes = encode_by_hand(model, eval_transform, tokenizer, samples, unique)
    probs = (model.logit_scale.exp().item() * img @ classes.T).softmax(1)
    pred = probs.argmax(1).tolist()
    out = {"top1": sum(p == y for p, y in zip(pred, labels)) / n, "num_texts": len(unique)}
    # ECE (Guo et al. 2017): 15 equal-width bins (lo, hi] of the top confidence, |accuracy − confidence| weighted.
    bins = [[] for _ in range(15)]
    for i in range(n):
        conf = probs[i].max().item()
        bins[max(math.ceil(conf * 15) - 1, 0)].append((conf, pred[i] == labels[i]))
    out["bin_counts"] = [len(b) for b in bins]
    out["ece"] = sum(len(b) / n * abs(sum(c for _, c in b) / len(b) - sum(f for f, _ in b) / len(b)) for b in bins if b)
    # CyCLIP consistency without a reference set: the nearest class mean of the *other* images.
    agree = 0
    for i in range(n):
        cos = {c: F.cosine_similarity(img[i], torch.stack([img[j] for j in range(n) if j != i and labels[j] == c])
                                      .mean(0), dim=0).item()
               for c in set(labels) if any(j != i and labels[j] == c for j in range(n))}
        agree += max(cos, key=cos.get) == pred[i]
    out["consistency"] = agree / n
    # Recall@k with identical captions merged: a hit when a relevant item is among the k most similar.
    sim = img @ txt.T
    for k in (1, 5, 10):
        out[f"i2t_R@{k}"] = sum(unique.index(captions[i]) in sim[i].argsort(descending=True)[:k].tolist()
                                for i in range(n)) / n
        out[f"t2i_R@{k}"] = sum(any(captions[i] == unique[t] for i in sim[:, t].argsort(descending=True)[:k].tolist())
                                for t in range(len(unique))) / len(unique)
    paired = txt[[unique.index(c) for c in captions]]
    out["alignment"] = sum((img[i] - paired[i]).norm().item() ** 2 for i in range(n)) / n
    out["C_in"] = sum(((img[i] @ img[j] - paired[i] @ paired[j]) ** 2).item() for i in range(n) for j in range(n)) / n
    out["C_cross"] = sum(((img[i] @ paired[j] - img[j] @ paired[i]) ** 2).item()
                         for i in range(n) for j in range(n)) / n
    return out


def test_cli_writes_report_and_plots_and_compare_groups_seeds(trained, tmp_path):
    data, model, _, _, log = trained
    runs = [tmp_path / "clip_s0", tmp_path / "clip_s1", tmp_path / "cyclip_s0"]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i, (run, lam) in enumerate(zip(runs, (0.0, 0.0, 0.25))):
        # Different weights per run so the spread over seeds is not zero.
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * i * torch.randn_like(p))
        write_run(run, model, log, {"cyclip_in": lam}, seed=i)
        model.load_state_dict(state)
        overrides = [f"dataset={data}", "split=val", "max_samples=120", "corruptions=[blur,rotation]",
                     "severities=[1,3]", f"templates={json.dumps(TEMPLATES)}"]
        assert main(["--checkpoint", str(run)] + overrides) == 0

    out = json.loads((runs[0] / "eval" / "eval.json").read_text())
    assert out["dataset"]["num_samples"] == 120 and out["dataset"]["num_classes"] == 10
    # Independent reference: the same 120 images and captions encoded here, every metric by its naive formula.
    ref = naive_metrics(trained, "val", 120)
    zs = out["zero_shot"]
    assert zs["top1"] == pytest.approx(ref["top1"])
    assert zs["ece"] == pytest.approx(ref["ece"], rel=1e-4, abs=1e-6)
    assert zs["consistency_definition"] == "loo_prototype" and zs["consistency"] == pytest.approx(ref["consistency"])
    assert out["calibration"]["count"] == ref["bin_counts"]
    assert set(out["shift"]) == {"blur", "rotation"} and set(out["shift"]["blur"]) == {"1", "3"}
    assert out["retrieval"]["num_texts"] == ref["num_texts"] and out["retrieval"]["relevance"] == "caption"
    for k in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"):
        assert out["retrieval"][k] == pytest.approx(ref[k]), k
    emb = out["embedding"]
    assert emb["pairs"] == "caption"
    for k in ("alignment", "C_in", "C_cross"):
        assert emb[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-6), k
    assert out["robustness"]["shifted_top1"] == pytest.approx(
        np.mean([m["top1"] for sev in out["shift"].values() for m in sev.values()]))
    md = (runs[0] / "eval" / "eval.md").read_text()
    assert "| top-1 |" in md and "Relevance" in md
    for png in ("reliability.png", "corruptions.png", "training.png"):
        assert_png(runs[0] / "eval" / png)

    groups = group_runs(runs)
    assert [[p.name for p in g] for g in groups] == [["clip_s0", "clip_s1"], ["cyclip_s0"]]
    assert main(["compare", *map(str, runs), "--out", str(tmp_path / "cmp")]) == 0
    cmp = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    clip = cmp["groups"][0]["metrics"]["zero_shot.top1"]
    seeds = [json.loads((r / "eval" / "eval.json").read_text())["zero_shot"]["top1"] for r in runs[:2]]
    assert clip["n"] == 2 and clip["mean"] == pytest.approx(np.mean(seeds))
    assert clip["spread"] == pytest.approx(np.std(seeds, ddof=1))
    assert "cyclip_in" in cmp["groups"][1]["config_difference"]
    assert "±" in (tmp_path / "cmp" / "compare.md").read_text()
    assert_png(tmp_path / "cmp" / "metric_bars.png")
    # Effective robustness by hand (Taori et al.): shifted top-1 minus the baseline group's least-squares trend
    # in logit space (np.polyfit over the 2 CLIP runs; slope 1 if they share a clean top-1), at each run.
    rob = [json.loads((r / "eval" / "eval.json").read_text())["robustness"] for r in runs]
    lg = lambda p: math.log(min(max(p, 1e-4), 1 - 1e-4) / (1 - min(max(p, 1e-4), 1 - 1e-4)))    # noqa: E731
    xs, ys = [lg(r["clean_top1"]) for r in rob[:2]], [lg(r["shifted_top1"]) for r in rob[:2]]
    slope, intercept = np.polyfit(xs, ys, 1) if xs[0] != xs[1] else (1.0, np.mean(ys) - np.mean(xs))
    for run, r in zip(runs, rob):
        trend = 1 / (1 + math.exp(-(slope * lg(r["clean_top1"]) + intercept)))
        assert cmp["per_run"][str(run)]["robustness.effective"] == pytest.approx(r["shifted_top1"] - trend, abs=1e-9)


def test_retrieval_relevance_definitions():
    from train.evaluate.core import retrieval_groups

    captions, labels = ["a cat", "a dog", "a cat"], [0, 1, 0]
    texts, img_g, txt_g = retrieval_groups(captions, labels, "caption")
    assert texts == ["a cat", "a dog"] and img_g.tolist() == [0, 1, 0] and txt_g.tolist() == [0, 1]
    texts, img_g, txt_g = retrieval_groups(captions, labels, "instance")
    assert texts == captions and img_g.tolist() == txt_g.tolist() == [0, 1, 2]
    texts, img_g, txt_g = retrieval_groups(captions, labels, "label")
    assert img_g.tolist() == txt_g.tolist() == labels
    # With merged duplicates, perfect features give R@1 = 1 both ways.
    feats = F.normalize(torch.eye(2), dim=1)
    r = metrics.retrieval_recalls(feats[img_g_caption := torch.tensor([0, 1, 0])], feats, img_g_caption,
                                  torch.arange(2))
    assert r["i2t_R@1"] == 1.0 and r["t2i_R@1"] == 1.0


def test_cli_knn_consistency_and_temperature_match_a_manual_computation(trained, tmp_path):
    """The papers' metrics through the CLI: k-NN consistency over *train* embeddings, ECE/NLL after a
    temperature fitted on val, against features encoded and voted here by hand."""
    data, model, eval_transform, tokenizer, log = trained
    run = tmp_path / "clip_ref"
    write_run(run, model, log, {"cyclip_in": 0.0}, seed=0)
    overrides = [f"dataset={data}", "split=val", "max_samples=80", "corruptions=[]", f"reference_dataset={data}",
                 "reference_max_samples=150", "consistency_ks=[1,3,30]", f"templates={json.dumps(TEMPLATES)}"]
    assert main(["--checkpoint", str(run)] + overrides) == 0
    zs = json.loads((run / "eval" / "eval.json").read_text())["zero_shot"]
    assert zs["consistency_definition"] == "knn_train" and set(zs["consistency_k"]) == {"1", "3", "30"}

    def encode(split, n):
        samples = list(iter_samples(data, split, n))
        with torch.no_grad():
            x = torch.stack([eval_transform(s.image.convert("RGB")) for s in samples])
            return F.normalize(model.encode_image(x), dim=-1), torch.tensor([s.label for s in samples])

    test_f, test_y = encode("val", 80)
    ref_f, ref_y = encode("train", 150)
    with torch.no_grad():
        classes = torch.stack([F.normalize(F.normalize(model.encode_text(tokenizer([t.format(c) for t in TEMPLATES])),
                                                       dim=-1).mean(0), dim=0) for c in CLASS_NAMES])
    scale = model.logit_scale.exp().item()
    pred = (test_f @ classes.T).argmax(1)
    for k in (1, 3, 30):
        agree = 0
        for i in range(80):
            order = (ref_f @ test_f[i]).argsort(descending=True)[:k].tolist()
            votes = [int(ref_y[j]) for j in order]
            agree += int(max(set(votes), key=lambda c: (votes.count(c), -votes.index(c))) == int(pred[i]))
        assert zs["consistency_k"][str(k)] == pytest.approx(agree / 80)
    assert zs["consistency"] == pytest.approx(sum(zs["consistency_k"].values()) / 3)
    val_f, val_y = encode("val", 0)
    t = metrics.fit_temperature(scale * val_f @ classes.T, val_y)
    assert zs["temperature"] == pytest.approx(t, rel=1e-4)
    logits = scale * test_f @ classes.T
    assert zs["nll"] == pytest.approx(F.cross_entropy(logits.double(), test_y).item(), rel=1e-4)
    assert zs["nll_ts"] == pytest.approx(F.cross_entropy(logits.double() / t, test_y).item(), rel=1e-4)
    assert zs["nll_ts"] <= zs["nll"] + 0.05    # fitted on val = these images here, so it cannot be much worse
    assert "ECE after T" in (run / "eval" / "eval.md").read_text()
