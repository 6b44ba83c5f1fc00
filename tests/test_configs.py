"""Every shipped config parses and instantiates through the CLI (no weights or data needed)."""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import pytest

from lit_adamerging.cli import AdaMergingCLI
from lit_adamerging.data import MultiTaskDataModule
from lit_adamerging.lightning import AdaMergingModule
from lit_adamerging.models import OpenCLIPZoo, prompts

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
METHODS = sorted(path.stem for path in (CONFIGS / "methods").glob("*.yaml"))
EXPECTED = {  # granularity, init, ties_k, ties_normalize
    "weight_averaging": ("task", None, None, False),
    "task_arithmetic": ("task", 0.3, None, False),
    "ties_merging": ("task", 0.3, 0.2, True),
    "task_wise": ("task", 0.3, None, False),
    "task_wise_pp": ("task", 0.3, 0.2, False),
    "layer_wise": ("layer", 0.3, None, False),
    "layer_wise_pp": ("layer", 0.3, 0.2, False),
}
PAPER_TASKS = ["sun397", "cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]


def instantiate(*configs: Path) -> AdaMergingCLI:
    args = [arg for config in configs for arg in ("--config", str(config))]
    with mock.patch.object(sys, "argv", ["lit-adamerging"]):  # pytest's own arguments are not the CLI's
        return AdaMergingCLI(AdaMergingModule, MultiTaskDataModule, run=False, args=args,
                             save_config_kwargs={"overwrite": True})


def test_every_method_config_is_listed():
    assert METHODS == sorted(EXPECTED)


@pytest.mark.parametrize("method", METHODS)
def test_tiny_config_with_each_method(method):
    cli = instantiate(CONFIGS / "tiny.yaml", CONFIGS / "methods" / f"{method}.yaml")
    hparams = cli.model.hparams
    assert (hparams.granularity, hparams.init, hparams.ties_k, hparams.ties_normalize) == EXPECTED[method]
    assert cli.model.num_classes == {"alpha": 5, "beta": 10, "gamma": 3}


@pytest.mark.parametrize("model", ["vit_b32", "vit_b16", "vit_l14"])
@pytest.mark.parametrize("method", ["task_arithmetic", "layer_wise_pp"])
def test_paper_configs(model, method):
    paper = CONFIGS / "paper"
    cli = instantiate(paper / "trainer.yaml", paper / "data.yaml", paper / f"{model}.yaml",
                      CONFIGS / "methods" / f"{method}.yaml")
    zoo = cli.model.zoo
    assert isinstance(zoo, OpenCLIPZoo) and zoo.pretrained == "openai"
    assert list(zoo.finetuned) == PAPER_TASKS == cli.datamodule.task_names
    assert cli.trainer.max_steps == 500
    # every task's head (built from the built-in class names) fits its dataset's class count
    for task, classes in cli.model.num_classes.items():
        assert len(prompts.class_names(task)) == classes
    assert cli.model.hparams.granularity == EXPECTED[method][0]


@pytest.mark.parametrize("configs", [("tiny.yaml",), ("paper/trainer.yaml", "paper/data.yaml", "paper/vit_b32.yaml")])
def test_shipped_checkpoints_are_the_latest_fits(configs):
    # A second fit in the same folder must replace last.ckpt (not write last-v1.ckpt beside it),
    # so the README's `test --ckpt_path .../last.ckpt` evaluates the run just fitted.
    from lightning.pytorch.callbacks import ModelCheckpoint

    cli = instantiate(*(CONFIGS / config for config in configs))
    (checkpoint,) = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert checkpoint.save_last is True and checkpoint.save_top_k == 0
    assert checkpoint._enable_version_counter is False
