"""End-to-end fit timing through the Trainer: time to first step and data time per step, by cache mode.

Runs the real :class:`MultiTaskDataModule` (ImageFolder trees, found as the mini benchmark finds
them: :func:`~lit_adamerging.data.offline.find_data_root`) and
:class:`AdaMergingModule` (a :class:`SyntheticZoo` of the chosen architecture: its weights do not
matter for timing) under a Lightning Trainer, once per cache mode, and prints:

* ``first_step_s``: from ``trainer.fit`` to the start of the first training step (setup: model
  build, reading or decoding the test sets);
* ``data_s_per_step``: median time between the end of one step and the start of the next (fetching,
  transfer and normalisation of one batch of every task);
* ``step_s``: median time of one training step (forward, backward, optimizer);
* ``total_s``: the whole fit.

``disk`` runs twice: ``disk-cold`` starts from an empty cache folder (it decodes and writes the
stores), ``disk-warm`` reuses them.

Example::

    python -m lit_adamerging.benchmarks.fit --tasks mnist,fashion_mnist,cifar10,gtsrb \\
        --model timm:efficientnet_lite0 --image-size 64 --steps 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lit_adamerging.allocator import retain_freed_memory
from lit_adamerging.benchmarks.common import DEFAULT_TASKS, add_data_arguments, data_root, quiet_lightning
from lit_adamerging.data import ImageFolderTask, MultiTaskDataModule
from lit_adamerging.io import write_text_atomic
from lit_adamerging.lightning.adamerging import AdaMergingModule
from lit_adamerging.models.preprocess import Preprocess
from lit_adamerging.models.zoo import SyntheticZoo

MODES = ("none", "memory", "disk-cold", "disk-warm")


class StepClock(pl.Callback):
    """Records when fit starts and when each training batch starts and ends."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []

    def _now(self, pl_module: pl.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.starts.append(self._now(pl_module))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.ends.append(self._now(pl_module))


def time_fit(args: argparse.Namespace, mode: str, cache_dir: Path) -> dict[str, Any]:
    """Fit ``args.steps`` layer-wise steps with the cache ``mode``; return the timings."""
    preprocess = None if args.image_size is None else Preprocess(image_size=args.image_size)
    tasks = {
        name: ImageFolderTask(root=str(Path(args.data_root) / name), preprocess=preprocess)
        for name in args.tasks.split(",")
    }
    cache = mode.split("-")[0]
    data = MultiTaskDataModule(
        tasks, batch_size=args.images_per_task, num_workers=args.num_workers, cache=cache, cache_dir=str(cache_dir)  # type: ignore[arg-type]
    )
    module = AdaMergingModule(SyntheticZoo(args.model, seed=0), num_classes=data.num_classes, granularity="layer")
    clock = StepClock()
    with quiet_lightning():
        trainer = pl.Trainer(
            max_steps=args.steps,
            accelerator=args.accelerator,
            devices=1,
            precision=args.precision,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            callbacks=[clock],
        )
        start = time.perf_counter()
        trainer.fit(module, datamodule=data)
        total = time.perf_counter() - start
    gaps = [begin - end for end, begin in zip(clock.ends, clock.starts[1:])]
    steps = [end - begin for begin, end in zip(clock.starts, clock.ends)]
    return {
        "mode": mode,
        "first_step_s": clock.starts[0] - start,
        "data_s_per_step": statistics.median(gaps[1:] if len(gaps) > 2 else gaps),
        "step_s": statistics.median(steps[1:] if len(steps) > 2 else steps),
        "total_s": total,
        "steps": len(steps),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m lit_adamerging.benchmarks.fit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_data_arguments(parser)
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    parser.add_argument("--model", default="timm:efficientnet_lite0", help="open_clip:<name> or timm:<name>")
    parser.add_argument("--image-size", type=int, default=None, help="default: the model's own preprocessing")
    parser.add_argument("--images-per-task", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--cache-dir", default=None, help="default: a fresh temporary folder")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {MODES}")
    if args.steps < 3:
        parser.error("--steps must be at least 3 (the first step is not steady state)")
    args.data_root = str(data_root(parser, args, args.tasks.split(",")))
    retain_freed_memory()
    with tempfile.TemporaryDirectory() as scratch:
        cache_dir = Path(args.cache_dir or scratch)
        results = [time_fit(args, mode, cache_dir) for mode in modes]
    keys = ("model", "tasks", "image_size", "images_per_task", "steps", "num_workers")
    report = {key: getattr(args, key) for key in keys}
    on_gpu = torch.cuda.is_available() and args.accelerator != "cpu"
    report["device"] = torch.cuda.get_device_name() if on_gpu else "cpu"
    report["results"] = results
    print(f"{'mode':<10} {'first step s':>12} {'data s/step':>12} {'step s':>8} {'total s':>8}")
    for row in results:
        print(f"{row['mode']:<10} {row['first_step_s']:>12.2f} {row['data_s_per_step']:>12.4f} "
              f"{row['step_s']:>8.3f} {row['total_s']:>8.1f}")
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
