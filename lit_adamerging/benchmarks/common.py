"""What the benchmarks share: where the offline datasets are, errors as one message, progress lines and
bars, Lightning kept quiet."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import resource
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import lightning.pytorch as pl
import torch
from tqdm import tqdm

from lit_adamerging.cli import DEBUG_VARIABLE, USER_ERRORS
from lit_adamerging.data.offline import DATA_ENV, DataNotFoundError, find_data_root
from lit_adamerging.lightning.base import intended_warnings_ignored
from lit_adamerging.lightning.statistics import StatisticsMergingModule
from lit_adamerging.lightning.surgery import SurgeryModule

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
    parser.add_argument(
        "--data-cache", default=None,
        help="download cache (default: $XDG_CACHE_HOME/lit_adamerging/datasets, else ~/.cache/lit_adamerging/datasets)",
    )


def data_root(parser: argparse.ArgumentParser, args: argparse.Namespace, tasks: Sequence[str]) -> Path:
    """The folder holding ``tasks``' trees (:func:`~lit_adamerging.data.offline.find_data_root`'s order);
    if there is none, the parser's error says where it looked and what to do."""
    try:
        return find_data_root(tasks, args.data_root, cache_dir=args.data_cache)
    except (DataNotFoundError, FileExistsError, ValueError) as error:
        parser.error(str(error))


@contextlib.contextmanager
def errors_reported(prog: str) -> Iterator[None]:
    """Inside the block, an error about what the user gave (data, files, a run's input: the library's
    :data:`~lit_adamerging.cli.USER_ERRORS`) ends the program with ``<prog>: error: <message>`` and exit
    code 2, no traceback; with ``LIT_ADAMERGING_DEBUG=1`` it propagates with its traceback.

    Usage errors are the parser's (its usage block, then the message); this is for everything after parsing.
    """
    try:
        yield
    except USER_ERRORS as error:
        if os.environ.get(DEBUG_VARIABLE, "").strip() not in ("", "0"):
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        print(f"{prog}: error: {message}\n(the traceback: set {DEBUG_VARIABLE}=1)", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def log(message: str) -> None:
    """One progress line of the mini benchmark, timestamped."""
    print(f"[mini {time.strftime('%H:%M:%S')}] {message}", flush=True)


# Without a terminal, a long phase prints a progress line at least this often (seconds), and once at its end.
PROGRESS_SECONDS = 30.0


class Progress:
    """Progress of one long phase (``total`` counts of ``unit``): a tqdm bar on standard error when it is a
    terminal, else a :func:`log` line every :data:`PROGRESS_SECONDS`; either way one line when it closes.

    A line reads ``<label>: <unit> k/n (<note>, s)``; use it as a context manager, :meth:`update` per count.
    """

    def __init__(self, label: str, total: int, unit: str = "step") -> None:
        self.label, self.total, self.unit, self.done, self.note = label, total, unit, 0, ""
        self._start = self._printed = time.perf_counter()
        terminal = sys.stderr.isatty()
        self._bar = tqdm(total=total, desc=label, unit=f" {unit}", file=sys.stderr, leave=False) if terminal else None

    def update(self, count: int = 1, note: str = "") -> None:
        """``count`` more done; ``note`` (a loss, say) is shown beside the count."""
        self.done += count
        self.note = note or self.note
        if self._bar is not None:
            self._bar.update(count)
            if note:
                self._bar.set_postfix_str(note, refresh=False)
        elif time.perf_counter() - self._printed >= PROGRESS_SECONDS and self.done < self.total:
            self._line()

    def close(self) -> None:
        """The bar removed; the phase's last line printed (if anything was done)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.done:
            self._line()

    def _line(self) -> None:
        self._printed = time.perf_counter()
        details = ", ".join(filter(None, [self.note, f"{self._printed - self._start:.0f} s"]))
        log(f"{self.label}: {self.unit} {self.done}/{self.total} ({details})")

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


class RunProgress(pl.Callback):
    """A run's phases through :class:`Progress` (Lightning's own bar is off in the benchmarks): the fit's
    steps with the loss, a line before a statistics pass (Fisher merging, RegMean) or a surgery feature
    pass, the evaluation's batches."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._phase: Progress | None = None

    def _open(self, unit: str, total: int) -> None:
        self._close()
        self._phase = Progress(self.label, total, unit)

    def _close(self) -> None:
        if self._phase is not None:
            self._phase.close()
            self._phase = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if isinstance(pl_module, SurgeryModule):  # the module computes every image's features next
            log(f"{self.label}: features of every image, merged and fine-tuned (before the first step)")
        self._open("step", trainer.max_steps if trainer.max_steps > 0 else int(trainer.estimated_stepping_batches))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._phase is not None:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            self._phase.update(1, f"loss {float(loss):.3f}" if loss is not None else "")

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._close()

    def on_test_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if isinstance(pl_module, StatisticsMergingModule):  # the module reads each task's images next
            log(f"{self.label}: statistics of each merged task's images (before evaluating)")

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._open("test batch", int(sum(trainer.num_test_batches)))

    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._phase is not None:
            self._phase.update(1)

    def on_test_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: Any, exception: BaseException) -> None:
        self._close()


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


_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_memory(device: torch.device) -> None:
    """Start the peak memory figure again from now: CUDA's max allocated, or (Linux) the process's peak RSS."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif _PROC_STATUS.exists():
        with contextlib.suppress(OSError):  # a sandbox may refuse it: the figure is then the whole run's
            _CLEAR_REFS.write_text("5")  # Linux: the peak RSS starts again from the current RSS


def peak_memory_bytes(device: torch.device) -> int:
    """Max allocated on CUDA; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if _PROC_STATUS.exists():
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, other systems KiB
