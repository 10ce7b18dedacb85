"""CLIP_benchmark's webdataset format, with the real `clip_benchmark eval` (PyPI clip-benchmark) as the referee.

The model is the evaluation tests' tiny CLIP (trained on sklearn digits), exported in open_clip's hub layout by
the same writer the trainer uses; CLIP_benchmark loads it as ``--model local-dir:EXPORT`` with no code of ours.
Datasets are built here from real images: held-out digits (a model that is right 40% of the time) and
Fashion-MNIST (one it has never seen: near chance, where near-ties are likeliest). Both tools run in fp32 with
the same batch size and the dataset's own templates; the numbers must agree within 1e-3.
"""
from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import pytest

from benchmarks.s3_server import SeaweedS3, weed_binary
from pipeline.demo.http_server import LoopbackServer
from tests.harness.clip_benchmark_sets import (fashion_mnist, held_out_digits, make_classification_set,
                                               make_retrieval_set, replace_member, run_clip_benchmark)
from tests.harness.eval_fixtures import write_run
from train.evaluate.__main__ import main as evaluate_cli
from train.evaluate.config import EvalConfig
from train.evaluate.core import evaluate
from train.evaluate.data import load_model

pytestmark = pytest.mark.slow
TOL = 1e-3
DIGIT_TEMPLATES = ["a photo of the digit {c}.", "a handwritten {c}.", "the number {c}, written by hand."]
N_FIXTURE = 712    # the `trained` fixture's digits dataset holds the first 512 + 200 of the seeded order


@pytest.fixture(scope="module")
def export(trained, tmp_path_factory) -> Path:
    _, model, _, _, log = trained
    run = tmp_path_factory.mktemp("cb") / "run"
    write_run(run, model, log, {}, seed=0)
    return run / "export"


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cb_sets")
    images, labels, names = held_out_digits(1000, skip=N_FIXTURE)
    fm_images, fm_labels, fm_names = fashion_mnist(60)
    # several captions per image: one per-image, one shared by every image of its class (identical captions
    # tie exactly; CLIP_benchmark breaks ties in torch.topk's order, and so must we), a third on odd images
    captions = [[f"a handwritten {names[lab]}, scan {i}", f"the digit {names[lab]}",
                 f"{names[lab]} written by hand ({i})"][: 2 + i % 2] for i, lab in enumerate(labels[:300])]
    return {"digits": make_classification_set(root / "digits", images, labels, names, DIGIT_TEMPLATES),
            "fashion": make_classification_set(root / "fashion", fm_images, fm_labels, fm_names, shard_size=128),
            "retrieval": make_retrieval_set(root / "captions", images[:300], captions, shard_size=64)}


def ours(export: Path, dataset: Path, **overrides) -> dict:
    model, transform, tokenizer, _ = load_model(export)
    return evaluate(model, transform, tokenizer, EvalConfig(dataset=str(dataset), split="test", corruptions=[],
                                                            batch_size=64, **overrides))


@pytest.mark.parametrize("name", ["digits", "fashion"])
def test_zero_shot_agrees_with_clip_benchmark(export, sets, name, tmp_path):
    referee = run_clip_benchmark(export, sets[name], "zeroshot_classification", tmp_path / "cb.json")
    zero_shot = ours(export, sets[name])["zero_shot"]
    # the dataset's own templates were used (CLIP_benchmark's file), not the evaluator's default ensemble
    expected_templates = (sets[name] / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert zero_shot["num_templates"] == len(expected_templates)
    for theirs, mine in (("acc1", "top1"), ("acc5", "top5"), ("mean_per_class_recall", "mean_per_class_recall")):
        assert abs(referee[theirs] - zero_shot[mine]) <= TOL, (theirs, referee, zero_shot)
    if name == "digits":    # a model that learned something: the agreement is not two chance levels
        assert zero_shot["top1"] > 0.25 and zero_shot["mean_per_class_recall"] != zero_shot["top1"]


def test_retrieval_with_several_captions_agrees_with_clip_benchmark(export, sets, tmp_path):
    referee = run_clip_benchmark(export, sets["retrieval"], "zeroshot_retrieval", tmp_path / "cb.json",
                                 recall_k=(1, 5, 10))
    retrieval = ours(export, sets["retrieval"])["retrieval"]
    assert retrieval["relevance"] == "clip_benchmark" and retrieval["num_images"] == 300
    assert retrieval["num_texts"] == sum(2 + i % 2 for i in range(300))
    for k in (1, 5, 10):    # CLIP_benchmark: image_retrieval = text -> image, text_retrieval = image -> text
        assert abs(referee[f"image_retrieval_recall@{k}"] - retrieval[f"t2i_R@{k}"]) <= TOL, (k, referee, retrieval)
        assert abs(referee[f"text_retrieval_recall@{k}"] - retrieval[f"i2t_R@{k}"]) <= TOL, (k, referee, retrieval)
    assert retrieval["i2t_R@10"] > retrieval["i2t_R@1"] > 0


def test_remote_benchmark_set_reads_like_the_local_one(export, sets, tmp_path):
    """The same folder over loopback HTTP (as from a Hugging Face dataset repo) and on the real SeaweedFS S3
    server gives the same numbers as on local disk."""
    local = ours(export, sets["fashion"])
    with LoopbackServer(sets["fashion"].parent) as server:
        remotes = [ours(export, server.url(sets["fashion"].name))]
    if weed_binary() is not None:
        with SeaweedS3(tmp_path / "weed") as s3:
            url = s3.upload(sets["fashion"], "bench", "wds_fashion")
            remotes.append(ours(export, url, storage_options=s3.storage_options))
    assert len(remotes) == 2 or weed_binary() is None
    for remote in remotes:
        assert remote["dataset"]["num_samples"] == local["dataset"]["num_samples"] == 600
        assert remote["zero_shot"] == local["zero_shot"] and remote["dataset"]["format"] == "clip_benchmark"


def test_user_templates_and_classnames_override_the_dataset_s(export, sets):
    own = ours(export, sets["digits"], max_samples=200)["zero_shot"]
    again = ours(export, sets["digits"], max_samples=200, templates=DIGIT_TEMPLATES)["zero_shot"]
    other = ours(export, sets["digits"], max_samples=200, templates=["{}"])["zero_shot"]
    assert own["top1"] == again["top1"] and own["num_templates"] == 3 and other["num_templates"] == 1
    assert own["ece"] != other["ece"]    # another prompt ensemble, other class embeddings


def _broken(sets: dict, tmp_path: Path) -> dict:
    """{case: (dataset folder, what the one line must name)}: CLIP_benchmark folders with one thing wrong."""
    cases = {}

    def copy(name: str) -> Path:
        dest = tmp_path / name
        shutil.copytree(sets["fashion"], dest)
        return dest

    d = copy("no_split")
    cases["split missing"] = (d, "split=val", "no val/nshards.txt")
    d = copy("bad_count")
    (d / "test" / "nshards.txt").write_text("three\n")
    cases["nshards not a number"] = (d, "split=test", "not a shard count")
    d = copy("multilabel")
    (d / "dataset_type.txt").write_text("multilabel\n")
    cases["multilabel"] = (d, "split=test", "multilabel")
    d = copy("shard_gone")
    (d / "test" / "nshards.txt").write_text("7\n")    # claims 7 shards; there are 5 (600 samples, 128 a shard)
    cases["shard missing"] = (d, "split=test", "test/5.tar")
    d = copy("no_classnames")
    (d / "classnames.txt").unlink()
    cases["no class names"] = (d, "split=test", "class names")
    d = copy("bad_label")
    replace_member(d / "test" / "0.tar", "s0000000.cls", b"seven")
    cases["label not an integer"] = (d, "split=test", "not an integer label")
    d = copy("negative_label")
    replace_member(d / "test" / "0.tar", "s0000000.cls", b"-1")
    cases["a negative label"] = (d, "split=test", "label -1 outside 0..9")
    d = copy("empty")
    for tar in (d / "test").glob("*.tar"):
        tar.unlink()
    with tarfile.open(d / "test" / "0.tar", "w"):
        pass
    (d / "test" / "nshards.txt").write_text("1\n")
    cases["an empty shard"] = (d, "split=test", "has no samples")
    d = copy("label_too_large")
    (d / "classnames.txt").write_text("\n".join(f"class {i}" for i in range(5)) + "\n")
    cases["a label beyond the class names"] = (d, "split=test", "label 5 outside 0..4")
    return cases


def test_broken_benchmark_folders_are_one_line_each(export, sets, tmp_path, capsys):
    for name, (folder, split, expected) in _broken(sets, tmp_path).items():
        code = evaluate_cli(["--checkpoint", str(export), f"dataset={folder}", split, "corruptions=[]"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and expected in err[0] and "Traceback" not in err[0], (name, err)
