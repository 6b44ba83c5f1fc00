"""The offline mini benchmark end to end on a tiny setting: 2 real tasks, few images, few steps."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lit_adamerging.benchmarks import finetune, mini, passes

TASKS = ("mnist", "fashion_mnist")


def tiny_copy(source: Path, root: Path, train: int, test: int) -> Path:
    """The first ``train``/``test`` images of every class of the offline trees under ``source``, same layout."""
    for task in TASKS:
        for split, count in (("train", train), ("test", test)):
            for folder in sorted((source / task / split).iterdir()):
                if folder.is_dir():
                    target = root / task / split / folder.name
                    target.mkdir(parents=True)
                    for image in sorted(folder.iterdir())[:count]:
                        shutil.copy(image, target / image.name)
    return root


@pytest.mark.slow  # the whole benchmark, run twice (about 60 s)
def test_whole_pipeline_on_a_tiny_setting(tmp_path, capsys, offline_datasets):
    data = tiny_copy(offline_datasets(*TASKS), tmp_path / "data", train=20, test=12)
    out = tmp_path / "out"
    args = ["--data-root", str(data), "--tasks", ",".join(TASKS), "--out", str(out), "--shots", "3",
            "--finetune-steps", "30", "--finetune-lr", "1e-4", "--finetune-batch", "32", "--steps", "2",
            "--surgery-steps", "3"]
    results = mini.main(args)

    written = json.loads((out / "results.json").read_text())
    assert written == json.loads(json.dumps(results))
    assert written["tasks"] == list(TASKS)
    assert list(written["methods"]) == list(mini.METHODS)
    for method, row in written["methods"].items():
        assert set(row) == {"per_task", "avg", "seconds"}
        assert set(row["per_task"]) == set(TASKS)
        assert all(0.0 <= acc <= 1.0 for acc in row["per_task"].values())
        assert row["avg"] == pytest.approx(sum(row["per_task"].values()) / len(TASKS))
        assert row["seconds"] > 0
        # each accuracy is a count over the 10 classes x 12 test images of its task
        assert all(abs(acc * 120 - round(acc * 120)) < 1e-4 for acc in row["per_task"].values())
    methods = written["methods"]
    assert methods["individual"]["avg"] > methods["pretrained"]["avg"]
    learned = load_file(out / "runs" / "layer_wise_adamerging" / "-".join(TASKS) / "coefficients.safetensors")
    assert set(learned) == set(TASKS) and len({v.shape for v in learned.values()}) == 1
    assert learned["mnist"].numel() > 1 and not torch.allclose(learned["mnist"], torch.full_like(learned["mnist"], 0.3))
    task_wise = load_file(out / "runs" / "task_wise_adamerging" / "-".join(TASKS) / "coefficients.safetensors")
    assert torch.all(task_wise["mnist"] == task_wise["mnist"][0])  # one value per task, over every tensor
    assert not (out / "runs" / "task_arithmetic" / "-".join(TASKS) / "coefficients.safetensors").exists()
    # surgery on layer-wise AdaMerging read that row's checkpoint (and refuses to run without it)
    assert (out / "runs" / "layer_wise_adamerging" / "-".join(TASKS) / "last.ckpt").is_file()
    with pytest.raises(SystemExit, match="run --methods layer_wise_adamerging,layer_wise_adamerging_surgery"):
        mini.main([*args, "--out", str(tmp_path / "other"), "--methods", "layer_wise_adamerging_surgery"])
    table = (out / "results.md").read_text()
    assert table.splitlines()[0] == "| method | mnist | fashion_mnist | avg | seconds |"
    assert len(table.splitlines()) == 2 + len(mini.METHODS)
    assert table in capsys.readouterr().out

    # A second run, as the command (python -m), reuses the zoo: nothing is fine-tuned again. Its
    # output is its own: progress lines and the table, nothing from Lightning or a dependency.
    zoo = {path: path.stat().st_mtime_ns for path in (out / "zoo").glob("*.safetensors")}
    assert len(zoo) == len(TASKS)
    methods = "pretrained,layer_wise_adamerging"
    command = [sys.executable, "-m", "lit_adamerging.benchmarks.mini", *args, "--methods", methods]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONWARNINGS"}
    second = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert second.returncode == 0, second.stderr[-2000:]
    assert {path: path.stat().st_mtime_ns for path in (out / "zoo").glob("*.safetensors")} == zoo
    assert "already built" in second.stdout
    lines = (second.stdout + second.stderr).splitlines()
    assert [line for line in lines if not line.startswith(("[mini ", "|"))] == []
    again = json.loads((out / "results.json").read_text())["methods"]
    assert list(again) == ["pretrained", "layer_wise_adamerging"]
    assert again["pretrained"]["per_task"] == written["methods"]["pretrained"]["per_task"]


def test_bad_arguments_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        mini.main(["--data-root", str(tmp_path), "--tasks", "mnist"])
    error = capsys.readouterr().err
    assert "the data_root argument (--data-root) names" in error and "no ImageFolder tree for ['mnist']" in error
    with pytest.raises(SystemExit):
        mini.main(["--methods", "task_arithmetic,magic"])
    assert "unknown method(s) ['magic']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mini.main(["--tasks", "mnist,mnist"])
    assert "must name each task once" in capsys.readouterr().err
    bad = [
        (["--experiment", "unseen", "--methods", "individual"], "no 'individual' row"),
        (["--unseen-tasks", "gtsrb"], "--unseen-tasks goes with --experiment unseen"),
        (["--experiment", "unseen", "--tasks", "mnist,gtsrb"], "needs --unseen-tasks"),
        (["--experiment", "unseen", "--tasks", "mnist", "--unseen-tasks", "mnist"], "none of --tasks"),
        (["--experiment", "shift", "--corruptions", "fog"], "unknown corruption(s) ['fog']"),
        (["--experiment", "shift", "--severity", "6"], "--severity must be one of [1, 2, 3, 4, 5]"),
    ]
    for arguments, message in bad:
        with pytest.raises(SystemExit):
            mini.main(arguments)
        assert message in capsys.readouterr().err, arguments


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory, offline_datasets):
    """Tiny copies of mnist and fashion_mnist, the mini benchmark's arguments for them, and its default
    experiment's results (few methods): the zoo it built is reused by the experiments below."""
    root = tmp_path_factory.mktemp("mini")
    data = tiny_copy(offline_datasets(*TASKS), root / "data", train=20, test=12)
    args = ["--data-root", str(data), "--out", str(root / "out"), "--shots", "3", "--finetune-steps", "30",
            "--finetune-lr", "1e-4", "--finetune-batch", "32", "--steps", "2"]
    merged = mini.main([*args, "--tasks", ",".join(TASKS), "--methods", "pretrained,individual,task_arithmetic"])
    return root / "out", args, merged


@pytest.mark.slow  # the tiny_zoo fixture fine-tunes (about 18 s)
def test_unseen_experiment_on_a_tiny_setting(tiny_zoo, tmp_path, capsys):
    out, args, merged = tiny_zoo
    # fashion_mnist only ever unseen: its probe head is built, never a fine-tuned model of it
    unseen_out = tmp_path / "unseen-only"
    shutil.copytree(out, unseen_out, ignore=shutil.ignore_patterns("fashion_mnist.*"))
    args = [*args[:2], "--out", str(unseen_out), *args[4:]]
    methods = "pretrained,task_arithmetic,layer_wise_adamerging"
    results = mini.main([*args, "--experiment", "unseen", "--tasks", "mnist", "--unseen-tasks", "fashion_mnist",
                         "--methods", methods, "--readme", str(readme(tmp_path, "unseen"))])
    assert not (unseen_out / "zoo" / "fashion_mnist.safetensors").exists()
    assert (unseen_out / "zoo" / "heads" / "fashion_mnist.safetensors").is_file()
    written = json.loads((unseen_out / "unseen" / "results.json").read_text())
    assert written == json.loads(json.dumps(results))
    (split,) = written["splits"]
    assert (split["seen"], split["unseen"]) == (["mnist"], ["fashion_mnist"])
    assert list(split["methods"]) == methods.split(",")
    for row in split["methods"].values():
        assert set(row) == {"per_task", "seen_avg", "unseen_avg", "seconds"}
        assert (row["seen_avg"], row["unseen_avg"]) == (row["per_task"]["mnist"], row["per_task"]["fashion_mnist"])
    # the pretrained model scores the unseen task with the same probe head as in the default experiment
    pretrained = split["methods"]["pretrained"]["per_task"]
    assert pretrained == merged["methods"]["pretrained"]["per_task"]
    run = unseen_out / "runs" / "layer_wise_adamerging" / "mnist-fashion_mnist@unseen"
    learned = load_file(run / "coefficients.safetensors")
    assert list(learned) == ["mnist"]
    table = (unseen_out / "unseen" / "results.md").read_text()
    assert table.splitlines()[0] == "| method | mnist | fashion_mnist (unseen) | seen avg | unseen avg | seconds |"
    assert table in capsys.readouterr().out
    assert table in readme(tmp_path, "unseen").read_text()


@pytest.mark.slow  # the tiny_zoo fixture fine-tunes (about 18 s)
def test_shift_experiment_on_a_tiny_setting(tiny_zoo, tmp_path, capsys):
    out, args, merged = tiny_zoo
    methods = "individual,task_arithmetic,layer_wise_adamerging"
    results = mini.main([*args, "--experiment", "shift", "--tasks", ",".join(TASKS), "--corruptions", "contrast",
                         "--methods", methods, "--readme", str(readme(tmp_path, "shift"))])
    written = json.loads((out / "shift" / "results.json").read_text())
    assert written == json.loads(json.dumps(results))
    assert (written["columns"], written["severity"], list(written["methods"])) == (
        ["clean", "contrast"], mini.SHIFT_SEVERITY, methods.split(","))
    for method in ("individual", "task_arithmetic"):  # the clean column is the default experiment's
        assert written["methods"][method]["clean"]["per_task"] == merged["methods"][method]["per_task"]
    for row in written["methods"].values():
        assert row["contrast"]["avg"] == pytest.approx(sum(row["contrast"]["per_task"].values()) / len(TASKS))
    stores = [path.name for path in (out / "cache").glob("*.u8")]
    assert any("contrast2" in name for name in stores) and any("contrast" not in name for name in stores)
    table = (out / "shift" / "results.md").read_text()
    assert table.splitlines()[0] == "| method | clean | contrast | corruptions avg | seconds |"
    assert "Layer-wise AdaMerging minus task arithmetic" in table
    assert table in capsys.readouterr().out
    assert table in readme(tmp_path, "shift").read_text()


def readme(folder: Path, experiment: str) -> Path:
    """A README holding the experiment's markers (created on first use)."""
    path = folder / "README.md"
    if not path.exists():
        begin, end = mini.README_MARKERS[experiment]
        path.write_text(f"intro\n{begin}\nold\n{end}\noutro\n")
    return path



def test_heads_frozen_or_trained_jointly(tmp_path, offline_datasets):
    data = tiny_copy(offline_datasets(*TASKS), tmp_path / "data", train=6, test=2)

    def head(mode: str, steps: int) -> torch.Tensor:
        args = mini.build_parser().parse_args([
            "--data-root", str(data), "--out", str(tmp_path / f"{mode}{steps}"), "--shots", "2", "--heads", mode,
            "--finetune-steps", str(steps), "--finetune-lr", "1e-2", "--finetune-batch", "8"])
        path = finetune.fine_tune_task("mnist", args, finetune.task_preprocess(args), tmp_path / "cache")
        assert json.loads(path.with_suffix(".json").read_text())["settings"]["heads"] == mode
        return load_file(path)["classifier.weight"]

    frozen = head("frozen", 3)
    assert torch.equal(frozen, head("frozen", 1))  # the probe, untouched by fine-tuning
    assert not torch.allclose(head("joint", 3), frozen)  # trained with the backbone


@pytest.mark.slow  # the tiny_zoo fixture fine-tunes (about 18 s)
def test_passes_benchmark_times_every_phase_of_the_real_runs(tiny_zoo, capsys):
    out, args, _ = tiny_zoo
    results = passes.main([*args, "--tasks", ",".join(TASKS), "--surgery-steps", "3"])
    assert list(results) == list(passes.TIMED)
    assert set(results["task_arithmetic"]) == {"statistics", "evaluation"}
    assert set(results["task_arithmetic_surgery"]) == {"features", "steps", "statistics", "evaluation"}
    assert all(value > 0 for phases in results.values() for value in phases.values())
    printed = capsys.readouterr().out
    assert "| fisher_merging |" in printed and "| task_arithmetic_surgery |" in printed
