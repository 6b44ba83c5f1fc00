"""The offline mini benchmark end to end on a tiny setting: 2 real tasks, few images, few steps."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import REPOSITORY
from lit_adamerging.benchmarks import common, finetune, mini, passes
from lit_adamerging.cli import DEBUG_VARIABLE
from lit_adamerging.data.offline import DataNotFoundError

TASKS = ("mnist", "fashion_mnist")
USAGE = "usage: lit-adamerging-mini"
ERROR = "lit-adamerging-mini: error: "


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


def rows_of(folder: Path) -> list[dict]:
    """The rows of ``folder/results.json``."""
    return json.loads((folder / "results.json").read_text())["rows"]


def closing_names_the_files(printed: str, out: Path, folder: Path) -> None:
    """The run's last paragraph names results.json, results.md, the zoo and the runs folder."""
    paragraph = " ".join(printed.rstrip("\n").split("\n\n")[-1].split())
    assert paragraph.startswith("Results: ")
    for path in (folder / "results.json", folder / "results.md", out / "zoo", out / "runs"):
        assert str(path) in paragraph, (path, paragraph)


@pytest.mark.slow  # the whole benchmark, then a rerun of two methods as the command (about 90 s)
def test_whole_pipeline_on_a_tiny_setting(tmp_path, capsys, offline_datasets):
    data = tiny_copy(offline_datasets(*TASKS), tmp_path / "data", train=20, test=12)
    out = tmp_path / "out"
    args = ["--data-root", str(data), "--tasks", ",".join(TASKS), "--out", str(out), "--shots", "3",
            "--finetune-steps", "30", "--finetune-lr", "1e-4", "--finetune-batch", "32", "--steps", "2",
            "--surgery-steps", "3"]
    results = mini.main(args)
    printed = capsys.readouterr().out

    written = json.loads((out / "results.json").read_text())
    assert (written["experiment"], written["tasks"]) == ("merge", list(TASKS))
    assert [row["method"] for row in written["rows"]] == list(mini.METHODS)
    assert list(results["methods"]) == list(mini.METHODS)
    assert json.loads(json.dumps([results["methods"][row["method"]] for row in written["rows"]])) == written["rows"]
    for row in written["rows"]:
        assert set(row) == {"method", "settings", "per_task", "avg", "seconds"}
        assert row["settings"] == mini.row_settings(mini.build_parser().parse_args(args), row["method"],
                                                    {"tasks": list(TASKS)})
        assert set(row["per_task"]) == set(TASKS)
        assert all(0.0 <= acc <= 1.0 for acc in row["per_task"].values())
        assert row["avg"] == pytest.approx(sum(row["per_task"].values()) / len(TASKS))
        assert row["seconds"] > 0
        # each accuracy is a count over the 10 classes x 12 test images of its task
        assert all(abs(acc * 120 - round(acc * 120)) < 1e-4 for acc in row["per_task"].values())
    methods = results["methods"]
    assert methods["individual"]["avg"] > methods["pretrained"]["avg"]
    # each row records what changes its numbers: AdaMerging its steps, surgery its own and the learned row's
    assert "steps" not in methods["task_arithmetic"]["settings"]
    assert methods["task_arithmetic"]["settings"]["shots"] == 3
    assert methods["layer_wise_adamerging"]["settings"]["steps"] == 2
    assert methods["layer_wise_adamerging_surgery"]["settings"]["steps"] == 2
    assert "steps" not in methods["task_arithmetic_surgery"]["settings"]
    assert methods["task_arithmetic_surgery"]["settings"]["surgery_steps"] == 3
    learned = load_file(out / "runs" / "layer_wise_adamerging" / "-".join(TASKS) / "coefficients.safetensors")
    assert set(learned) == set(TASKS) and len({v.shape for v in learned.values()}) == 1
    assert learned["mnist"].numel() > 1 and not torch.allclose(learned["mnist"], torch.full_like(learned["mnist"], 0.3))
    task_wise = load_file(out / "runs" / "task_wise_adamerging" / "-".join(TASKS) / "coefficients.safetensors")
    assert torch.all(task_wise["mnist"] == task_wise["mnist"][0])  # one value per task, over every tensor
    assert not (out / "runs" / "task_arithmetic" / "-".join(TASKS) / "coefficients.safetensors").exists()
    assert (out / "runs" / "layer_wise_adamerging" / "-".join(TASKS) / "last.ckpt").is_file()
    table = (out / "results.md").read_text()
    assert table.splitlines()[0] == "| method | mnist | fashion_mnist | avg | seconds |"  # one run: no settings column
    assert len(table.splitlines()) == 2 + len(mini.METHODS) + 2  # and the line of its settings beside the defaults
    assert table.splitlines()[-1].startswith("Settings not at their defaults") and "--steps 2" in table
    assert table in printed
    closing_names_the_files(printed, out, out)
    # progress of every long phase, as lines (no terminal here): fine-tuning, fits, statistics, evaluation
    for line in (r"zoo: mnist: step 30/30 \(loss", r"layer_wise_adamerging: step 2/2 \(loss",
                 "fisher_merging: statistics", "task_arithmetic_surgery: features of every image",
                 r"task_arithmetic: test batch (\d+)/\1 ",
                 r"individual \(mnist\): test batch (\d+)/\1 "):
        assert re.search(r"^\[mini \d\d:\d\d:\d\d\] " + line, printed, re.MULTILINE), line

    # Surgery on learned coefficients reads that row's checkpoint only as learned with this run's settings,
    # and says so before building anything: one message, no usage block.
    for other, missing in ((["--steps", "3"], "--steps 2 there, --steps 3 here"), (["--out", str(tmp_path / "x")],
                                                                                   "does not exist")):
        with pytest.raises(SystemExit) as exit_info:
            mini.main([*args, *other, "--methods", "layer_wise_adamerging_surgery"])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert error.startswith(ERROR) and missing in error and USAGE not in error
        assert "run --methods layer_wise_adamerging,layer_wise_adamerging_surgery" in error
    assert not (tmp_path / "x").exists()

    # A rerun of two methods, as the command (python -m), reuses the zoo: nothing is fine-tuned again. Its
    # rows replace theirs (same settings), every other row is kept. Its output is its own: progress lines,
    # the table and the closing paragraph, nothing from Lightning or a dependency.
    zoo = {path: path.stat().st_mtime_ns for path in (out / "zoo").glob("*.safetensors")}
    assert len(zoo) == len(TASKS)
    command = [sys.executable, "-m", "lit_adamerging.benchmarks.mini", *args, "--methods",
               "layer_wise_adamerging,pretrained"]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONWARNINGS"}
    second = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stderr == ""
    assert {path: path.stat().st_mtime_ns for path in (out / "zoo").glob("*.safetensors")} == zoo
    assert "already built" in second.stdout
    body, closing = second.stdout.rstrip("\n").rsplit("\n\n", 1)
    assert closing.startswith("Results: ")
    assert [line for line in body.splitlines() if line and not line.startswith(("[mini ", "|", "Settings "))] == []
    again = rows_of(out)
    assert [row["method"] for row in again] == list(mini.METHODS)
    rerun = {row["method"]: row for row in again if row["seconds"] != methods[row["method"]]["seconds"]}
    assert set(rerun) == {"pretrained", "layer_wise_adamerging"}
    assert rerun["pretrained"]["per_task"] == methods["pretrained"]["per_task"]
    assert (out / "results.md").read_text() in second.stdout


def test_usage_errors_print_the_usage(tmp_path, capsys):
    bad = [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
        (["--methods", "task_arithmetic,magic"], "unknown method(s) ['magic']"),
        (["--tasks", "mnist,mnist"], "must name each task once"),
        (["--experiment", "unseen", "--methods", "individual"], "no 'individual' row"),
        (["--unseen-tasks", "gtsrb"], "--unseen-tasks goes with --experiment unseen"),
        (["--experiment", "unseen", "--tasks", "mnist,gtsrb"], "needs --unseen-tasks"),
        (["--experiment", "unseen", "--tasks", "mnist", "--unseen-tasks", "mnist"], "none of --tasks"),
        (["--experiment", "shift", "--corruptions", "fog"], "unknown corruption(s) ['fog']"),
        (["--experiment", "shift", "--severity", "6"], "--severity must be one of [1, 2, 3, 4, 5]"),
    ]
    for arguments, message in bad:
        with pytest.raises(SystemExit) as exit_info:
            mini.main([*arguments, "--out", str(tmp_path)])
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and error.startswith(USAGE) and message in error, arguments
    assert list(tmp_path.iterdir()) == []


def test_errors_about_data_and_files_are_one_message(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_VARIABLE, raising=False)
    out = ["--out", str(tmp_path / "out")]
    (tmp_path / "README.md").write_text("no markers\n")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{not json")
    bad = [
        (["--data-root", str(tmp_path), "--tasks", "mnist", *out],
         ["the data_root argument (--data-root) names", "no ImageFolder tree for ['mnist']"]),
        (["--readme", str(tmp_path / "README.md"), *out], ["must hold the markers <!-- mini-benchmark:begin -->"]),
        (["--out", str(tmp_path / "broken")], ["results.json is not a results.json of", "not JSON"]),
    ]
    for arguments, messages in bad:
        with pytest.raises(SystemExit) as exit_info:
            mini.main(arguments)
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and error.startswith(ERROR) and USAGE not in error, arguments
        assert "Traceback" not in error and all(message in error for message in messages), error
        assert error.count("\n") == 2 and f"set {DEBUG_VARIABLE}=1" in error  # the message, then the hint
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv(DEBUG_VARIABLE, "1")  # the error itself, with its traceback
    with pytest.raises(DataNotFoundError, match="no ImageFolder tree"):
        mini.main(bad[0][0])


def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise(monkeypatch, capsys):
    with common.Progress("fit", 3) as progress:  # lines: none until the end (under 30 s), then one
        for step in range(3):
            progress.update(1, f"loss {step}")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and re.fullmatch(r"\[mini \d\d:\d\d:\d\d\] fit: step 3/3 \(loss 2, 0 s\)", lines[0])
    monkeypatch.setattr(common, "PROGRESS_SECONDS", 0.0)  # a line at every count past the interval
    with common.Progress("zoo: mnist", 3) as progress:
        for _ in range(3):
            progress.update()
    assert [line.split("] ")[1] for line in capsys.readouterr().out.splitlines()] == [
        "zoo: mnist: step 1/3 (0 s)", "zoo: mnist: step 2/3 (0 s)", "zoo: mnist: step 3/3 (0 s)"]

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with common.Progress("regmean", 4, "test batch") as progress:
        for _ in range(4):
            progress.update()
    assert "\rregmean:   0%|" in terminal.getvalue() and "0/4" in terminal.getvalue()  # tqdm's bar on stderr
    assert capsys.readouterr().out.splitlines()[-1].endswith("regmean: test batch 4/4 (0 s)")  # and a last line


def test_options_doc_lists_the_parsers_options():
    doc = (REPOSITORY / "docs" / "mini_benchmark.md").read_text()
    begin, end = mini.OPTIONS_MARKERS
    listed = doc.split(begin)[1].split(end)[0].strip("\n") + "\n"
    assert listed == mini.options_markdown(), (
        "docs/mini_benchmark.md's option table is not the parser's: regenerate it with "
        "python -c 'from lit_adamerging.benchmarks.mini import write_options; write_options()'"
    )
    options = re.findall(r"^\| `(--[\w-]+)` \|", listed, re.MULTILINE)
    assert options and options == re.findall(r"\[(--[\w-]+)", mini.build_parser().format_usage())


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


@pytest.mark.slow  # the tiny_zoo fixture fine-tunes (about 18 s), then three short reruns
def test_reruns_accumulate_rows(tiny_zoo, tmp_path, capsys):
    source, args, merged = tiny_zoo
    out = tmp_path / "out"
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("unseen", "shift"))
    args = [*args[:2], "--out", str(out), *args[4:], "--tasks", ",".join(TASKS)]
    first = rows_of(out)
    assert [row["method"] for row in first] == ["pretrained", "individual", "task_arithmetic"]

    # the same method with the same settings: its row replaced, the others kept
    capsys.readouterr()
    mini.main([*args, "--methods", "task_arithmetic"])
    rows = rows_of(out)
    assert [row["method"] for row in rows] == ["pretrained", "individual", "task_arithmetic"]
    assert rows[:2] == first[:2] and rows[2]["seconds"] != first[2]["seconds"]
    assert rows[2]["per_task"] == first[2]["per_task"] and rows[2]["settings"] == first[2]["settings"]
    closing_names_the_files(capsys.readouterr().out, out, out)

    # other settings: a row beside the first, the table in the methods' order with a settings column
    again = mini.main([*args, "--methods", "task_arithmetic,weight_averaging", "--task-vector-dtype", "bfloat16"])
    assert list(again["methods"]) == ["weight_averaging", "task_arithmetic"]  # run in the table's order
    rows = rows_of(out)
    assert [row["method"] for row in rows] == [
        "pretrained", "individual", "task_arithmetic", "weight_averaging", "task_arithmetic"]  # as measured
    assert [row["settings"]["task_vector_dtype"] for row in rows[2:]] == ["float32", "bfloat16", "bfloat16"]
    table = (out / "results.md").read_text().splitlines()
    assert table[0] == "| method | settings | mnist | fashion_mnist | avg | seconds |"
    assert [line.split(" | ")[:2] for line in table[2:7]] == [
        ["| pretrained", "--task-vector-dtype float32"], ["| individual", "--task-vector-dtype float32"],
        ["| weight_averaging", "--task-vector-dtype bfloat16"], ["| task_arithmetic", "--task-vector-dtype float32"],
        ["| task_arithmetic", "--task-vector-dtype bfloat16"]]
    assert table[-1].startswith("Settings not at their defaults") and "--shots 3" in table[-1]

    # a results.json of an earlier version (one run's rows by method, no settings): its rows kept, unknown
    older = tmp_path / "older"
    shutil.copytree(source, older, ignore=shutil.ignore_patterns("unseen", "shift"))
    old_rows = {row["method"]: {key: row[key] for key in ("per_task", "avg", "seconds")} for row in first}
    (older / "results.json").write_text(json.dumps({"tasks": list(TASKS), "methods": old_rows}))
    mini.main([*args[:2], "--out", str(older), *args[4:], "--methods", "pretrained"])
    rows = rows_of(older)
    assert [(row["method"], mini._known(row["settings"])) for row in rows] == [
        ("pretrained", False), ("individual", False), ("task_arithmetic", False), ("pretrained", True)]
    assert rows[0]["per_task"] == rows[3]["per_task"] == first[0]["per_task"]
    table = (older / "results.md").read_text().splitlines()
    assert [line.split(" | ")[:2] for line in table[2:6]] == [
        ["| pretrained", mini.UNKNOWN_SETTINGS], ["| pretrained", ""], ["| individual", mini.UNKNOWN_SETTINGS],
        ["| task_arithmetic", mini.UNKNOWN_SETTINGS]]


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
    (split,) = results["splits"]
    assert (split["seen"], split["unseen"]) == (["mnist"], ["fashion_mnist"])
    assert list(split["methods"]) == methods.split(",")
    assert written == {"experiment": "unseen", "rows": json.loads(json.dumps(list(split["methods"].values())))}
    for row in written["rows"]:
        assert set(row) == {"method", "settings", "per_task", "seen_avg", "unseen_avg", "seconds"}
        assert (row["settings"]["tasks"], row["settings"]["unseen_tasks"]) == (["mnist"], ["fashion_mnist"])
        assert (row["seen_avg"], row["unseen_avg"]) == (row["per_task"]["mnist"], row["per_task"]["fashion_mnist"])
    # the pretrained model scores the unseen task with the same probe head as in the default experiment
    pretrained = split["methods"]["pretrained"]["per_task"]
    assert pretrained == merged["methods"]["pretrained"]["per_task"]
    run = unseen_out / "runs" / "layer_wise_adamerging" / "mnist-fashion_mnist@unseen"
    learned = load_file(run / "coefficients.safetensors")
    assert list(learned) == ["mnist"]
    table = (unseen_out / "unseen" / "results.md").read_text()
    assert table.splitlines()[0] == "| method | mnist | fashion_mnist (unseen) | seen avg | unseen avg | seconds |"
    printed = capsys.readouterr().out
    assert table in printed and "layer_wise_adamerging (mnist-fashion_mnist@unseen): step 2/2" in printed
    assert table in readme(tmp_path, "unseen").read_text()
    closing_names_the_files(printed, unseen_out, unseen_out / "unseen")


@pytest.mark.slow  # the tiny_zoo fixture fine-tunes (about 18 s)
def test_shift_experiment_on_a_tiny_setting(tiny_zoo, tmp_path, capsys):
    out, args, merged = tiny_zoo
    methods = "individual,task_arithmetic,layer_wise_adamerging"
    results = mini.main([*args, "--experiment", "shift", "--tasks", ",".join(TASKS), "--corruptions", "contrast",
                         "--methods", methods, "--readme", str(readme(tmp_path, "shift"))])
    written = json.loads((out / "shift" / "results.json").read_text())
    assert (results["columns"], results["severity"], list(results["methods"])) == (
        ["clean", "contrast"], mini.SHIFT_SEVERITY, methods.split(","))
    assert written["rows"] == json.loads(json.dumps(list(results["methods"].values())))
    assert (written["columns"], written["tasks"]) == (["clean", "contrast"], list(TASKS))
    for method in ("individual", "task_arithmetic"):  # the clean column is the default experiment's
        assert results["methods"][method]["columns"]["clean"]["per_task"] == merged["methods"][method]["per_task"]
    for row in written["rows"]:
        assert row["settings"]["severity"] == mini.SHIFT_SEVERITY
        contrast = row["columns"]["contrast"]
        assert contrast["avg"] == pytest.approx(sum(contrast["per_task"].values()) / len(TASKS))
        assert row["seconds"] == pytest.approx(sum(column["seconds"] for column in row["columns"].values()))
    stores = [path.name for path in (out / "cache").glob("*.u8")]
    assert any("contrast2" in name for name in stores) and any("contrast" not in name for name in stores)
    table = (out / "shift" / "results.md").read_text()
    assert table.splitlines()[0] == "| method | clean | contrast | corruptions avg | seconds |"
    assert "Layer-wise AdaMerging minus task arithmetic" in table
    assert table in capsys.readouterr().out
    assert table in readme(tmp_path, "shift").read_text()

    # a rerun with another corruption and the same settings adds its column to the same rows
    mini.main([*args, "--experiment", "shift", "--tasks", ",".join(TASKS), "--corruptions", "pixelate",
               "--methods", "task_arithmetic"])
    rows = rows_of(out / "shift")
    assert [row["method"] for row in rows] == methods.split(",")
    assert list(rows[1]["columns"]) == ["clean", "contrast", "pixelate"] and list(rows[0]["columns"]) == [
        "clean", "contrast"]
    assert rows[1]["columns"]["contrast"] == written["rows"][1]["columns"]["contrast"]
    assert json.loads((out / "shift" / "results.json").read_text())["columns"] == ["clean", "pixelate", "contrast"]


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
