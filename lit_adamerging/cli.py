"""The ``lit-adamerging`` command: LightningCLI with fit / validate / test.

Example::

    lit-adamerging fit --config configs/tiny.yaml
    lit-adamerging test --config configs/tiny.yaml --ckpt_path runs/tiny/.../last.ckpt
"""

from __future__ import annotations

from lightning.pytorch.cli import ArgsType, LightningCLI

from lit_adamerging.data import MultiTaskDataModule
from lit_adamerging.lightning import AdaMergingModule


class AdaMergingCLI(LightningCLI):
    """LightningCLI whose task list is given once, in ``data.tasks``, and linked to the model."""

    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")


def main(args: ArgsType = None) -> None:
    AdaMergingCLI(
        AdaMergingModule,
        MultiTaskDataModule,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
