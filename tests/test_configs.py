"""Every shipped config and method preset parses and instantiates through the CLI (no weights or data needed)."""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import pytest

from helpers import CONFIGS, TINY_CLIP, TINY_CONFIG
from lit_adamerging.cli import AdaMergingCLI, main
from lit_adamerging.lightning import (
    AdaMergingModule,
    EMRMergingModule,
    FisherMergingModule,
    IsotropicMergingModule,
    RankWiseAdaMergingModule,
    RegMeanModule,
    SurgeryModule,
    TaskArithmeticModule,
    TSVMergingModule,
    WEMoEModule,
)
from lit_adamerging.methods import create_method, method_class, method_names, method_of, method_settings
from lit_adamerging.models import OpenCLIPZoo, SyntheticZoo, prompts

# Every method: its class and the settings its preset gives.
METHODS = {
    "weight_averaging": (TaskArithmeticModule, {"scale": None}),
    "task_arithmetic": (TaskArithmeticModule, {"scale": 0.3}),
    "ties_merging": (TaskArithmeticModule, {"scale": 0.3, "ties_k": 0.2, "ties_normalize": True}),
    "task_wise_adamerging": (AdaMergingModule, {"granularity": "task", "init": 0.3, "ties_k": None,
                                                "ties_normalize": False}),
    "task_wise_adamerging_pp": (AdaMergingModule, {"granularity": "task", "init": 0.3, "ties_k": 0.2,
                                                   "ties_normalize": False}),
    "layer_wise_adamerging": (AdaMergingModule, {"granularity": "layer", "init": 0.3, "ties_k": None,
                                                 "ties_normalize": False}),
    "layer_wise_adamerging_pp": (AdaMergingModule, {"granularity": "layer", "init": 0.3, "ties_k": 0.2,
                                                    "ties_normalize": False}),
    "rank_wise_adamerging": (RankWiseAdaMergingModule, {"scale": 0.3, "init": 0.1, "temperature": 10.0,
                                                        "straight_through": True, "rank_fraction": None,
                                                        "base": "task_arithmetic"}),
    "rank_wise_adamerging_tsv": (RankWiseAdaMergingModule, {"scale": 1.0, "init": 0.1, "temperature": 10.0,
                                                            "straight_through": True, "rank_fraction": None,
                                                            "base": "tsv"}),
    "fisher_merging": (FisherMergingModule, {"num_images": 256, "floor": 1e-6, "normalize": True}),
    "regmean": (RegMeanModule, {"num_images": 256, "alpha": 0.95}),
    "tsv_merging": (TSVMergingModule, {"alpha": 1.0, "rank_fraction": None}),
    "iso_c_merging": (IsotropicMergingModule, {"alpha": 1.0, "common_fraction": 1.0}),
    "iso_cts_merging": (IsotropicMergingModule, {"alpha": 1.0, "common_fraction": 0.8}),
    "task_arithmetic_surgery": (SurgeryModule, {"merge": "task_arithmetic", "rank": 16}),
    "layer_wise_adamerging_surgery": (SurgeryModule, {"merge": "layer_wise_adamerging", "rank": 16}),
    "emr_merging": (EMRMergingModule, {"rescaler_sum": "entries"}),
    "wemoe": (WEMoEModule, {"mlp_modules": None, "scale": 0.3, "init": 0.3, "router_depth": 2, "lr": 1e-4}),
}
# layer-wise surgery needs the learned coefficients' checkpoint (read when the model is used)
EXTRA = {"layer_wise_adamerging_surgery": ["--model.coefficients_from=runs/tiny/layer_wise.ckpt"]}
PAPER_TASKS = ["sun397", "cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]


def cli_with(*args: str) -> AdaMergingCLI:
    with mock.patch.object(sys, "argv", ["lit-adamerging"]):  # pytest's own arguments are not the CLI's
        return AdaMergingCLI(run=False, args=list(args), save_config_kwargs={"overwrite": True})


def instantiate(*configs: Path) -> AdaMergingCLI:
    return cli_with(*(arg for config in configs for arg in ("--config", str(config))))


def test_every_method_is_listed_once_with_its_class():
    assert list(method_names()) == sorted(METHODS)
    for name, (cls, settings) in METHODS.items():
        assert method_class(name) is cls and method_settings(name) == settings


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_by_name_builds_its_class_with_its_settings(method):
    cls, settings = METHODS[method]
    cli = cli_with("--config", str(TINY_CONFIG), "--method", method, *EXTRA.get(method, []))
    assert type(cli.model) is cls and method_of(cli.model) == method
    assert {key: cli.model.hparams[key] for key in settings} == settings
    assert cli.model.num_classes == {"alpha": 5, "beta": 10, "gamma": 3}
    # The same module from Python, by the same name.
    extra = {"coefficients_from": "runs/tiny/layer_wise.ckpt"} if method in EXTRA else {}
    module = create_method(method, SyntheticZoo(TINY_CLIP), {"a": 2, "b": 3}, **extra)
    assert type(module) is cls and method_of(module) == method
    fresh = method_settings(method)
    fresh["rank"] = 99  # a fresh dict every call: changing one changes no other
    assert method_settings(method) == settings


def test_without_a_method_the_model_is_layer_wise_adamerging():
    assert method_of(instantiate(TINY_CONFIG).model) == "layer_wise_adamerging"


def test_method_is_a_config_by_name_with_lightning_clis_order(tmp_path):
    # After --method, a --model.* argument or a --config sets its keys again; other keys are kept.
    cli = cli_with("--config", str(TINY_CONFIG), "--method", "ties_merging", "--model.scale=0.5")
    assert (cli.model.hparams.scale, cli.model.hparams.ties_k) == (0.5, 0.2) and method_of(cli.model) is None
    (tmp_path / "k.yaml").write_text("model:\n  init_args:\n    ties_k: 0.4\n")
    cli = cli_with("--config", str(TINY_CONFIG), "--method", "ties_merging", "--config", str(tmp_path / "k.yaml"))
    assert (cli.model.hparams.scale, cli.model.hparams.ties_k) == (0.3, 0.4)
    # A later method replaces an earlier one, class and settings.
    cli = cli_with("--config", str(TINY_CONFIG), "--method", "regmean", "--method=layer_wise_adamerging_pp")
    assert method_of(cli.model) == "layer_wise_adamerging_pp"
    # The zoo of the config is kept across a change of class.
    assert cli.model.zoo.seed == 0 and isinstance(cli.model.zoo, SyntheticZoo)
    # A setting the chosen class does not take is an error naming it.
    with pytest.raises(SystemExit):
        cli_with("--config", str(TINY_CONFIG), "--method", "regmean", "--model.granularity=layer")


def test_unknown_method_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown merging method 'magic'; choose one of: emr_merging, fisher_merging"):
        cli_with("--config", str(TINY_CONFIG), "--method", "magic")
    with pytest.raises(ValueError, match="unknown merging method 'magic'"):
        method_settings("magic")


def test_method_in_a_config_file_is_refused(tmp_path):
    (tmp_path / "method.yaml").write_text("method: layer_wise_adamerging\n")
    with pytest.raises(ValueError, match="a config file sets 'method: layer_wise_adamerging'; --method is a "):
        cli_with("--config", str(TINY_CONFIG), "--config", str(tmp_path / "method.yaml"))


def test_the_methods_command_lists_every_method_on_one_line(capsys):
    from lit_adamerging.cli import main

    main(["methods"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(method_names())
    assert all(line.split()[1] == METHODS[line.split()[0]][0].__name__ for line in lines)


@pytest.mark.parametrize("model", ["vit_b32", "vit_b16", "vit_l14"])
@pytest.mark.parametrize("method", ["task_arithmetic", "layer_wise_adamerging_pp"])
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
    assert method_of(cli.model) == method


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"task_arithmetic", "layer_wise_adamerging_pp"}))
def test_paper_configs_run_every_method_by_name(method):
    paper = CONFIGS / "paper"
    surgery = method.endswith("_surgery")
    configs = [paper / "trainer.yaml", paper / "data.yaml", paper / "vit_b32.yaml"]
    configs += [paper / "surgery.yaml"] if surgery else []
    extra = ["--model.coefficients_from=runs/paper/layer_wise.ckpt"] if method in EXTRA else []
    cli = cli_with(*(arg for config in configs for arg in ("--config", str(config))), "--method", method, *extra)
    assert method_of(cli.model) == method
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
    arguments = [arg for config in configs for arg in ("--config", str(config))]
    cli = cli_with(*arguments, "--method", "layer_wise_adamerging")
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


def test_shipped_configs_are_named_without_a_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: the names come from the package
    cli = cli_with("--config", "tiny", "--method", "task_arithmetic")
    assert list(cli.datamodule.task_names) == ["alpha", "beta", "gamma"] and isinstance(cli.model.zoo, SyntheticZoo)
    paper = cli_with("--config", "paper/trainer", "--config=paper/data", "-c", "paper/vit_b32")
    assert paper.trainer.max_steps == 500 and list(paper.model.zoo.finetuned) == PAPER_TASKS
    # a file of that name in the working folder is still the file
    (tmp_path / "tiny").write_text("model:\n  init_args:\n    init: 0.7\n")
    assert cli_with("--config", str(CONFIGS / "tiny.yaml"), "--config", "tiny").model.hparams.init == 0.7
    main(["configs"])
    listed = capsys.readouterr().out.split()
    assert {"tiny", "paper/vit_b32", "paper/surgery", "trainer/ddp"} <= set(listed) and listed == sorted(listed)


def test_version_and_the_options_the_command_does_not_offer(capsys):
    from lit_adamerging import __version__

    main(["--version"])
    assert capsys.readouterr().out.strip() == f"lit-adamerging {__version__}"
    tiny = str(TINY_CONFIG)
    refusals = (["fit", "--config", tiny, "--optimizer", "SGD"], ["fit", "--config", tiny, "--lr_scheduler", "StepLR"],
                ["predict", "--config", tiny])
    for refused in refusals:
        with pytest.raises(SystemExit) as exit_code, mock.patch.object(sys, "argv", ["lit-adamerging"]):
            AdaMergingCLI(args=refused)
        assert exit_code.value.code == 2
        assert "unrecognized arguments" in capsys.readouterr().err or refused[0] == "predict"
