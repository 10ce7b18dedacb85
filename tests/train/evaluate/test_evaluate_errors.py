"""train.evaluate's user errors: one line, no traceback, exit 2, through the real CLI and `make eval`."""
import json
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import pytest

from tests.harness.data_fixtures import TEMPLATES, make_digits_dataset
from tests.harness.eval_fixtures import TINY_CFG, write_run
from train.evaluate.__main__ import main
from common.paths import REPO_ROOT

ROOT = REPO_ROOT


def error_cases(trained, tmp_path: Path) -> tuple[dict, Path]:
    """{case: (argv, what its one line must name)} over broken inputs built in ``tmp_path``; and the good run."""
    data, model, _, _, log = trained
    run, no_export = tmp_path / "run", tmp_path / "not_a_run"
    write_run(run, model, log, {}, seed=0)
    no_export.mkdir()
    weights, garbage, other_arch = (run / "export" / "open_clip_model.safetensors", tmp_path / "garbage.pt",
                                    tmp_path / "other.json")
    retired = tmp_path / "retired"    # a run exported before the hub layout: export/model.pt + model_config.json
    (retired / "export").mkdir(parents=True)
    torch.save(model.state_dict(), retired / "export" / "model.pt")
    broken_export = tmp_path / "broken_export"    # the hub layout, but its config is not JSON
    shutil.copytree(run / "export", broken_export)
    (broken_export / "open_clip_config.json").write_text("{model_cfg")
    garbage.write_bytes(b"not a torch file")
    other_arch.write_text(json.dumps({**TINY_CFG, "embed_dim": 16}))
    ok = [f"dataset={data}", "split=val"]
    holey = tmp_path / "holey"    # a copy of the dataset whose manifest names deleted shards
    shutil.copytree(data, holey)
    (holey / "val" / "000001.tar").unlink()
    (holey / "train" / "000002.tar").unlink()
    not_evaluated, bad_json, list_json = tmp_path / "not_evaluated", tmp_path / "bad_json", tmp_path / "list_json"
    write_run(not_evaluated, model, log, {}, seed=0)
    for folder, text in ((bad_json, "{not json"), (list_json, "[]")):
        (folder / "eval").mkdir(parents=True)
        (folder / "eval" / "eval.json").write_text(text)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = {  # argv -> what the one line must name
        "shard of the split deleted": (["--checkpoint", str(run), f"dataset={holey}", "split=val"],
                                       f"shard {holey}/val/000001.tar"),
        "shard of the reference split deleted": (["--checkpoint", str(run), *ok, f"reference_dataset={holey}",
                                                  "calibration_split=train"], "train/000002.tar"),
        "tiny_vit by name, not a weights file": (["--checkpoint", str(garbage), *ok, "model_name=tiny_vit"],
                                                 "not a PyTorch state-dict file"),    # the name is known
        "compare: run not evaluated": (["compare", str(not_evaluated), "--out", str(tmp_path / "c")],
                                       f"run {not_evaluated} has no evaluation (eval/eval.json): run "
                                       f"`python -m train.evaluate --checkpoint {not_evaluated}` first"),
        "compare: run missing": (["compare", str(tmp_path / "gone"), "--out", str(tmp_path / "c")], "does not exist"),
        "compare: run is a file": (["compare", str(a_file), "--out", str(tmp_path / "c")], "is not a folder"),
        "compare: eval.json not JSON": (["compare", str(bad_json), "--out", str(tmp_path / "c")], "not readable as JSON"),
        "compare: eval.json not an object": (["compare", str(list_json), "--out", str(tmp_path / "c")],
                                             "not an eval.json"),
        "compare: second run missing": (["compare", str(bad_json), str(tmp_path / "gone"), "--out",
                                         str(tmp_path / "c")], "JSON"),
        "missing dataset folder": (["--checkpoint", str(run), f"dataset={tmp_path}/nope"], "manifest.json not found"),
        "bad key": (["--checkpoint", str(run), *ok, "no_such_key=1"], "no_such_key"),
        "wrong type": (["--checkpoint", str(run), *ok, "max_samples=many"], "max_samples"),
        "split not in manifest": (["--checkpoint", str(run), f"dataset={data}", "split=test"], "no split 'test'"),
        "missing checkpoint": (["--checkpoint", str(tmp_path / "gone")], "not found"),
        "run dir without export": (["--checkpoint", str(no_export), *ok], "open_clip_config.json not found"),
        "export in the retired model.pt layout": (["--checkpoint", str(retired), *ok], "python -m train.export"),
        "export folder with a damaged config": (["--checkpoint", str(broken_export), *ok],
                                                "not a loadable open_clip export"),
        "missing reference_dataset": (["--checkpoint", str(run), *ok, f"reference_dataset={tmp_path}/nope"],
                                      "reference_dataset="),
        "reference split missing": (["--checkpoint", str(run), *ok, f"reference_dataset={data}",
                                     "calibration_split=holdout"], "no split 'holdout'"),
        "bare weights, no model": (["--checkpoint", str(weights), *ok], "model_name="),
        "unknown model": (["--checkpoint", str(weights), *ok, "model_name=NoSuchNet"], "not an open_clip model"),
        "not a weights file": (["--checkpoint", str(garbage), *ok, f"model_config={run}/export/open_clip_config.json"],
                               "not a PyTorch state-dict file"),
        "weights of another architecture": (["--checkpoint", str(weights), *ok, f"model_config={other_arch}"],
                                            "does not fit model"),
    }
    return cases, run


def test_cli_user_errors_are_one_line_without_traceback(trained, tmp_path, capsys):
    """Every case through the CLI's entry point (main: the one-line handler of common/cli.py), and three of them
    as real ``python -m train.evaluate`` processes, which must print the same line and no traceback."""
    cases, run = error_cases(trained, tmp_path)
    for name, (argv, expected) in cases.items():
        code = main(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "Traceback" not in lines[0], (name, lines)
        assert lines[0].startswith(("error: ", "config error: ")) and expected in lines[0], (name, lines)
        assert not (run / "eval").exists(), name    # nothing evaluated, nothing written
    assert not (tmp_path / "c").exists()    # compare checks every run before it writes anything

    def cli(argv):
        return subprocess.run([sys.executable, "-m", "train.evaluate", *argv], cwd=ROOT,
                              capture_output=True, text=True, timeout=180)

    real = ("shard of the split deleted", "wrong type", "compare: run not evaluated")  # data, config, compare
    with ThreadPoolExecutor(3) as pool:    # ~3 s of imports each: run them side by side
        for name, proc in zip(real, pool.map(cli, [cases[name][0] for name in real])):
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, (name, proc.stderr)
            assert cases[name][1] in lines[0], (name, lines)


def test_make_eval_passes_the_one_line_through(trained, tmp_path):
    """`make eval` shows the CLI's line (make's own "Error 2" line aside), and its usage without RUN_DIR."""
    data = trained[0]
    for make_args, expected in (([f"RUN_DIR={tmp_path}/gone", f"ARGS=dataset={data} split=val"], "not found"),
                                ([], "usage: make eval RUN_DIR=")):
        done = subprocess.run(["make", "--no-print-directory", "-o", ".venv/.setup-stamp", "eval", *make_args],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        # make's own "make[N]: *** ... Error 2" line aside (N > 0 under `make test`)
        lines = [line for line in done.stderr.splitlines()
                 if line.strip() and not re.match(r"make(\[\d+\])?: \*\*\*", line)]
        assert done.returncode == 2 and len(lines) == 1 and expected in lines[0], done.stderr
        assert "Traceback" not in done.stderr + done.stdout


def test_max_samples_beyond_the_split_evaluates_all_of_it_and_says_so(trained, tmp_path, capsys):
    data, model, _, _, log = trained
    run = tmp_path / "run"
    write_run(run, model, log, {}, seed=0)
    assert main(["--checkpoint", str(run), f"dataset={data}", "split=val", "max_samples=100000", "corruptions=[]",
                 f"templates={json.dumps(TEMPLATES)}"]) == 0
    assert "max_samples=100000 > 200 samples in val; evaluating all 200" in capsys.readouterr().err
    assert json.loads((run / "eval" / "eval.json").read_text())["dataset"]["num_samples"] == 200


def test_missing_or_damaged_shard_found_while_reading_is_one_line_not_a_skip(trained, tmp_path, capsys):
    """Evaluation never skips samples: a shard truncated after the up-front check ends the run with exit 2."""
    data, model, _, _, log = trained
    run, damaged = tmp_path / "run", tmp_path / "damaged"
    write_run(run, model, log, {}, seed=0)
    shutil.copytree(data, damaged)
    shard = damaged / "val" / "000001.tar"
    shard.write_bytes(shard.read_bytes()[:5000])    # cut mid-member: it exists, so only reading finds it
    assert main(["--checkpoint", str(run), f"dataset={damaged}", "split=val", "corruptions=[]",
                 f"templates={json.dumps(TEMPLATES)}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: shard {shard} ") and "manifest" in err[0], err
    assert not (run / "eval").exists()
    # the first shard alone (before the damaged one) evaluates: the error is the shard's, not the run's
    assert main(["--checkpoint", str(run), f"dataset={damaged}", "split=val", "max_samples=64", "corruptions=[]",
                 f"templates={json.dumps(TEMPLATES)}"]) == 0


def test_project_model_config_is_accepted_by_name(tmp_path, capsys):
    """model_name=tiny_vit (configs/model/tiny_vit.json, as training names it) equals model_config=<that file>."""
    import open_clip

    from train.model.build import CONFIG_DIR, register_model_configs

    data = make_digits_dataset(tmp_path / "digits", n_train=32, n_val=32, shard_size=32, image_size=32)
    register_model_configs()
    torch.manual_seed(0)
    weights = tmp_path / "tiny_vit.pt"
    torch.save(open_clip.create_model("tiny_vit").state_dict(), weights)
    common = ["--checkpoint", str(weights), f"dataset={data}", "split=val", "corruptions=[]",
              f"templates={json.dumps(TEMPLATES)}"]
    outs = []
    for i, how in enumerate(("model_name=tiny_vit", f"model_config={CONFIG_DIR / 'tiny_vit.json'}")):
        assert main([*common, how, f"out_dir={tmp_path / str(i)}"]) == 0, capsys.readouterr().err
        outs.append(json.loads((tmp_path / str(i) / "eval.json").read_text()))
    assert outs[0]["zero_shot"]["top1"] == outs[1]["zero_shot"]["top1"]
    assert outs[0]["embedding"]["alignment"] == pytest.approx(outs[1]["embedding"]["alignment"], rel=1e-6)
