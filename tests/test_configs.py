"""Every shipped config and method preset parses and instantiates through the CLI (no weights or data needed)."""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import pytest

from lit_adamerging.cli import AdaMergingCLI
from lit_adamerging.data import MultiTaskDataModule
from lit_adamerging.lightning import AdaMergingModule
from lit_adamerging.lightning.statistics import FisherMergingModule, RegMeanModule
from lit_adamerging.lightning.surgery import SurgeryModule
from lit_adamerging.methods import method_module, method_names, method_settings
from lit_adamerging.models import OpenCLIPZoo, SyntheticZoo, prompts

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = str(CONFIGS / "tiny.yaml")
METHOD_KEYS = ("granularity", "init", "ties_k", "ties_normalize")
EXPECTED = {  # granularity, init, ties_k, ties_normalize
    "weight_averaging": ("task", None, None, False),
    "task_arithmetic": ("task", 0.3, None, False),
    "ties_merging": ("task", 0.3, 0.2, True),
    "task_wise": ("task", 0.3, None, False),
    "task_wise_pp": ("task", 0.3, 0.2, False),
    "layer_wise": ("layer", 0.3, None, False),
    "layer_wise_pp": ("layer", 0.3, 0.2, False),
}
# Methods with a LightningModule of their own: (class, settings the preset gives).
SURGERY = {"init": 0.3, "ties_k": None, "ties_normalize": False, "rank": 16}
OTHER_METHODS = {
    "fisher_merging": (FisherMergingModule, {"num_images": 256, "floor": 1e-6, "normalize": True}),
    "regmean": (RegMeanModule, {"num_images": 256, "alpha": 0.95}),
    "task_arithmetic_surgery": (SurgeryModule, {"granularity": "task", **SURGERY}),
    "layer_wise_surgery": (SurgeryModule, {"granularity": "layer", **SURGERY}),
}
PAPER_TASKS = ["sun397", "cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]


def cli_with(*args: str) -> AdaMergingCLI:
    with mock.patch.object(sys, "argv", ["lit-adamerging"]):  # pytest's own arguments are not the CLI's
        return AdaMergingCLI(AdaMergingModule, MultiTaskDataModule, run=False, args=list(args),
                             save_config_kwargs={"overwrite": True})


def instantiate(*configs: Path) -> AdaMergingCLI:
    return cli_with(*(arg for config in configs for arg in ("--config", str(config))))


def method_of(cli: AdaMergingCLI) -> tuple:
    return tuple(cli.model.hparams[key] for key in METHOD_KEYS)


def test_every_method_is_listed():
    assert list(method_names()) == sorted([*EXPECTED, *OTHER_METHODS])
    assert all(method_module(name) is AdaMergingModule for name in EXPECTED)


@pytest.mark.parametrize("method", sorted(OTHER_METHODS))
def test_method_chooses_its_module_class(method):
    module_class, settings = OTHER_METHODS[method]
    assert method_module(method) is module_class and method_settings(method) == settings
    # layer-wise surgery needs the learned coefficients' checkpoint (read when the model is built)
    extra = ["--model.coefficients_from=runs/tiny/layer_wise.ckpt"] if method == "layer_wise_surgery" else []
    cli = cli_with("--config", TINY, "--method", method, *extra)
    assert type(cli.model) is module_class
    assert {key: cli.model.hparams[key] for key in settings} == settings
    assert cli.model.num_classes == {"alpha": 5, "beta": 10, "gamma": 3}


def test_methods_of_different_classes_or_a_class_that_does_not_fit_are_refused():
    with pytest.raises(ValueError, match="--method is given 2 times .* for different kinds of model"):
        cli_with("--config", TINY, "--method", "regmean", "--method", "layer_wise")
    with pytest.raises(ValueError, match=r"\(regmean, fisher_merging\) .* \(FisherMergingModule, RegMeanModule\)"):
        cli_with("--config", TINY, "--method", "regmean", "--method=fisher_merging")
    both = cli_with("--config", TINY, "--method", "layer_wise", "--method=task_wise")
    assert method_of(both) == EXPECTED["task_wise"]
    with pytest.raises(ValueError, match="--method regmean runs RegMeanModule, which is not a FisherMergingModule"):
        with mock.patch.object(sys, "argv", ["lit-adamerging"]):
            AdaMergingCLI(FisherMergingModule, MultiTaskDataModule, run=False, args=["--config", TINY, "--method",
                                                                                     "regmean"])
    # an AdaMerging setting in a config is an error for a class that does not take it, naming the key
    with pytest.raises(SystemExit):
        cli_with("--config", TINY, "--method", "regmean", "--model.granularity=layer")


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_tiny_config_with_each_method(method):
    cli = cli_with("--config", TINY, "--method", method)
    assert method_of(cli) == EXPECTED[method]
    assert cli.model.num_classes == {"alpha": 5, "beta": 10, "gamma": 3}


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_method_settings_from_python(method):
    settings = method_settings(method)
    assert settings == dict(zip(METHOD_KEYS, EXPECTED[method]))
    module = AdaMergingModule(SyntheticZoo("open_clip:test-vit-tiny"), num_classes={"a": 2}, **settings)
    assert tuple(module.hparams[key] for key in METHOD_KEYS) == EXPECTED[method]
    settings["init"] = 0.9  # a fresh dict every call: changing one changes no other
    assert method_settings(method) == dict(zip(METHOD_KEYS, EXPECTED[method]))


def test_method_composes_with_config_and_model_arguments_in_order(tmp_path):
    # After --method, a --model.* argument or a --config sets the preset's keys again; other keys are kept.
    cli = cli_with("--config", TINY, "--method", "ties_merging", "--model.init=0.5", "--model.lr=0.01")
    assert method_of(cli) == ("task", 0.5, 0.2, True) and cli.model.hparams.lr == 0.01
    (tmp_path / "k.yaml").write_text("model:\n  ties_k: 0.4\n")
    cli = cli_with("--config", TINY, "--method", "ties_merging", "--config", str(tmp_path / "k.yaml"))
    assert method_of(cli) == ("task", 0.3, 0.4, True)
    # Before it: a config's method settings lose to the preset ...
    (tmp_path / "layer.yaml").write_text("model:\n  granularity: layer\n  init: 0.4\n")
    layer = str(tmp_path / "layer.yaml")
    assert method_of(cli_with("--config", TINY, "--config", layer, "--method", "weight_averaging")) == (
        "task", None, None, False
    )
    # ... a config given after the preset wins over it ...
    after = cli_with("--config", TINY, "--method", "task_wise", "--config", layer)
    assert method_of(after) == ("layer", 0.4, None, False)
    # ... and a --model.<key> the preset sets again is refused, not silently dropped; other --model.* are fine.
    with pytest.raises(ValueError, match="--model.init comes before --method task_arithmetic, whose preset sets it"):
        cli_with("--config", TINY, "--model.init=0.5", "--method", "task_arithmetic")
    cli = cli_with("--config", TINY, "--model.lr", "0.02", "--method", "task_arithmetic")
    assert method_of(cli) == EXPECTED["task_arithmetic"] and cli.model.hparams.lr == 0.02


def test_unknown_method_names_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        cli_with("--config", TINY, "--method", "magic")
    error = capsys.readouterr().err
    assert "invalid choice: 'magic'" in error and all(name in error for name in EXPECTED)
    with pytest.raises(ValueError, match="unknown merging method 'magic'; choose one of: fisher_merging, layer_wise, "):
        method_settings("magic")


def test_method_in_a_config_file_is_refused(tmp_path):
    (tmp_path / "method.yaml").write_text("method: layer_wise\n")
    with pytest.raises(ValueError, match="a config file sets 'method: layer_wise'; --method is a command-line option"):
        cli_with("--config", TINY, "--config", str(tmp_path / "method.yaml"))


@pytest.mark.parametrize("model", ["vit_b32", "vit_b16", "vit_l14"])
@pytest.mark.parametrize("method", ["task_arithmetic", "layer_wise_pp"])
def test_paper_configs(model, method):
    paper = CONFIGS / "paper"
    configs = (paper / "trainer.yaml", paper / "data.yaml", paper / f"{model}.yaml")
    cli = cli_with(*(arg for config in configs for arg in ("--config", str(config))), "--method", method)
    zoo = cli.model.zoo
    assert isinstance(zoo, OpenCLIPZoo) and zoo.pretrained == "openai"
    assert list(zoo.finetuned) == PAPER_TASKS == cli.datamodule.task_names
    assert cli.trainer.max_steps == 500
    assert cli.datamodule.batch_size == 32  # the released code's two batches of 16 per task and step
    assert cli.model.unseen_tasks == cli.datamodule.unseen_tasks == []
    # every task's head (built from the built-in class names) fits its dataset's class count
    for task, classes in cli.model.num_classes.items():
        assert len(prompts.class_names(task)) == classes
    assert cli.model.hparams.granularity == EXPECTED[method][0]


@pytest.mark.parametrize("method", sorted(OTHER_METHODS))
def test_paper_configs_run_the_other_methods_by_name(method):
    paper = CONFIGS / "paper"
    surgery = method.endswith("_surgery")
    configs = [paper / "trainer.yaml", paper / "data.yaml", paper / "vit_b32.yaml"]
    configs += [paper / "surgery.yaml"] if surgery else []
    extra = ["--model.coefficients_from=runs/paper/layer_wise.ckpt"] if method == "layer_wise_surgery" else []
    cli = cli_with(*(arg for config in configs for arg in ("--config", str(config))), "--method", method, *extra)
    assert type(cli.model) is OTHER_METHODS[method][0]
    assert list(cli.model.zoo.finetuned) == PAPER_TASKS == list(cli.model.num_classes)
    # surgery's released schedule: 1000 steps of 16 images per task; the others fit nothing
    assert (cli.trainer.max_steps, cli.datamodule.batch_size) == ((1000, 16) if surgery else (500, 32))


UNSEEN_SPLITS = {  # the paper's two unseen-task splits: seen tasks, unseen tasks
    "unseen_split1": (["sun397", "cars", "resisc45", "svhn", "gtsrb", "dtd"], ["eurosat", "mnist"]),
    "unseen_split2": (["sun397", "cars", "eurosat", "gtsrb", "mnist", "dtd"], ["resisc45", "svhn"]),
}


@pytest.mark.parametrize("split", sorted(UNSEEN_SPLITS))
@pytest.mark.parametrize("model", ["vit_b32", "vit_l14"])
def test_paper_unseen_splits_compose_with_the_paper_configs(split, model):
    paper = CONFIGS / "paper"
    configs = [paper / "trainer.yaml", paper / "data.yaml", paper / f"{model}.yaml", paper / f"{split}.yaml"]
    cli = cli_with(*(arg for config in configs for arg in ("--config", str(config))), "--method", "layer_wise")
    seen, unseen = UNSEEN_SPLITS[split]
    assert cli.datamodule.task_names == PAPER_TASKS and list(cli.model.num_classes) == PAPER_TASKS  # all eight
    assert cli.datamodule.unseen_tasks == cli.model.unseen_tasks == unseen
    assert cli.datamodule.seen_tasks == cli.model.seen_tasks == seen
    assert cli.datamodule.batch_size == 32 and cli.trainer.max_steps == 500
    assert cli.model.hparams.granularity == "layer" and cli.model.hparams.unseen_tasks == unseen
    # The split needs no other file: the zoo keeps its eight entries (the unseen ones are never read).
    assert list(cli.model.zoo.finetuned) == PAPER_TASKS


@pytest.mark.parametrize("configs", [("tiny.yaml",), ("paper/trainer.yaml", "paper/data.yaml", "paper/vit_b32.yaml")])
def test_shipped_checkpoints_are_the_latest_fits(configs):
    # A second fit in the same folder must replace last.ckpt (not write last-v1.ckpt beside it),
    # so the README's `test --ckpt_path .../last.ckpt` evaluates the run just fitted.
    from lightning.pytorch.callbacks import ModelCheckpoint

    cli = instantiate(*(CONFIGS / config for config in configs))
    (checkpoint,) = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert checkpoint.save_last is True and checkpoint.save_top_k == 0
    assert checkpoint._enable_version_counter is False
