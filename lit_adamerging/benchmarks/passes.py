"""What the data-learning methods' own passes cost, in evaluation passes, on the offline benchmark.

Fisher merging and RegMean read each merged task's images once with its fine-tuned model before
evaluating; Representation Surgery computes every image's merged and fine-tuned features once, then
trains its maps on them. This times each phase inside the real runs (the same configs as
``lit-adamerging-mini``, its zoo and decoded cache; the zoo is built first if missing) and divides by
one evaluation pass of the merged encoder over every task's test split:

* ``statistics``: Fisher's or RegMean's pass and merge (from the start of ``test`` to its first batch);
* ``features``: surgery's feature pass (from the start of the fit's training to its first step);
* ``steps``: surgery's steps (``--surgery-steps``; the first step to the end of the fit);
* ``evaluation``: one evaluation pass over every task's test split.

Example::

    python -m lit_adamerging.benchmarks.passes --out runs/mini
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml

from lit_adamerging.allocator import retain_freed_memory
from lit_adamerging.benchmarks import mini
from lit_adamerging.benchmarks.common import RunProgress, errors_reported, log, quiet_lightning
from lit_adamerging.benchmarks.finetune import fine_tune_task, task_preprocess
from lit_adamerging.cli import AdaMergingCLI, install_strict_yaml_loader
from lit_adamerging.data.offline import find_data_root
from lit_adamerging.io import write_text_atomic
from lit_adamerging.methods import method_class

# the methods whose phases are timed
TIMED = ("task_arithmetic", "fisher_merging", "regmean", "task_arithmetic_surgery")


class PhaseClock(pl.Callback):
    """Seconds of each phase of a run, read between Lightning's hooks (callbacks run before the module's)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._marks: dict[str, float] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._marks["train"] = time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if "steps" not in self._marks:
            self._marks["steps"] = time.perf_counter()
            self.seconds["features"] = self._marks["steps"] - self._marks["train"]

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.seconds["steps"] = time.perf_counter() - self._marks["steps"]

    def on_test_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._marks["test"] = time.perf_counter()

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._marks["evaluation"] = time.perf_counter()
        self.seconds["statistics"] = self._marks["evaluation"] - self._marks["test"]

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.seconds["evaluation"] = time.perf_counter() - self._marks["evaluation"]


def time_method(method: str, args: Any, tasks: list[str], zoo: dict[str, Path]) -> dict[str, float]:
    """The phases of ``method``'s run on ``tasks``, in seconds."""
    run_dir = Path(args.out) / "passes" / method
    config_path = run_dir / "base.yaml"
    settings = mini.model_settings(args, method)
    write_text_atomic(config_path, yaml.safe_dump(mini.base_config(args, tasks, zoo, run_dir, model_settings=settings)))
    clock = PhaseClock()
    with quiet_lightning():
        cli = AdaMergingCLI(
            run=False, save_config_kwargs={"overwrite": True},
            args=["--config", str(config_path), "--method", method, f"--trainer.max_steps={args.surgery_steps}"],
        )
        cli.trainer.callbacks.extend([clock, RunProgress(method)])
        if method_class(method).LEARNS:
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    return clock.seconds


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """The phases of each timed method, in seconds; an error about the data or a run is one message (exit code 2)."""
    parser = mini.build_parser()
    parser.prog = "python -m lit_adamerging.benchmarks.passes"
    parser.description = __doc__.split("\n\n")[0]
    args = parser.parse_args(argv)
    with errors_reported(parser.prog):
        return _timed(args)


def _timed(args: Any) -> dict[str, dict[str, float]]:
    """Every phase of each :data:`TIMED` method's run, then their table."""
    tasks = [name for name in args.tasks.split(",") if name]
    args.data_root = str(find_data_root(tasks, args.data_root, cache_dir=args.data_cache))
    install_strict_yaml_loader()
    retain_freed_memory()
    torch.manual_seed(args.seed)
    preprocess = task_preprocess(args)
    zoo = {task: fine_tune_task(task, args, preprocess, Path(args.out) / "cache") for task in tasks}
    results = {}
    for method in TIMED:
        results[method] = time_method(method, args, tasks, zoo)
        log(f"{method}: " + ", ".join(f"{key} {value:.1f} s" for key, value in results[method].items()))
    evaluation = results["task_arithmetic"]["evaluation"]
    print(f"one evaluation pass (task arithmetic, {len(tasks)} test splits): {evaluation:.1f} s")
    print("| method | statistics or features | in evaluation passes | steps | evaluation |")
    print("|---|---|---|---|---|")
    for method, seconds in results.items():
        own = seconds.get("features", seconds["statistics"] if method != "task_arithmetic" else 0.0)
        steps = f"{seconds['steps']:.1f} s" if "steps" in seconds else ""
        print(f"| {method} | {own:.1f} s | {own / evaluation:.2f} | {steps} | {seconds['evaluation']:.1f} s |")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
