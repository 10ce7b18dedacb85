"""Zero-shot on standard sets during training (logging.zeroshot) and wandb (logging.wandb, offline mode).

Two real ranks under ZeRO-3 (a forward needs both, so both run every evaluation), CPU, fp32. Two sets: one in
CLIP_benchmark's webdataset format and the run's own dataset folder. The references:
- the uninterrupted run, for the requeued-and-resumed one (the evaluations land on the same steps, with the
  same numbers);
- the real `clip_benchmark eval` and this project's evaluator, on the run's export, for the last step's numbers;
- the records wandb wrote (its offline transaction log) and TensorBoard's event files, against metrics.jsonl.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import EXIT_REQUEUE
from common.paths import REPO_ROOT
from tests.harness.clip_benchmark_sets import (held_out_digits, make_classification_set, replace_member,
                                               run_clip_benchmark)
from tests.harness.data_fixtures import make_digits_dataset
from tests.harness.rank_launcher import launch_ranks, wait_ranks
from tests.harness.wandb_log import offline_runs

pytestmark = pytest.mark.slow
STEPS, STOP = 6, 3
CB_TEMPLATES = ["a photo of the digit {c}.", "a handwritten {c}."]


class Tracked:
    def __init__(self, root: Path):
        self.root = root
        self.data = make_digits_dataset(root / "digits", n_train=128, n_val=32, shard_size=32)
        images, labels, names = held_out_digits(100, skip=160)    # none of the 160 above
        self.cb = make_classification_set(root / "cb_digits", images, labels, names, CB_TEMPLATES, shard_size=40)

    def args(self, name: str, *extra: str) -> list[str]:
        zeroshot = (f"[{{name: digits_cb, path: {self.cb}, every_steps: 2, max_samples: 0, batch_size: 50}}, "
                    f"{{name: own_val, path: {self.data}, split: val, every_steps: 3, max_samples: 20}}]")
        return ["--config", str(REPO_ROOT / "configs" / "pretrain_cyclip.yaml"), f"data.path={self.data}",
                f"run.run_dir={self.root / name}", "data.global_batch_size=16", "data.num_workers=1",
                f"optim.steps={STEPS}", "optim.warmup_steps=1", "optim.lr=1e-3", "checkpoint.every_steps=100",
                "zero.stage=3", "logging.progress_bar=false", f"logging.zeroshot={zeroshot}",
                "logging.wandb.project=tracking-test", "logging.wandb.tags=[ci]", *extra]

    def run(self, name: str, *extra: str) -> list[int]:
        procs = launch_ranks(self.root, name, 2, self.args(name, *extra), extra_env={"WANDB_MODE": "offline"})
        return wait_ranks(procs, 400)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> Tracked:
    t = Tracked(tmp_path_factory.mktemp("tracking"))
    assert t.run("straight") == [0, 0], f"see {t.root}/straight.rank*.log"
    assert t.run("requeued", f"run.stop_after_steps={STOP}") == [EXIT_REQUEUE] * 2, f"see {t.root}/requeued.rank*.log"
    assert t.run("requeued", "run.resume=latest") == [0, 0], f"see {t.root}/requeued.rank*.log"
    return t


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def zeroshot_by_step(run_dir: Path) -> dict:
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("zeroshot/")}
            for r in records(run_dir) if any(k.startswith("zeroshot/") for k in r)}


def test_zero_shot_runs_on_its_steps_and_resume_does_not_move_it(tracked):
    straight, resumed = zeroshot_by_step(tracked.root / "straight"), zeroshot_by_step(tracked.root / "requeued")
    cb_steps = sorted(s for s, r in straight.items() if "zeroshot/digits_cb/top1" in r)
    own_steps = sorted(s for s, r in straight.items() if "zeroshot/own_val/top1" in r)
    assert cb_steps == [2, 4, 6] and own_steps == [3, 6]
    assert all(straight[s]["zeroshot/digits_cb/num_samples"] == 100 for s in cb_steps)     # max_samples: 0 = all
    assert all(straight[s]["zeroshot/own_val/num_samples"] == 20 for s in own_steps)       # bounded
    assert resumed == straight    # same steps, same numbers after the requeue at step 3


def test_last_zero_shot_equals_clip_benchmark_and_the_evaluator_on_the_export(tracked, tmp_path):
    from train.evaluate.config import EvalConfig
    from train.evaluate.core import evaluate
    from train.evaluate.data import load_model

    export = tracked.root / "straight" / "export"
    logged = zeroshot_by_step(tracked.root / "straight")[STEPS]
    referee = run_clip_benchmark(export, tracked.cb, "zeroshot_classification", tmp_path / "cb.json", batch_size=50)
    model, transform, tokenizer, _ = load_model(export)
    ours = evaluate(model, transform, tokenizer, EvalConfig(dataset=str(tracked.cb), corruptions=[], batch_size=50))
    for theirs, key in (("acc1", "top1"), ("acc5", "top5"), ("mean_per_class_recall", "mean_per_class_recall")):
        assert abs(referee[theirs] - logged[f"zeroshot/digits_cb/{key}"]) <= 1e-3, (theirs, referee, logged)
        assert abs(ours["zero_shot"][key] - logged[f"zeroshot/digits_cb/{key}"]) <= 1e-6


def test_wandb_offline_continues_the_same_run_after_a_requeue(tracked):
    straight, requeued = offline_runs(tracked.root / "straight"), offline_runs(tracked.root / "requeued")
    assert len(straight) == 1 and len(requeued) == 2
    run_id = (tracked.root / "requeued" / "wandb_run_id").read_text().strip()
    assert {r["run_id"] for r in requeued} == {run_id} != {straight[0]["run_id"]}
    assert all(r["project"] == "tracking-test" for r in straight + requeued)
    # wandb's history holds metrics.jsonl's records, the requeued run's across its two processes
    for runs, folder in ((straight, "straight"), (requeued, "requeued")):
        logged = {h["step"]: h for r in runs for h in r["history"]}
        for record in records(tracked.root / folder):
            assert {k: logged[record["step"]][k] for k in record} == record


def test_tensorboard_gets_the_zero_shot_tags(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked.root / "straight" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"zeroshot/digits_cb/top1", "zeroshot/own_val/mean_per_class_recall", "train/loss"} <= tags
    top1 = {e.step: e.value for e in events.Scalars("zeroshot/digits_cb/top1")}
    expected = {s: r["zeroshot/digits_cb/top1"] for s, r in zeroshot_by_step(tracked.root / "straight").items()
                if "zeroshot/digits_cb/top1" in r}
    assert top1.keys() == expected.keys() and all(abs(top1[s] - expected[s]) < 1e-6 for s in expected)


def test_a_zero_shot_set_that_is_not_a_classification_set_is_one_line(tracked, tmp_path):
    retrieval = tmp_path / "ret"
    (retrieval / "test").mkdir(parents=True)
    (retrieval / "test" / "nshards.txt").write_text("1\n")
    (retrieval / "dataset_type.txt").write_text("retrieval\n")
    cases = {f"[{{name: r, path: {retrieval}}}]": "not a classification set",
             f"[{{name: gone, path: {tmp_path / 'gone'}}}]": "logging.zeroshot[0].path",
             f"[{{name: v, path: {tracked.cb}, split: val}}]": "no val/nshards.txt",
             f"[{{name: t, path: {tracked.cb}, templates: ['a {{x}} of {{c}}']}}]": "may stand for the class name"}
    for value, expected in cases.items():
        proc = subprocess.run([sys.executable, "-m", "train", "--dry-run", *tracked.args("dry"),
                               f"logging.zeroshot={value}"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], (value, proc.stderr[-2000:])


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (make setup-system installs it)")
def test_offline_wandb_opens_no_connection_off_the_machine(tracked, tmp_path):
    """A whole 1-rank training with wandb offline and a zero-shot set, under strace: every connect() goes to a
    local socket or 127.0.0.1 (the process group's store). The one exception is torch's own reverse lookup of
    127.0.0.1 (a PTR query for 1.0.0.127.in-addr.arpa, made by any run with or without wandb): a DNS query
    for any other name (wandb's error reporting asks for its server's address, even offline) fails the test."""
    trace = tmp_path / "connect.trace"
    args = [a for a in tracked.args("offline") if not a.startswith("zero.stage")] + ["optim.steps=2",
                                                                                   f"run.run_dir={tmp_path / 'run'}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    proc = subprocess.run(["strace", "-f", "-qq", "-s", "256", "-e", "trace=connect,sendto,sendmmsg", "-o",
                           str(trace), sys.executable, "-m", "train", *args],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert offline_runs(tmp_path / "run")[0]["project"] == "tracking-test"
    dns, outside, queries = set(), [], []
    for line in trace.read_text().splitlines():
        pid, _, call = line.partition(" ")
        connect = re.match(r"connect\((\d+), \{sa_family=AF_INET6?, (.*)", call)
        if connect:
            if "htons(53)" in call:
                dns.add((pid, connect.group(1)))
            elif not re.search(r'inet_addr\("127\.|inet_pton\(AF_INET6, "(::1|::ffff:127\.)', call):
                outside.append(line)
        sent = re.match(r"send(?:to|mmsg)\((\d+), (.*)", call)
        if sent and (pid, sent.group(1)) in dns:
            queries.append(sent.group(2))
    assert not outside, outside[:5]
    assert all(r"\0011\0010\0010\003127\7in-addr\4arpa" in q for q in queries), queries[:3]


def test_a_set_that_fails_on_one_rank_is_skipped_by_all_ranks_not_a_hang(tracked, tmp_path):
    """Under ZeRO-3 every forward is a collective. A zero-shot shard that fails to read on rank 1 only (a `pipe:`
    source that truncates it there, as a flaky object store would) must not leave rank 0 waiting in a forward
    rank 1 never joins: both agree, skip the set at that step (``zeroshot/NAME/skipped``), and train on."""
    flaky = (f'pipe:if [ "$RANK" = 1 ] && [ "{{}}" = "test/1.tar" ]; then head -c 3000 {tracked.cb}/{{}}; '
             f'else cat {tracked.cb}/{{}}; fi')
    bad_label = tmp_path / "bad_label"    # one sample labelled -1: not a class (a read error, skipped alike)
    shutil.copytree(tracked.cb, bad_label)
    replace_member(bad_label / "test" / "1.tar", "s0000040.cls", b"-1")    # shards of 40: 1.tar starts at 40
    zeroshot = (f"[{{name: flaky, path: '{flaky}', every_steps: 1, batch_size: 20}}, "
                f"{{name: good, path: {tracked.cb}, every_steps: 2, batch_size: 20}}, "
                f"{{name: bad_label, path: {bad_label}, every_steps: 2}}]")
    name = "flaky"
    args = [a for a in tracked.args(name, "optim.steps=2") if not a.startswith("logging.wandb")]
    args.append(f"logging.zeroshot={zeroshot}")
    procs = launch_ranks(tracked.root, name, 2, args)
    assert wait_ranks(procs, 300) == [0, 0], f"see {tracked.root}/{name}.rank*.log"
    by_step = zeroshot_by_step(tracked.root / name)
    assert by_step[1] == {"zeroshot/flaky/skipped": 1.0}
    assert by_step[2]["zeroshot/flaky/skipped"] == 1.0 and by_step[2]["zeroshot/good/num_samples"] == 100
    assert by_step[2]["zeroshot/bad_label/skipped"] == 1.0
    log1 = (tracked.root / f"{name}.rank1.log").read_text()
    assert "zero-shot set flaky skipped" in log1 and "test/1.tar" in log1
