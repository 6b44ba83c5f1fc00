"""Unseen (evaluation-only) tasks: evaluated with their own heads, never merged, never in the loss.

Through the Python API (AdaMergingModule + MultiTaskDataModule under a Trainer) and the command
(configs/tiny.yaml plus a fourth, unseen task): the coefficients are bit-identical to a run without
the unseen task; every accuracy, and the seen / unseen / overall averages, equal a plain reference
(the merged encoder rebuilt with a Python loop over the seen tasks' task vectors, each task's head
on its test images); the unseen task's images and fine-tuned weights are never read for the fit;
checkpoints of another split are refused; bad input is named.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import sys
from pathlib import Path
from unittest import mock

import lightning.pytorch as pl
import pytest
import torch
import yaml
from torch.utils.data import Dataset, TensorDataset

from helpers import TINY_CLIP, TINY_CONFIG, load_config, printed_metric, reference_accuracies, run_cli
from lit_adamerging import AdaMergingModule, ModelZoo, MultiTaskDataModule, SyntheticTask, SyntheticZoo, TaskData
from lit_adamerging.cli import AdaMergingCLI
from lit_adamerging.lightning.base import intended_warnings_ignored
from lit_adamerging.lightning.checkpoint_io import COEFFICIENTS_KEY
from lit_adamerging.lightning.checks import checkpoint_settings_differences

QUIET = ["--trainer.logger=false", "--trainer.enable_model_summary=false", "--trainer.enable_progress_bar=false"]


def seen_tasks() -> dict[str, SyntheticTask]:
    return {
        "alpha": SyntheticTask(num_classes=5, num_images=40, image_size=32, seed=1),
        "beta": SyntheticTask(num_classes=3, num_images=24, image_size=32, seed=2),
    }


def with_unseen() -> dict[str, SyntheticTask]:
    """The seen tasks with an unseen one between them, larger than both (more steps per pass than either)."""
    tasks = seen_tasks()
    return {"alpha": tasks["alpha"], "delta": SyntheticTask(num_classes=4, num_images=100, image_size=32, seed=4),
            "beta": tasks["beta"]}


def make_trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    options = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
                   default_root_dir=str(tmp_path))
    return pl.Trainer(**{**options, **kwargs})


def fit(tmp_path: Path, tasks: dict[str, TaskData], unseen: list[str], steps: int = 4, **kwargs):
    pl.seed_everything(0)
    data = MultiTaskDataModule(tasks, unseen_tasks=unseen, batch_size=4, eval_batch_size=50)
    module = AdaMergingModule(SyntheticZoo(TINY_CLIP, seed=0), num_classes=data.num_classes,
                              unseen_tasks=data.unseen_tasks, **kwargs)
    trainer = make_trainer(tmp_path, max_steps=steps)
    with intended_warnings_ignored():
        trainer.fit(module, datamodule=data)
    return module, data, trainer


# ----------------------------------------------------------------------------- Python API
def test_coefficients_bit_identical_with_and_without_unseen_tasks(tmp_path):
    plain, _, _ = fit(tmp_path / "a", seen_tasks(), [])
    tasks = with_unseen()
    module, data, trainer = fit(tmp_path / "b", tasks, ["delta"])
    assert module.seen_tasks == ["alpha", "beta"] and module.coefficients().shape[0] == 2
    assert not torch.equal(plain.coefficients(), torch.full_like(plain.coefficients(), 0.3))  # they did move
    assert torch.equal(module.merger.coefficients.raw, plain.merger.coefficients.raw)

    # Every accuracy equals the plain reference; avg_seen, avg_unseen and avg are plain means of them.
    with intended_warnings_ignored():
        trainer.test(module, datamodule=data, verbose=False)
    metrics = {key: value.item() for key, value in trainer.callback_metrics.items()}
    expected = reference_accuracies(SyntheticZoo(TINY_CLIP, seed=0), tasks, ["alpha", "beta"], module.coefficients())
    for task, value in expected.items():
        assert metrics[f"test/acc/{task}"] == pytest.approx(value, abs=1e-6)
    assert metrics["test/acc/avg_seen"] == pytest.approx((expected["alpha"] + expected["beta"]) / 2, abs=1e-6)
    assert metrics["test/acc/avg_unseen"] == pytest.approx(expected["delta"], abs=1e-6)
    assert metrics["test/acc/avg"] == pytest.approx(sum(expected.values()) / 3, abs=1e-6)
    validating = make_trainer(tmp_path / "v", limit_val_batches=1.0)
    with intended_warnings_ignored():
        validating.validate(module, datamodule=data, verbose=False)
    assert validating.callback_metrics["val/acc/avg_unseen"].item() == pytest.approx(expected["delta"], abs=1e-6)

    # A checkpoint keeps the split: loaded from Python it comes back; given another one, it is refused.
    trainer.save_checkpoint(tmp_path / "split.ckpt")
    loaded = AdaMergingModule.load_from_checkpoint(tmp_path / "split.ckpt", zoo=SyntheticZoo(TINY_CLIP, seed=0))
    assert loaded.unseen_tasks == ["delta"] and torch.equal(loaded.coefficients(), module.coefficients())
    with pytest.raises(ValueError, match=r"model.unseen_tasks: checkpoint \['delta'\], yours \['beta'\]"):
        AdaMergingModule.load_from_checkpoint(tmp_path / "split.ckpt", zoo=SyntheticZoo(TINY_CLIP, seed=0),
                                              unseen_tasks=["beta"])

    # Without unseen tasks, only the overall average is logged, as before.
    with intended_warnings_ignored():
        make_trainer(tmp_path / "c").test(plain, datamodule=MultiTaskDataModule(seen_tasks()), verbose=False)
    assert not any("avg_seen" in key or "avg_unseen" in key for key in plain.trainer.callback_metrics)


def test_unseen_task_has_no_fit_loader_and_leaves_the_fit_stream_alone():
    streams = []
    for tasks, unseen in ((seen_tasks(), []), (with_unseen(), ["delta"])):
        data = MultiTaskDataModule(tasks, unseen_tasks=unseen, batch_size=8, seed=3)
        data.setup("fit")
        loaders = data.train_dataloader()
        streams.append({task: list(loader.sampler) for task, loader in loaders.items()})
    assert list(streams[1]) == ["alpha", "beta"]
    # Same images in the same order, and the same epoch length (the unseen task, at 12 steps per pass, is
    # larger than alpha's 5: counting it would lengthen the epoch).
    assert streams[0] == streams[1] and len(streams[1]["alpha"]) == 5 * 8


class CountingSet(Dataset):
    """A labeled dataset that counts the images read from it."""

    def __init__(self, dataset: TensorDataset) -> None:
        self.dataset, self.reads = dataset, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        self.reads += 1
        return self.dataset[index]


class CountingTask(TaskData):
    def __init__(self, task: SyntheticTask) -> None:
        self.task, self.set = task, CountingSet(task.test_set())

    @property
    def num_classes(self) -> int:
        return self.task.num_classes

    def test_set(self, preprocess=None) -> Dataset:
        return self.set


def test_unseen_images_are_never_read_while_fitting(tmp_path):
    tasks = with_unseen()
    tasks["delta"] = counting = CountingTask(tasks["delta"])
    module, data, trainer = fit(tmp_path, tasks, ["delta"])
    assert counting.set.reads == 0
    with intended_warnings_ignored():
        trainer.test(module, datamodule=data, verbose=False)
    assert counting.set.reads == 100  # evaluated: each image once


def test_unseen_errors_name_the_tasks(tmp_path):
    tasks = with_unseen()
    with pytest.raises(ValueError, match=r"unseen task\(s\) \['gamma'\] are not among the data's tasks .*"
                                         r"\['alpha', 'delta', 'beta'\]"):
        MultiTaskDataModule(tasks, unseen_tasks=["gamma"])
    with pytest.raises(ValueError, match="every one of the data's tasks .* is unseen .* there is nothing to merge"):
        MultiTaskDataModule(tasks, unseen_tasks=["beta", "delta", "alpha"])
    with pytest.raises(ValueError, match=r"names \['delta'\] more than once"):
        MultiTaskDataModule(tasks, unseen_tasks=["delta", "delta"])
    with pytest.raises(ValueError, match=r"a list of task names, got the string 'delta'; write \[delta\]"):
        MultiTaskDataModule(tasks, unseen_tasks="delta")
    num_classes = {"alpha": 5, "delta": 4, "beta": 3}
    with pytest.raises(ValueError, match=r"unseen task\(s\) \['gamma'\] are not among the model's tasks"):
        AdaMergingModule(SyntheticZoo(TINY_CLIP), num_classes=num_classes, unseen_tasks=["gamma"])
    with pytest.raises(ValueError, match="every one of the model's tasks .* nothing to merge"):
        AdaMergingModule(SyntheticZoo(TINY_CLIP), num_classes={"alpha": 5}, unseen_tasks=["alpha"])
    # Weight averaging's 1/T counts the merged tasks only.
    averaging = AdaMergingModule(SyntheticZoo(TINY_CLIP), num_classes=num_classes, unseen_tasks=["delta"], init=None,
                                 granularity="task")
    assert torch.equal(averaging.coefficients(), torch.full_like(averaging.coefficients(), 0.5))
    # Kept in task order, whatever order they are given in.
    assert MultiTaskDataModule(tasks, unseen_tasks=["beta", "alpha"]).unseen_tasks == ["alpha", "beta"]
    assert AdaMergingModule(SyntheticZoo(TINY_CLIP), num_classes=num_classes, unseen_tasks=["beta", "alpha"]).hparams[
        "unseen_tasks"] == ["alpha", "beta"]

    # The model and the data must mark the same tasks unseen.
    data = MultiTaskDataModule(tasks, unseen_tasks=["delta"], batch_size=8)
    module = AdaMergingModule(SyntheticZoo(TINY_CLIP), num_classes=data.num_classes)
    with pytest.raises(ValueError, match=r"the model's unseen_tasks \[\] and the data module's \['delta'\] differ"):
        make_trainer(tmp_path, max_steps=1).fit(module, datamodule=data)

    # Unseen images in a training batch (a data source that ignores unseen_tasks) are refused, not ignored.
    module = AdaMergingModule(SyntheticZoo(TINY_CLIP), num_classes=data.num_classes, unseen_tasks=["delta"])
    module.configure_model()
    batch = {task: torch.zeros(2, 3, 32, 32) for task in tasks}
    with pytest.raises(ValueError, match=r"images of the unseen task\(s\) \['delta'\]; unseen tasks are evaluated"):
        module.training_step(batch, 0)


def test_synthetic_zoo_builds_fine_tuned_weights_only_for_merged_tasks():
    num_classes = {"alpha": 5, "delta": 4, "beta": 3}
    zoo = SyntheticZoo(TINY_CLIP, seed=0)
    loaded, everything = zoo.load(num_classes, merged_tasks=["beta", "alpha"]), zoo.load(num_classes)
    assert list(loaded.finetuned) == ["alpha", "beta"] and list(loaded.heads) == list(num_classes)
    assert torch.equal(loaded.heads["delta"].weight, everything.heads["delta"].weight)
    for key, value in loaded.finetuned["beta"].items():
        assert torch.equal(value, everything.finetuned["beta"][key])
    with pytest.raises(ValueError, match=r"merged task\(s\) \['gamma'\] are not among the tasks"):
        zoo.load(num_classes, merged_tasks=["gamma"])


class OldStyleZoo(ModelZoo):
    """A custom zoo written before ``merged_tasks`` existed."""

    def load(self, num_classes):
        return SyntheticZoo(TINY_CLIP, seed=0).load(num_classes)


def test_a_zoo_that_cannot_leave_out_unseen_tasks_is_named():
    num_classes = {"alpha": 5, "delta": 4}
    AdaMergingModule(OldStyleZoo(), num_classes=num_classes).configure_model()  # as before: every task merged
    module = AdaMergingModule(OldStyleZoo(), num_classes=num_classes, unseen_tasks=["delta"])
    with pytest.raises(TypeError, match=r"OldStyleZoo.load\(num_classes\) cannot be told which tasks are merged.*"
                                        r"\['delta'\].*load\(self, num_classes, merged_tasks=None\)"):
        module.configure_model()


def test_checkpoint_settings_compare_the_unseen_tasks():
    base = {"num_classes": {"a": 2, "b": 3, "c": 4}}
    ours = {**base, "unseen_tasks": ["c"]}
    settings = AdaMergingModule.CHECKPOINT_SETTINGS
    assert checkpoint_settings_differences(ours, ours, settings) == []
    assert checkpoint_settings_differences(ours, {**base, "unseen_tasks": ["b"]}, settings) == [
        "  model.unseen_tasks: checkpoint ['c'], yours ['b']"
    ]
    # A checkpoint from before unseen tasks existed merged every task.
    assert checkpoint_settings_differences(base, {**base, "unseen_tasks": []}, settings) == []
    assert checkpoint_settings_differences(base, ours, settings) == [
        "  model.unseen_tasks: checkpoint [], yours ['c']"
    ]
    # A zoo argument the checkpoint does not store, left at None now (TimmZoo's heads, added later), is no
    # difference; set to something, it is.
    zoo = {"class_path": "lit_adamerging.TimmZoo", "init_args": {"model": "m", "finetuned": {"a": "a.pt"}}}
    now = copy.deepcopy(zoo)
    now["init_args"]["heads"] = None
    assert checkpoint_settings_differences({"zoo": zoo}, {"zoo": now}, settings) == []
    now["init_args"]["heads"] = {"c": "c.safetensors"}
    assert checkpoint_settings_differences({"zoo": zoo}, {"zoo": now}, settings) == [
        "  model.zoo.init_args.heads.c: checkpoint '<not set>', yours 'c.safetensors'"
    ]


# ----------------------------------------------------------------------------- the command
def four_tasks(unseen: list[str]) -> dict:
    """configs/tiny.yaml's three tasks and a larger fourth, delta, with ``unseen`` marked."""
    tasks = load_config()["data"]["tasks"]
    tasks["delta"] = {"class_path": "lit_adamerging.SyntheticTask",
                      "init_args": {"num_classes": 4, "num_images": 100, "image_size": 32, "seed": 4}}
    return {"data": {"tasks": tasks, "unseen_tasks": unseen}}


def in_process(workdir: Path, *args: str, run: bool = True) -> AdaMergingCLI:
    with mock.patch.object(sys, "argv", ["lit-adamerging"]), contextlib.chdir(workdir), intended_warnings_ignored():
        return AdaMergingCLI(args=[*args, *(QUIET if run else ())], run=run,
                             save_config_kwargs={"overwrite": True})


def checkpoint_of(workdir: Path) -> Path:
    return workdir / "runs" / "tiny" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    """configs/tiny.yaml fitted 4 steps of 4 images per task in ``plain/``, and with the unseen delta added in
    ``unseen/``."""
    root = tmp_path_factory.mktemp("unseen_cli")
    for name, extra in (("plain", None), ("unseen", four_tasks(["delta"]))):
        workdir = root / name
        workdir.mkdir()
        shutil.copy(TINY_CONFIG, workdir / "tiny.yaml")
        configs = ["--config", "tiny.yaml"]
        if extra is not None:
            (workdir / "split.yaml").write_text(yaml.safe_dump(extra))
            configs += ["--config", "split.yaml"]
        in_process(workdir, "fit", *configs, "--trainer.max_steps=4", "--data.batch_size=4")
    return root


@pytest.mark.slow  # runs the command in another process
def test_cli_coefficients_bit_identical_and_printed_accuracies(fitted):
    plain = torch.load(checkpoint_of(fitted / "plain"), weights_only=True)
    unseen = torch.load(checkpoint_of(fitted / "unseen"), weights_only=True)
    assert unseen["hyper_parameters"]["unseen_tasks"] == ["delta"]
    raw = unseen["state_dict"][COEFFICIENTS_KEY]
    assert raw.shape == (3, 32) and torch.equal(raw, plain["state_dict"][COEFFICIENTS_KEY])

    workdir = fitted / "unseen"
    result = run_cli(workdir, "test", "--config", "tiny.yaml", "--config", "split.yaml",
                     "--ckpt_path", str(checkpoint_of(workdir)), *QUIET)
    assert result.returncode == 0, result.stderr[-3000:]
    config = load_config()
    tasks = {name: SyntheticTask(**spec["init_args"]) for name, spec in four_tasks([])["data"]["tasks"].items()}
    expected = reference_accuracies(
        SyntheticZoo(**config["model"]["zoo"]["init_args"]), tasks, ["alpha", "beta", "gamma"], raw.clamp(0, 1)
    )
    printed = {task: printed_metric(result.stdout, f"test/acc/{task}") for task in expected}
    for task, value in expected.items():
        assert printed[task] == pytest.approx(value, abs=1e-4)
    seen = [printed[task] for task in ("alpha", "beta", "gamma")]
    assert printed_metric(result.stdout, "test/acc/avg_seen") == pytest.approx(sum(seen) / 3, abs=1e-4)
    assert printed_metric(result.stdout, "test/acc/avg_unseen") == pytest.approx(printed["delta"], abs=1e-4)
    assert printed_metric(result.stdout, "test/acc/avg") == pytest.approx(sum(printed.values()) / 4, abs=1e-4)


def test_cli_refuses_a_checkpoint_of_another_split(fitted, tmp_path):
    workdir = fitted / "unseen"
    checkpoint = str(checkpoint_of(workdir))
    # gamma unseen instead of delta: as many seen tasks, so the coefficients would fit and mean something else.
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(four_tasks(["gamma"])))
    with pytest.raises(ValueError, match=r"(?s)made with other settings.*model.unseen_tasks: checkpoint \['delta'\], "
                                         r"yours \['gamma'\].*data.unseen_tasks"):
        in_process(workdir, "test", "--config", "tiny.yaml", "--config", str(tmp_path / "other.yaml"),
                   "--ckpt_path", checkpoint)
    # Asking for the checkpoint's settings takes its zoo and method, never its split: still refused.
    with pytest.raises(ValueError, match=r"model.unseen_tasks: checkpoint \['delta'\], yours \['gamma'\]"):
        in_process(workdir, "test", "--config", "tiny.yaml", "--config", str(tmp_path / "other.yaml"),
                   "--ckpt_path", checkpoint, "--settings_from_checkpoint=true")
    cli = in_process(workdir, "test", "--config", "tiny.yaml", "--config", "split.yaml", "--ckpt_path", checkpoint,
                     "--settings_from_checkpoint=true", "--trainer.callbacks=null")
    assert cli.model.unseen_tasks == ["delta"] and "test/acc/avg_unseen" in cli.trainer.callback_metrics

    # A checkpoint from before unseen tasks existed (no unseen_tasks stored) merged every task.
    old = torch.load(checkpoint_of(fitted / "plain"), weights_only=True)
    del old["hyper_parameters"]["unseen_tasks"]
    torch.save(old, tmp_path / "old.ckpt")
    cli = in_process(fitted / "plain", "test", "--config", "tiny.yaml", "--ckpt_path", str(tmp_path / "old.ckpt"),
                     "--trainer.callbacks=null")
    assert cli.model.unseen_tasks == [] and "test/acc/avg" in cli.trainer.callback_metrics
    (tmp_path / "split.yaml").write_text(yaml.safe_dump(four_tasks(["delta"])))
    with pytest.raises(ValueError, match=r"model.unseen_tasks: checkpoint \[\], yours \['delta'\]"):
        in_process(fitted / "plain", "test", "--config", "tiny.yaml", "--config", str(tmp_path / "split.yaml"),
                   "--ckpt_path", str(tmp_path / "old.ckpt"))


def test_cli_names_an_unseen_task_that_is_not_a_task(tmp_path):
    shutil.copy(TINY_CONFIG, tmp_path / "tiny.yaml")
    with pytest.raises(ValueError, match=r"unseen task\(s\) \['delta'\] are not among the data's tasks \(data.tasks\)"):
        in_process(tmp_path, "--config", "tiny.yaml", "--data.unseen_tasks=[delta]", run=False)
    cli = in_process(tmp_path, "--config", "tiny.yaml", "--data.unseen_tasks=[gamma]", run=False)
    assert cli.model.unseen_tasks == cli.datamodule.unseen_tasks == ["gamma"]  # linked from the data
