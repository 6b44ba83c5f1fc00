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

from lit_adamerging.benchmarks import finetune, mini

TASKS = ("mnist", "fashion_mnist")

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*"),
]


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


def test_whole_pipeline_on_a_tiny_setting(tmp_path, capsys, offline_datasets):
    data = tiny_copy(offline_datasets(*TASKS), tmp_path / "data", train=20, test=12)
    out = tmp_path / "out"
    args = ["--data-root", str(data), "--tasks", ",".join(TASKS), "--out", str(out), "--shots", "3",
            "--finetune-steps", "30", "--finetune-lr", "1e-4", "--finetune-batch", "32", "--steps", "2"]
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
