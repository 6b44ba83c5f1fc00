"""The ``lit-adamerging`` command: LightningCLI with fit / validate / test.

Example::

    lit-adamerging fit --config configs/tiny.yaml
    lit-adamerging test --config configs/tiny.yaml --ckpt_path runs/tiny/checkpoints/last.ckpt
    lit-adamerging test --config configs/tiny.yaml --method task_arithmetic

Methods by name: ``--method NAME`` applies the preset of :mod:`lit_adamerging.methods`
(``granularity``, ``init``, ``ties_k``, ``ties_normalize`` of the model) where it stands on the
command line, as ``--config`` with that preset's file would. What comes after it wins: a later
``--model.init=0.5`` or ``--config`` sets those keys again. What comes before it loses to it: an
earlier ``--config`` (a config may set a method of its own) is how ``--method`` is meant
to be used, but an explicit ``--model.<key>`` for one of the preset's keys before ``--method`` is
refused with an error (it would be dropped). ``--method`` belongs on the command line: a config
file with a ``method:`` key is refused (write the settings themselves there). A method that is not
a coefficient merge (Fisher merging, RegMean, surgery) also chooses the model class, a subclass of
:class:`~lit_adamerging.AdaMergingModule` (:func:`~lit_adamerging.methods.method_module`), so the
``model:`` of the configs it is combined with may only hold settings that class takes (the zoo).

Checkpoints are data, not configuration. LightningCLI itself would merge a checkpoint's stored
hyperparameters over the user's config; here what the user passes decides, and a checkpoint made
with other settings (zoo, tasks, method: :data:`~lit_adamerging.lightning.module.CHECKPOINT_SETTINGS`)
stops the run with an error listing them. ``--settings_from_checkpoint=true`` takes the zoo and the
method from the checkpoint instead, except the zoo's ``allow_pickle`` and ``head_cache_dir``,
which always come from the user's config; the tasks always come from ``data.tasks``, and the unseen
ones (evaluated, never merged) from ``data.unseen_tasks``, linked into the model like ``num_classes``.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ActionConfigFile, get_loader, set_loader
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from lit_adamerging.allocator import retain_freed_memory
from lit_adamerging.data import MultiTaskDataModule
from lit_adamerging.lightning import AdaMergingModule
from lit_adamerging.lightning.checkpoint_io import fetch_checkpoint, load_checkpoint, private_copy
from lit_adamerging.lightning.module import USER_ONLY_ZOO_ARGS, check_checkpoint_settings, intended_warnings_ignored
from lit_adamerging.methods import method_config, method_learns, method_module, method_names, method_settings

# Settings the model takes from the data module (the tasks, which are unseen): never from a checkpoint.
DATA_SETTINGS = ("num_classes", "unseen_tasks")
# ckpt_path values the Trainer resolves to a file itself (read then through SafeCheckpointIO).
LIGHTNING_CKPT_ALIASES = ("last", "best", "hpc")


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


class _MethodPreset(argparse.Action):
    """``--method NAME``: the preset of :mod:`lit_adamerging.methods`, applied where it stands like ``--config``
    (its ``model:`` settings; its ``module:`` chose the model class before parsing, see :func:`method_in_args`)."""

    def __call__(self, parser: Any, cfg: Any, values: Any, option_string: str | None = None) -> None:
        ActionConfigFile.apply_config(parser, cfg, "config", yaml.safe_dump({"model": method_settings(values)}))
        cfg["config"][-1] = str(method_config(values))


def _method_at(args: list[str], index: int) -> str | None:
    """The shipped method the option at ``args[index]`` names if it is ``--method`` (``--method NAME`` or
    ``--method=NAME``), else ``None``; an unknown name is left to the parser, which lists the valid ones."""
    option, _, inline = args[index].partition("=")
    if option != "--method":
        return None
    name = inline or (args[index + 1] if index + 1 < len(args) else "")
    return name if name in method_names() else None


def method_in_args(args: list[str]) -> str | None:
    """The method ``--method`` names on a command line (the last one), ``None`` without one.

    Raises:
        ValueError: two ``--method`` options whose methods need different LightningModule classes.
    """
    names = [name for index in range(len(args)) if (name := _method_at(args, index)) is not None]
    classes = {method_module(name) for name in names}
    if len(classes) > 1:
        raise ValueError(
            f"--method is given {len(names)} times ({', '.join(names)}) for different kinds of model "
            f"({', '.join(sorted(c.__name__ for c in classes))}); give one."
        )
    return names[-1] if names else None


def _check_method_order(args: list[str]) -> None:
    """Refuse ``--model.<key>`` before a ``--method`` whose preset sets that key again (it would be dropped)."""
    given: dict[str, str] = {}  # preset key -> the option that gave it
    for index, arg in enumerate(args):
        option = arg.partition("=")[0]
        if option.startswith("--model."):
            given[option.removeprefix("--model.")] = option
            continue
        name = _method_at(args, index)
        if name is None:
            continue
        overridden = [given[key] for key in method_settings(name) if key in given]
        if overridden:
            options, verb = ", ".join(overridden), "comes" if len(overridden) == 1 else "come"
            raise ValueError(
                f"{options} {verb} before --method {name}, whose preset sets it again, so it would be dropped; "
                f"give {options} after --method {name}."
            )


class AdaMergingCLI(LightningCLI):
    """LightningCLI whose task list is given once, in ``data.tasks`` (the unseen ones in ``data.unseen_tasks``), and
    whose checkpoints never configure the run.

    ``--method NAME`` picks a merging method by name (see the module docstring for how it combines
    with ``--config`` and ``--model.*``). With ``--ckpt_path`` the checkpoint is read with
    ``weights_only=True`` (a file that is not an AdaMerging checkpoint is named as such) and its
    stored settings are compared with the user's once the model is built, before any weights are
    loaded (see the module docstring).
    """

    _checkpoint: dict[str, Any] | None = None
    _checkpoint_copy: str | None = None  # where the checked bytes of --ckpt_path were copied for the Trainer

    def __init__(
        self,
        model_class: type[AdaMergingModule] | None = None,
        datamodule_class: type[MultiTaskDataModule] | None = MultiTaskDataModule,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        """LightningCLI's arguments; the model class is the one of the command line's ``--method``
        (:func:`~lit_adamerging.methods.method_module`), else ``model_class``, else
        :class:`AdaMergingModule`. A ``model_class`` given must be that class or a base of it."""
        command_line = kwargs.get("args")
        given = sys.argv[1:] if command_line is None else command_line
        method = method_in_args([str(arg) for arg in given]) if isinstance(given, list) else None
        self._method = method
        chosen = method_module(method) if method is not None else model_class or AdaMergingModule
        if model_class is not None and not issubclass(chosen, model_class):
            raise ValueError(
                f"--method {method} runs {chosen.__name__}, which is not a {model_class.__name__} (the model class "
                "given to AdaMergingCLI); pass model_class=None to let --method choose."
            )
        super().__init__(chosen, datamodule_class, *args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.unseen_tasks", "model.unseen_tasks", apply_on="instantiate")
        parser.add_argument(
            "--settings_from_checkpoint", type=bool, default=False,
            help="Take the zoo and the merging method from the --ckpt_path checkpoint instead of requiring your config "
                 "to match them. The zoo's allow_pickle and head_cache_dir still come from your config, the tasks "
                 "from data.tasks; a zoo class outside lit_adamerging is only accepted if your config names it.",
        )
        parser.add_argument(
            "--method", action=_MethodPreset, choices=method_names(), default=argparse.SUPPRESS,
            help="A merging method by name: applies that preset's model settings (granularity, init, ties_k, "
                 "ties_normalize) here, as --config of its file would; arguments after it override it, a "
                 "--model.<key> it sets may not come before it. Command line only.",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse as LightningCLI does, after checking ``--method``'s place; refuse a config file's ``method:``."""
        if args is None or isinstance(args, list):
            given = sys.argv[1:] if args is None else [str(arg) for arg in args]
            try:
                check_config_files(given)
            except ValueError as error:
                parser.error(str(error))  # as jsonargparse reports its own config errors: usage, message, exit 2
            _check_method_order(given)
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        if "method" in config:
            raise ValueError(
                f"a config file sets 'method: {config['method']}'; --method is a command-line option. Give it on the "
                "command line, or write the method's settings in the file (model.granularity, model.init, "
                "model.ties_k, model.ties_normalize; see lit_adamerging.methods)."
            )

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
        if self._method is None:
            return
        learns = method_learns(self._method)
        if subcommand == "fit" and not learns:
            raise ValueError(
                f"--method {self._method} has nothing to learn: it runs with `lit-adamerging test`, and `fit` would "
                f"train coefficients and report them as {self._method}. To learn coefficients use --method task_wise "
                "or --method layer_wise (see lit_adamerging.methods)."
            )
        if subcommand != "fit" and learns and not ckpt_path:
            raise ValueError(
                f"--method {self._method} is learned by `lit-adamerging fit`; `{subcommand}` needs that fit's "
                "checkpoint: add --ckpt_path (e.g. runs/tiny/checkpoints/last.ckpt). Without it nothing learned "
                f"would be evaluated and reported as {self._method}; for the data-free starting point use "
                "--method task_arithmetic."
            )

    def _settings_from_checkpoint(self, user: Any, stored: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint's zoo and method settings (those of the model class's ``CHECKPOINT_SETTINGS`` its
        signature takes), without the zoo's user-only arguments.

        Parsed over the user's config, those arguments keep the user's values (jsonargparse carries
        an argument over to another zoo class that has it), or the class's defaults.
        """
        accepted = inspect.signature(self.model_class).parameters
        settings = {
            key: stored[key] for key in self.model_class.CHECKPOINT_SETTINGS
            if key in stored and key not in DATA_SETTINGS and key in accepted
        }
        if "zoo" not in settings:
            return settings
        zoo = settings["zoo"]
        if not isinstance(zoo, dict) or not isinstance(zoo.get("class_path"), str):
            raise ValueError(
                f"the checkpoint's stored zoo is not a configuration ({zoo!r}); give the zoo in your config."
            )
        user_class = user.zoo.class_path if user.get("zoo") is not None else None
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
        return settings

    def after_instantiate_classes(self) -> None:
        """Compare the checkpoint's settings with the run's now, before any weights or data are loaded."""
        if self._checkpoint is not None:
            ckpt_path = self.config[self.config.subcommand].ckpt_path
            check_checkpoint_settings(
                self._checkpoint.get("hyper_parameters", {}), self.model.hparams, str(ckpt_path),
                type(self.model).CHECKPOINT_SETTINGS,
            )

    def _hand_over_checkpoint(self) -> None:
        """The Trainer loads the private copy of the bytes checked above, weights-only."""
        arguments = self.config_init[self.subcommand]
        if self._checkpoint_copy is not None:
            arguments["ckpt_path"] = self._checkpoint_copy
        if "weights_only" in arguments:
            arguments["weights_only"] = True

    before_fit = before_validate = before_test = before_predict = _hand_over_checkpoint


def main(args: ArgsType = None) -> None:
    install_strict_yaml_loader()
    retain_freed_memory()
    with intended_warnings_ignored():
        AdaMergingCLI(
            save_config_kwargs={"overwrite": True},
            args=args,
        )


if __name__ == "__main__":
    main()
