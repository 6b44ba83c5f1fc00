"""The ``lit-adamerging`` command: LightningCLI with fit / validate / test.

Example::

    lit-adamerging fit --config configs/tiny.yaml
    lit-adamerging test --config configs/tiny.yaml --ckpt_path runs/tiny/.../last.ckpt
"""

from __future__ import annotations

from typing import Any

import yaml
from jsonargparse import get_loader, set_loader
from lightning.pytorch.cli import ArgsType, LightningCLI

from lit_adamerging.allocator import retain_freed_memory
from lit_adamerging.data import MultiTaskDataModule
from lit_adamerging.lightning import AdaMergingModule


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


class AdaMergingCLI(LightningCLI):
    """LightningCLI whose task list is given once, in ``data.tasks``, and linked to the model."""

    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")


def main(args: ArgsType = None) -> None:
    install_strict_yaml_loader()
    retain_freed_memory()
    AdaMergingCLI(
        AdaMergingModule,
        MultiTaskDataModule,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
