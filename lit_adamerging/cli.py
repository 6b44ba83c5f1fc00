"""The ``lit-adamerging`` command: LightningCLI with fit / validate / test, and ``methods`` to list the methods.

Example::

    lit-adamerging fit --config tiny --method layer_wise_adamerging
    lit-adamerging test --config tiny --ckpt_path runs/tiny/checkpoints/last.ckpt
    lit-adamerging test --config tiny --method task_arithmetic
    lit-adamerging methods

The model is any merging module, chosen LightningCLI's way (``model: {class_path, init_args}``;
without a ``class_path``, :class:`~lit_adamerging.AdaMergingModule`). ``--method NAME`` is
``--config`` of that method's preset (:mod:`lit_adamerging.methods`), with LightningCLI's own rules:
what comes later wins, and a later ``class_path`` keeps only the arguments its class takes (so
give ``--model.<key>`` options after ``--method``). A method with nothing to learn refuses ``fit``;
evaluating a learned one needs ``--ckpt_path``.

Checkpoints are data, not configuration. LightningCLI itself would merge a checkpoint's stored
hyperparameters over the user's config; here what the user passes decides, and a checkpoint
written by another module class, or made with other settings (zoo, tasks, the class's
``CHECKPOINT_SETTINGS``), stops the run with an error listing them. ``--settings_from_checkpoint=true``
takes the class, the zoo and the method's settings from the checkpoint instead, except the zoo's
``allow_pickle`` and ``head_cache_dir``, which always come from the user's config; the tasks always
come from ``data.tasks``, and the unseen ones (evaluated, never merged) from ``data.unseen_tasks``,
linked into the model like ``num_classes``. The checkpoint is read once
(:mod:`~lit_adamerging.lightning.checkpoint_io`) and the Trainer loads a private copy of the bytes
checked.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import get_loader, set_loader
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from lit_adamerging import __version__
from lit_adamerging.allocator import retain_freed_memory
from lit_adamerging.data import MultiTaskDataModule
from lit_adamerging.lightning.base import MergingModule, intended_warnings_ignored
from lit_adamerging.lightning.checkpoint_io import fetch_checkpoint, load_checkpoint, private_copy
from lit_adamerging.lightning.checks import (
    USER_ONLY_ZOO_ARGS,
    check_checkpoint_class,
    check_checkpoint_settings,
    named_class,
    same_class,
)
from lit_adamerging.methods import describe_methods, method_config, method_names

# Settings the model takes from the data module (the tasks, which are unseen): never from a checkpoint.
DATA_SETTINGS = ("num_classes", "unseen_tasks")
DESCRIPTION = (
    "Merge fine-tuned models into one multi-task model: AdaMerging and the other merging methods, fitted on "
    "unlabeled images (fit) and evaluated per task (validate, test). `lit-adamerging methods` and "
    "`lit-adamerging configs` list the names --method and --config take."
)
# ckpt_path values the Trainer resolves to a file itself (read then through SafeCheckpointIO).
LIGHTNING_CKPT_ALIASES = ("last", "best", "hpc")
DEFAULT_MODEL = "lit_adamerging.AdaMergingModule"


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping names the same key twice (YAML itself would silently keep the last one)."""


def _reject_duplicate_keys(node: yaml.Node) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    raise DuplicateKeyError(
                        f"key {key.value!r} is given twice in the same mapping (lines {seen[key.value] + 1} and "
                        f"{key.start_mark.line + 1}); give each key, e.g. each task, once."
                    )
                seen[key.value] = key.start_mark.line
            _reject_duplicate_keys(value)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _reject_duplicate_keys(item)


def install_strict_yaml_loader() -> None:
    """Make jsonargparse reject configs that give a key twice (for instance a task name) instead of keeping the last."""
    default = get_loader("yaml")
    if getattr(default, "rejects_duplicate_keys", False):
        return

    def strict_yaml_load(stream: str) -> Any:
        for document in yaml.compose_all(stream, Loader=yaml.SafeLoader):
            _reject_duplicate_keys(document)
        return default(stream)

    strict_yaml_load.rejects_duplicate_keys = True  # type: ignore[attr-defined]
    set_loader("yaml", strict_yaml_load, exceptions=(yaml.YAMLError,))


def check_config_files(args: list[str]) -> None:
    """Parse every YAML file named on the command line (``--config FILE``, ``--data=FILE``, ...) once beforehand, so
    that a syntax error or a key given twice is reported with the file's name, line and column.

    Raises:
        ValueError: a file is not valid YAML or gives a key twice.
    """
    for arg in args:
        value = arg.partition("=")[2] if arg.startswith("--") and "=" in arg else arg
        path = Path(value).expanduser()
        if path.suffix.lower() not in (".yaml", ".yml") or not path.is_file():
            continue
        with path.open(encoding="utf-8") as stream:
            try:
                for document in yaml.compose_all(stream, Loader=yaml.SafeLoader):
                    _reject_duplicate_keys(document)
            except DuplicateKeyError as error:
                raise ValueError(f"{path}: {error}") from None
            except yaml.YAMLError as error:
                raise ValueError(f"{path} is not valid YAML: {error}") from None


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


@contextlib.contextmanager
def dependency_noise_hidden() -> Iterator[None]:
    """Inside the block, hide what dependencies print that is not about this run.

    Lightning's tips (litlogger), the deprecations Lightning itself triggers in PyTorch's pytree API
    and in jsonargparse, and LightningCLI's note that the arguments it is given differ from the
    command line's (the CLI expands method and config names first).
    """
    lightning_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    tips = _DropTips()
    lightning_log.addFilter(tips)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
            # jsonargparse >= 4.49 on the APIs Lightning 2.6's LightningCLI calls
            warnings.filterwarnings("ignore", message=r"(?s)\s*(By default only one JsonargparseDeprecationWarning"
                                                      r"|.*was deprecated in v4\.\d+)")
            # our own: --method and shipped --config names are expanded before LightningCLI parses them
            warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended to run")
            yield
    finally:
        lightning_log.removeFilter(tips)


def data_seed(seed_everything: bool | int) -> int:
    """The fit stream's seed: ``seed_everything``'s integer; 0 when it is true or false."""
    return seed_everything if isinstance(seed_everything, int) and not isinstance(seed_everything, bool) else 0


def shipped_configs() -> tuple[str, ...]:
    """The names of the configs shipped in the package (``tiny``, ``paper/vit_b32``, ``trainer/ddp``, ...), sorted."""
    root = files("lit_adamerging") / "configs"
    names = [f"{entry.name[:-5]}" for entry in root.iterdir() if entry.name.endswith(".yaml")]
    names += [f"{folder.name}/{entry.name[:-5]}" for folder in root.iterdir() if folder.is_dir()
              for entry in folder.iterdir() if entry.name.endswith(".yaml")]
    return tuple(sorted(names))


def config_path(value: str) -> str:
    """``value`` if it names a file; else the path of the shipped config it names (``tiny``, ``paper/vit_b32``)."""
    if Path(value).expanduser().exists() or value.removesuffix(".yaml") not in shipped_configs():
        return value
    return str(files("lit_adamerging") / "configs" / f"{value.removesuffix('.yaml')}.yaml")


def expand_names(args: list[str]) -> tuple[list[str], str | None]:
    """``args`` with each ``--method NAME`` (or ``--method=NAME``) replaced by ``--config <its preset>`` and each
    ``--config NAME`` of a shipped config by its path; and the last method named.

    Raises:
        ValueError: an unknown method name (the message lists the valid ones).
    """
    expanded, method, index = [], None, 0
    while index < len(args):
        option, equals, inline = args[index].partition("=")
        if option not in ("--method", "--config", "-c"):
            expanded.append(args[index])
            index += 1
            continue
        value = inline if equals else (args[index + 1] if index + 1 < len(args) else "")
        if option == "--method":
            method = value
            value = str(method_config(value))
        expanded += ["--config", config_path(value)]
        index += 1 if equals else 2
    return expanded, method


class AdaMergingCLI(LightningCLI):
    """LightningCLI over the merging modules: the tasks given once, in ``data.tasks`` (the unseen ones in
    ``data.unseen_tasks``), methods by name, and checkpoints that never configure the run.

    See the module docstring for ``--method`` and the checkpoint checks. Takes LightningCLI's keyword
    arguments; the model is a :class:`~lit_adamerging.lightning.base.MergingModule` subclass and the
    data a :class:`~lit_adamerging.MultiTaskDataModule`.
    """

    _checkpoint: dict[str, Any] | None = None
    _checkpoint_copy: str | None = None  # where the checked bytes of --ckpt_path were copied for the Trainer

    def __init__(self, args: ArgsType = None, **kwargs: Any) -> None:
        given = sys.argv[1:] if args is None else args
        self._method: str | None = None
        if isinstance(given, list):
            given, self._method = expand_names([str(arg) for arg in given])
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("auto_configure_optimizers", False)  # each method makes its own optimiser
        kwargs.setdefault("parser_kwargs", {"description": DESCRIPTION})
        super().__init__(MergingModule, MultiTaskDataModule, args=given, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"model": {"class_path": DEFAULT_MODEL}})
        parser.link_arguments("seed_everything", "data.seed", compute_fn=data_seed, apply_on="parse")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.unseen_tasks", "model.init_args.unseen_tasks", apply_on="instantiate")
        parser.add_argument(
            "--settings_from_checkpoint", type=bool, default=False,
            help="Take the model class, the zoo and the method's settings from the --ckpt_path checkpoint instead of "
                 "requiring your config to match them. The zoo's allow_pickle and head_cache_dir still come from your "
                 "config, the tasks from data.tasks; a class outside lit_adamerging is only accepted if your config "
                 "names it.",
        )
        parser.add_argument(
            "--method", default=None,
            help="A merging method by name (`lit-adamerging methods` lists them): the same as --config of its preset, "
                 f"so options after it override it. One of: {', '.join(method_names())}.",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse as LightningCLI does, after reading each YAML file of the command line once (errors name the file
        and line); refuse a config file's ``method:``."""
        if args is None or isinstance(args, list):
            try:
                check_config_files(sys.argv[1:] if args is None else [str(arg) for arg in args])
            except ValueError as error:
                parser.error(str(error))  # as jsonargparse reports its own config errors: usage, message, exit 2
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        if config.get("method") is not None:
            raise ValueError(
                f"a config file sets 'method: {config['method']}'; --method is a command-line option. Give it on the "
                "command line, or the method's preset itself in the file (model: class_path and init_args; see "
                "lit_adamerging/methods/<name>.yaml)."
            )

    def instantiate_classes(self) -> None:
        """Instantiate as LightningCLI does; a model's own refusal is raised as itself, not inside jsonargparse's
        report that the model matched no type of ``MergingModule | None``."""
        try:
            super().instantiate_classes()
        except ValueError as error:
            reasons = [line.strip()[2:] for line in str(error).splitlines() if line.strip().startswith("- ")]
            reasons = [reason for reason in reasons if "NoneType" not in reason]
            if not str(error).startswith("Does not validate against any of the Union subtypes") or len(reasons) != 1:
                raise
            raise ValueError(reasons[0]) from None

    # Lightning 2.6's LightningCLI calls its private _parse_ckpt_path right after parse_arguments, always,
    # and merges a checkpoint's stored hyperparameters over the config there. This override replaces
    # that step; it can go once LightningCLI offers a public switch to skip the merge (or a public hook
    # between parsing and instantiation), e.g. an upstream `parse_ckpt_hyperparameters=False`.
    def _parse_ckpt_path(self) -> None:
        """Read the checkpoint once (to check it, and for the Trainer to load); replace Lightning's merge of its
        hyperparameters over the config."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        ckpt_path, from_checkpoint = config.get("ckpt_path"), config.get("settings_from_checkpoint")
        if config.get("weights_only") is False:
            raise ValueError(
                "--weights_only=false is refused: a merging checkpoint holds plain data only and is always read with "
                "weights_only=true."
            )
        self._check_method_for(subcommand, ckpt_path)
        if str(ckpt_path).lower() == "registry" or str(ckpt_path).lower().startswith("registry:"):
            raise ValueError(
                f"--ckpt_path {ckpt_path}: lit-adamerging does not fetch checkpoints from Lightning's model registry; "
                "download the .ckpt file and give its path."
            )
        if not ckpt_path or ckpt_path in LIGHTNING_CKPT_ALIASES:
            if from_checkpoint:
                raise ValueError("--settings_from_checkpoint=true needs --ckpt_path to name the checkpoint's file.")
            return  # the Trainer resolves an alias to a file and reads it once through SafeCheckpointIO
        data = fetch_checkpoint(ckpt_path)
        self._checkpoint = load_checkpoint(data, str(ckpt_path))
        self._checkpoint_copy = str(private_copy(data, str(ckpt_path)))
        if from_checkpoint:
            settings = self._settings_from_checkpoint(config.model, self._checkpoint.get("hyper_parameters", {}))
            self.config = self.parser.parse_object({subcommand: {"model": settings}}, self.config)

    def _check_method_for(self, subcommand: str, ckpt_path: Any) -> None:
        """Refuse to fit a method with nothing to learn, and to evaluate a learned method without its checkpoint."""
        config = self.config[subcommand].model
        cls = named_class(config.class_path) if isinstance(config.get("class_path"), str) else None
        if cls is None or not issubclass(cls, MergingModule):
            return  # jsonargparse has refused, or will refuse, a class that is not a merging module
        what = f"--method {self._method}" if self._method is not None else cls.__name__
        if subcommand == "fit" and not cls.LEARNS:
            raise ValueError(
                f"{what} has nothing to learn: it runs with `lit-adamerging test`, and `fit` would train nothing "
                "and report it as that method. To learn a merge use --method task_wise_adamerging or "
                "--method layer_wise_adamerging (`lit-adamerging methods` lists them)."
            )
        if subcommand != "fit" and cls.LEARNS and not ckpt_path:
            raise ValueError(
                f"{what} is learned by `lit-adamerging fit`; `{subcommand}` needs that fit's checkpoint: add "
                "--ckpt_path (e.g. runs/tiny/checkpoints/last.ckpt). Without it nothing learned would be evaluated "
                "and reported as that method; for the data-free starting point use --method task_arithmetic."
            )

    def _settings_from_checkpoint(self, user: Any, stored: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint's model class, zoo and method settings (the class's ``CHECKPOINT_SETTINGS`` that its
        signature takes), without the zoo's user-only arguments.

        Parsed over the user's config, those arguments keep the user's values (jsonargparse carries
        an argument over to another zoo class that has it), or the class's defaults.
        """
        stored_class = stored.get("_class_path")
        if stored_class is None:
            stored_class = user.class_path
        elif not stored_class.startswith("lit_adamerging.") and not same_class(stored_class, user.class_path):
            raise ValueError(
                f"the checkpoint names the model class {stored_class!r}, which is neither one of lit_adamerging's nor "
                "the one in your config; a class to import is only taken from your config."
            )
        cls = named_class(stored_class)
        if cls is None or not issubclass(cls, MergingModule):
            raise ValueError(f"the checkpoint's model class {stored_class!r} is not one of lit_adamerging's modules.")
        accepted = inspect.signature(cls).parameters
        settings = {
            key: stored[key] for key in cls.CHECKPOINT_SETTINGS
            if key in stored and key not in DATA_SETTINGS and key in accepted
        }
        model = {"class_path": stored_class, "init_args": settings}
        if "zoo" not in settings:
            return model
        zoo = settings["zoo"]
        if not isinstance(zoo, dict) or not isinstance(zoo.get("class_path"), str):
            raise ValueError(
                f"the checkpoint's stored zoo is not a configuration ({zoo!r}); give the zoo in your config."
            )
        user_zoo = user.init_args.get("zoo") if user.get("init_args") is not None else None
        user_class = user_zoo.class_path if user_zoo is not None else None
        if zoo["class_path"] != user_class and not zoo["class_path"].startswith("lit_adamerging."):
            raise ValueError(
                f"the checkpoint names the zoo class {zoo['class_path']!r}, which is neither one of "
                "lit_adamerging's nor the one in your config; a class to import is only taken from your config."
            )
        init_args = zoo.get("init_args") or {}
        settings["zoo"] = {
            "class_path": zoo["class_path"],
            "init_args": {key: value for key, value in init_args.items() if key not in USER_ONLY_ZOO_ARGS},
        }
        return model

    def after_instantiate_classes(self) -> None:
        """Compare the checkpoint's settings with the run's now, before any weights or data are loaded."""
        if self._checkpoint is not None:
            ckpt_path = self.config[self.config.subcommand].ckpt_path
            stored = self._checkpoint.get("hyper_parameters", {})
            check_checkpoint_class(stored, type(self.model), str(ckpt_path))
            check_checkpoint_settings(stored, self.model.hparams, str(ckpt_path), type(self.model).CHECKPOINT_SETTINGS)

    def _hand_over_checkpoint(self) -> None:
        """The Trainer loads the private copy of the bytes checked above, weights-only."""
        arguments = self.config_init[self.subcommand]
        if self._checkpoint_copy is not None:
            arguments["ckpt_path"] = self._checkpoint_copy
        if "weights_only" in arguments:
            arguments["weights_only"] = True
        if "verbose" in arguments:
            arguments["verbose"] = False  # the accuracies are printed once each, by after_validate / after_test

    before_fit = before_validate = before_test = _hand_over_checkpoint

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test (a merged model's predictions are its heads' logits: ``predict`` is not offered)."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name != "predict"}


    def after_validate(self) -> None:
        if self.trainer.is_global_zero:  # the same gathered accuracies on every process: printed once
            print_accuracies(self.trainer.callback_metrics, "val")

    def after_test(self) -> None:
        if self.trainer.is_global_zero:
            print_accuracies(self.trainer.callback_metrics, "test")


def print_accuracies(metrics: Mapping[str, Any], stage: str) -> None:
    """Each task's accuracy and the means, once each, as ``<stage>/acc/<name>  <value>`` lines."""
    rows = {name: float(value) for name, value in metrics.items() if name.startswith(f"{stage}/acc/")}
    if rows:
        width = max(map(len, rows))
        print("\n".join(f"{name:<{width}}  {value:.4f}" for name, value in rows.items()))


def _wait_for_the_other_processes(timeout_s: float = 60.0) -> None:
    """Let every process finish before any tears the process group down (gloo only: see main). A process that
    failed on its own (an export error on the first) never arrives: after ``timeout_s`` the others go on to exit,
    as they would without the wait, instead of blocking on it."""
    if torch.distributed.get_backend() != "gloo":
        return
    with contextlib.suppress(RuntimeError):
        torch.distributed.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True)


# Errors the library raises for what a user gave (a config, a file, data, settings): a message, no traceback.
USER_ERRORS = (ValueError, KeyError, OSError, FloatingPointError)
DEBUG_VARIABLE = "LIT_ADAMERGING_DEBUG"


def main(args: ArgsType = None) -> None:
    """``lit-adamerging``: fit / validate / test, ``methods`` and ``configs`` (the names to give), ``--version``.

    An error about what the user gave is printed as one message (exit code 2); with the environment
    variable ``LIT_ADAMERGING_DEBUG=1``, with its traceback.
    """
    given = sys.argv[1:] if args is None else args
    if isinstance(given, list) and given[:1] in (["methods"], ["configs"], ["--version"]):
        print({"methods": describe_methods, "configs": lambda: "\n".join(shipped_configs()),
               "--version": lambda: f"lit-adamerging {__version__}"}[given[0]]())
        return
    install_strict_yaml_loader()
    retain_freed_memory()
    # A finished multi-process run's first process was seen to abort at exit ("terminate called without an active
    # exception", gloo, 2 processes, 1 run in 5 to 8) when the processes tore their group down unsynchronised, or
    # when they met through torch's default (libuv) TCP store; a barrier before the teardown and the older store
    # server gave none in 14 runs each. The launched processes inherit USE_LIBUV; a user's own is kept.
    os.environ.setdefault("USE_LIBUV", "0")
    try:
        with intended_warnings_ignored(), dependency_noise_hidden():
            AdaMergingCLI(args=args, save_config_kwargs={"overwrite": True})
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            _wait_for_the_other_processes()
    except USER_ERRORS as error:
        if os.environ.get(DEBUG_VARIABLE, "").strip() not in ("", "0"):
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        print(f"lit-adamerging: error: {message}\n(the traceback: set {DEBUG_VARIABLE}=1)", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        # A multi-process run would leave its process group to the interpreter's exit otherwise.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
