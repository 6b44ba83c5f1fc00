"""Step benchmark: an AdaMerging step against one plain forward+backward of the same encoder.

Needs no weights or data: a random-init encoder of a real architecture, random "fine-tuned"
copies (:class:`SyntheticZoo`) and random images. The AdaMerging step is the real
:class:`AdaMergingModule` ``training_step`` + backward + Adam step; the plain step is one
forward and one backward (weight gradients) of the same encoder (architecture and weights) on the
same concatenated batch with the same entropy loss. Steps alternate between the two and the
medians are reported.

Memory (max allocated on CUDA, resident set size on CPU): ``plain_peak_memory_bytes`` is the peak
of the plain step run alone, before the module exists; ``peak_memory_bytes`` the peak over the
timed steps (on a CPU other than Linux's, where the peak cannot be reset, the whole run's).
Beyond the plain step, AdaMerging needs its task vectors (``task_vector_bytes``) and the
pretrained weights beside the merged ones (``encoder_bytes``), and the benchmark itself keeps the
plain encoder (``encoder_bytes`` again): ``memory_excess_bytes`` is what the run holds beyond
those, near zero when nothing is copied.

Example::

    python -m lit_adamerging.benchmarks.step --model open_clip:ViT-B-32 --tasks 8 --images-per-task 2 --steps 5
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_adamerging.allocator import retain_freed_memory
from lit_adamerging.lightning.adamerging import AdaMergingModule
from lit_adamerging.merging import entropy
from lit_adamerging.models.zoo import SyntheticZoo

PRECISIONS = ("32", "bf16-mixed", "16-mixed")
_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def input_size(encoder: nn.Module) -> int:
    """The square input resolution the encoder expects (open_clip ``image_size``, timm ``pretrained_cfg``)."""
    size = getattr(encoder, "image_size", None)
    if size is None:
        size = getattr(encoder, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[-1]
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(function: Callable[[], Any], device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    function()
    _synchronize(device)
    return time.perf_counter() - start


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif _PROC_STATUS.exists():
        with contextlib.suppress(OSError):  # a sandbox may refuse it: the figure is then the whole run's
            _CLEAR_REFS.write_text("5")  # Linux: the peak RSS starts again from the current RSS


def _peak_memory_bytes(device: torch.device) -> int:
    """Max allocated on CUDA; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if _PROC_STATUS.exists():
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, other systems KiB


def _alternate(
    first: Callable[[], Any], second: Callable[[], Any], steps: int, device: torch.device
) -> tuple[list[float], list[float]]:
    """The times of ``steps`` runs of each function, alternating."""
    first_times, second_times = [], []
    for _ in range(steps):
        first_times.append(_timed(first, device))
        second_times.append(_timed(second, device))
    return first_times, second_times


def run(
    model: str = "open_clip:ViT-B-32",
    tasks: int = 8,
    images_per_task: int = 2,
    steps: int = 5,
    warmup: int = 1,
    granularity: str = "layer",
    device: str = "cpu",
    precision: str = "32",
    task_vector_dtype: str = "float32",
    classes: int = 10,
    cuda_graphs: bool = True,
) -> dict[str, Any]:
    """Measure and return the figures (see the module docstring)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    minimums = (
        ("tasks", tasks, 1), ("images_per_task", images_per_task, 1), ("steps", steps, 1), ("warmup", warmup, 0)
    )
    for name, value, least in minimums:
        if value < least:
            raise ValueError(f"{name} must be at least {least}, got {value}.")
    torch_device = torch.device(device)
    task_names = [f"task{index}" for index in range(tasks)]
    num_classes = {name: classes for name in task_names}
    zoo = SyntheticZoo(model, seed=0)
    autocast: Callable[[], Any]
    if precision == "32":
        autocast = contextlib.nullcontext
    else:
        dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
        autocast = functools.partial(torch.autocast, torch_device.type, dtype=dtype)

    # The plain step first, alone in the process, for its peak memory: the same architecture and
    # weights (the zoo's seed) as the module's encoder, the same heads.
    loaded = zoo.load(num_classes)
    plain = loaded.encoder.to(torch_device).requires_grad_(True).eval()
    heads = {name: head.to(torch_device) for name, head in loaded.heads.items()}
    encoder_bytes = sum(t.numel() * t.element_size() for t in plain.state_dict().values())
    del loaded
    size = input_size(plain)
    generator = torch.Generator().manual_seed(0)
    batch = {
        name: torch.randn(images_per_task, 3, size, size, generator=generator).to(torch_device) for name in task_names
    }
    images = torch.cat(list(batch.values()))

    def plain_step() -> None:
        with autocast():
            features = plain(images).split(images_per_task)
            loss = sum(entropy(heads[name](chunk)).mean() for name, chunk in zip(task_names, features))
        loss.backward()
        plain.zero_grad(set_to_none=True)

    _reset_peak_memory(torch_device)
    for _ in range(max(1, warmup)):
        plain_step()
    plain_peak_bytes = _peak_memory_bytes(torch_device)

    module = AdaMergingModule(
        zoo,
        num_classes=num_classes,
        granularity=granularity,  # type: ignore[arg-type]
        task_vector_dtype=task_vector_dtype,  # type: ignore[arg-type]
    )
    module.configure_model()
    module.to(torch_device).train()
    optimizer = module.configure_optimizers()
    assert module.merger is not None
    module.merger.cuda_graphs = cuda_graphs
    graphed = cuda_graphs and torch_device.type == "cuda"

    def adamerging_step() -> None:
        with autocast():
            loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]  # no Trainer attached
    module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    first_step_s = _timed(adamerging_step, torch_device)  # on CUDA: compilation and graph capture
    for _ in range(warmup):
        adamerging_step()
        plain_step()
    _reset_peak_memory(torch_device)
    adamerging_times, plain_times = _alternate(adamerging_step, plain_step, steps, torch_device)
    peak_bytes = _peak_memory_bytes(torch_device)
    eager_s = eager_ratio = None
    if graphed:
        module.merger.cuda_graphs = False
        adamerging_step()
        eager_times, eager_plain_times = _alternate(adamerging_step, plain_step, steps, torch_device)
        eager_s = statistics.median(eager_times)
        eager_ratio = eager_s / statistics.median(eager_plain_times)
        module.merger.cuda_graphs = True

    # The merge alone (forward and backward over the task vectors), after the memory was read:
    # its upstream gradients are the benchmark's, not the step's.
    merge_grads = [torch.ones_like(tensor) for tensor in module.merger.merged_tensors().values()]

    def merge_only() -> None:
        merged = module.merger.merged_tensors()
        torch.autograd.backward(list(merged.values()), merge_grads)
        optimizer.zero_grad(set_to_none=True)

    merge_only()
    merge_times = [_timed(merge_only, torch_device) for _ in range(steps)]

    eval_batch = images[: max(1, min(len(images), 64))]
    module.eval()
    module.on_test_start()

    @torch.no_grad()
    def evaluate() -> None:
        with autocast():
            module.heads[task_names[0]](module.merger(eval_batch, module._eval_tensors))

    evaluate()
    eval_seconds = statistics.median(_timed(evaluate, torch_device) for _ in range(max(1, steps)))
    module.on_test_end()

    adamerging_s = statistics.median(adamerging_times)
    plain_s = statistics.median(plain_times)
    task_vector_bytes = sum(tv.numel() * tv.element_size() for tv in module.merger.stacked_task_vectors().values())
    return {
        "model": model,
        "tasks": tasks,
        "images_per_task": images_per_task,
        "image_size": size,
        "granularity": granularity,
        "device": str(torch_device) if torch_device.type == "cpu" else torch.cuda.get_device_name(torch_device),
        "precision": precision,
        "task_vector_dtype": task_vector_dtype,
        "steps": steps,
        "adamerging_step_s": adamerging_s,
        "plain_step_s": plain_s,
        "ratio": adamerging_s / plain_s,
        "cuda_graphs": graphed,
        "first_step_s": first_step_s,
        "eager_step_s": eager_s,
        "eager_ratio": eager_ratio,
        "merge_s": statistics.median(merge_times),
        "merge_share": statistics.median(merge_times) / adamerging_s,
        "peak_memory_bytes": peak_bytes,
        "plain_peak_memory_bytes": plain_peak_bytes,
        "task_vector_bytes": task_vector_bytes,
        "encoder_bytes": encoder_bytes,
        "memory_excess_bytes": peak_bytes - plain_peak_bytes - task_vector_bytes - 2 * encoder_bytes,
        "eval_images_per_s": len(eval_batch) / eval_seconds,
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m lit_adamerging.benchmarks.step", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", default="open_clip:ViT-B-32", help="open_clip:<name> or timm:<name>")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--images-per-task", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each kind (alternating)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--granularity", choices=("task", "layer"), default="layer")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=PRECISIONS, default="32")
    parser.add_argument("--task-vector-dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument(
        "--allocator",
        choices=("retain", "default"),
        default="retain",
        help="retain: keep freed heap memory in the process (lit_adamerging.allocator, as the CLI does); "
        "default: glibc as it comes",
    )
    parser.add_argument(
        "--no-cuda-graphs", dest="cuda_graphs", action="store_false",
        help="CUDA: run the AdaMerging step without graphs",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    retained = args.allocator == "retain" and retain_freed_memory()
    figures = run(
        model=args.model,
        tasks=args.tasks,
        images_per_task=args.images_per_task,
        steps=args.steps,
        warmup=args.warmup,
        granularity=args.granularity,
        device=args.device,
        precision=args.precision,
        task_vector_dtype=args.task_vector_dtype,
        cuda_graphs=args.cuda_graphs,
    )
    figures["allocator"] = "retain" if retained else "default"
    for key, value in figures.items():
        print(f"{key:>20}: {value:.4g}" if isinstance(value, float) else f"{key:>20}: {value}")
    if args.json:
        from lit_adamerging.io import write_text_atomic

        write_text_atomic(args.json, json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
