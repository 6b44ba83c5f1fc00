"""What the benchmarks share: where the offline datasets are, progress lines, Lightning kept quiet."""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from lit_adamerging.data.offline import DATA_ENV, DataNotFoundError, default_cache_dir, find_data_root
from lit_adamerging.lightning.base import intended_warnings_ignored

DEFAULT_TASKS = ("mnist", "fashion_mnist", "cifar10", "gtsrb")

# What Lightning prints around each Trainer that is not the benchmark's own output: its info lines
# (seed, devices, the "Tip: ... litlogger / litmodels" banners, "`Trainer.fit` stopped") through
# these loggers, a deprecation warning its pytree helper raises under recent torch releases, and
# LightningCLI's warning that it is given arguments while the process has a command line of its own
# (a benchmark hands the CLI class arguments it built).
_LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")
_FOREIGN_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"LightningCLI's args parameter is intended",
)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data-root`` and ``--data-cache``: where a benchmark's ImageFolder datasets come from."""
    parser.add_argument(
        "--data-root", default=None,
        help=f"folder of ImageFolder datasets (<root>/<task>/{{train,test}}/<class>/<images>); default: ${DATA_ENV}, "
        "the offline trees beside a source checkout, else downloaded through torchvision into --data-cache",
    )
    parser.add_argument("--data-cache", default=None, help=f"download cache (default {default_cache_dir()})")


def data_root(parser: argparse.ArgumentParser, args: argparse.Namespace, tasks: Sequence[str]) -> Path:
    """The folder holding ``tasks``' trees (:func:`~lit_adamerging.data.offline.find_data_root`'s order);
    if there is none, the parser's error says where it looked and what to do."""
    try:
        return find_data_root(tasks, args.data_root, cache_dir=args.data_cache)
    except (DataNotFoundError, FileExistsError, ValueError) as error:
        parser.error(str(error))


def log(message: str) -> None:
    """One progress line of the mini benchmark, timestamped."""
    print(f"[mini {time.strftime('%H:%M:%S')}] {message}", flush=True)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Inside the block only: Lightning logs warnings and errors alone, and the warnings above are not shown.

    Also hides what :func:`~lit_adamerging.lightning.base.intended_warnings_ignored` hides. The
    loggers' levels and the warning filters are restored when the block ends.
    """
    loggers = [logging.getLogger(name) for name in _LIGHTNING_LOGGERS]
    levels = [logger.level for logger in loggers]
    with intended_warnings_ignored():
        for message in _FOREIGN_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
