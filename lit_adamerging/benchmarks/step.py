"""Step benchmark: an AdaMerging step against one plain forward+backward of the same encoder.

Needs no weights or data: a random-init encoder of a real architecture, random "fine-tuned"
copies (:class:`SyntheticZoo`) and random images. The AdaMerging step is the real
:class:`AdaMergingModule` ``training_step`` + backward + Adam step; the plain step is one
forward and one backward (weight gradients) of the same encoder (architecture and weights) on the
same concatenated batch with the same entropy loss. Steps alternate between the two and the
medians are reported; every ratio is over the median of all the plain steps timed.

``--methods`` chooses the merging steps timed: ``adamerging`` (the default; layer- or task-wise by
``--granularity``) and ``rank_wise``, the same step of :class:`RankWiseAdaMergingModule` (one gate
per singular component; its components factorised when it is built, ``rank_wise_build_s``) on the
same batch, encoder and task vectors, timed after the AdaMerging module is freed.
``rank_wise_vs_adamerging`` is its step time over AdaMerging's. ``wemoe`` times
:class:`WEMoEModule`'s step the same way (its MLPs weighted per sample by routers;
``wemoe_router_parameters``, ``wemoe_mixed_task_vector_bytes``). Each of these methods also reports its
``<method>_peak_memory_bytes`` over its timed steps. The figures of a method not timed are ``None``; the
other memory, merge and evaluation figures are AdaMerging's.

Memory (max allocated on CUDA, resident set size on CPU): ``plain_peak_memory_bytes`` is the peak
of the plain step run alone, before the module exists; ``peak_memory_bytes`` the peak over the
timed steps (on a CPU other than Linux's, where the peak cannot be reset, the whole run's).
Beyond the plain step, AdaMerging needs its task vectors (``task_vector_bytes``) and the
pretrained weights beside the merged ones (``encoder_bytes``), and the benchmark itself keeps the
plain encoder (``encoder_bytes`` again): ``memory_excess_bytes`` is what the run holds beyond
those, near zero when nothing is copied.

Example::

    python -m lit_adamerging.benchmarks.step --model open_clip:ViT-B-32 --tasks 8 --images-per-task 2 --steps 5
    python -m lit_adamerging.benchmarks.step --model open_clip:test-vit-tiny --tasks 2 --steps 1 \
        --methods adamerging rank_wise
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_adamerging.allocator import retain_freed_memory
from lit_adamerging.benchmarks.common import peak_memory_bytes, reset_peak_memory
from lit_adamerging.lightning.adamerging import AdaMergingModule
from lit_adamerging.lightning.base import MergingModule
from lit_adamerging.lightning.rank_wise import RankWiseAdaMergingModule
from lit_adamerging.lightning.wemoe import WEMoEModule
from lit_adamerging.merging import entropy
from lit_adamerging.models.zoo import SyntheticZoo

PRECISIONS = ("32", "bf16-mixed", "16-mixed")
METHODS = ("adamerging", "rank_wise", "wemoe")
"""The merging steps ``--methods`` can time: AdaMerging (layer- or task-wise), rank-wise AdaMerging and WEMoE."""


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


def _alternate(
    first: Callable[[], Any], second: Callable[[], Any], steps: int, device: torch.device
) -> tuple[list[float], list[float]]:
    """The times of ``steps`` runs of each function, alternating."""
    first_times, second_times = [], []
    for _ in range(steps):
        first_times.append(_timed(first, device))
        second_times.append(_timed(second, device))
    return first_times, second_times


@dataclass
class _Setting:
    """What every timed method shares: the zoo, the batch, the plain step its steps alternate with, the options."""

    zoo: SyntheticZoo
    num_classes: dict[str, int]
    batch: dict[str, torch.Tensor]
    plain_step: Callable[[], None]
    autocast: Callable[[], Any]
    device: torch.device
    steps: int
    warmup: int
    task_vector_dtype: str

    def build(self, cls: type[MergingModule], **settings: Any) -> tuple[Any, torch.optim.Optimizer, float]:
        """The module of ``cls`` (the zoo loaded, its task vectors built, on the device, in training mode, logging
        off: no Trainer is attached), its optimiser and the seconds it took."""
        start = time.perf_counter()
        module = cls(self.zoo, num_classes=self.num_classes, task_vector_dtype=self.task_vector_dtype, **settings)
        module.configure_model()
        module.to(self.device).train()
        module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
        module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
        optimizer = module.configure_optimizers()
        _synchronize(self.device)
        return module, optimizer, time.perf_counter() - start

    def training_step(self, module: MergingModule, optimizer: torch.optim.Optimizer) -> Callable[[], None]:
        """One step as a Trainer runs it on the batch: the module's ``training_step``, backward, the optimiser's."""

        def step() -> None:
            with self.autocast():
                loss = module.training_step(self.batch, 0)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    def time(self, step: Callable[[], Any]) -> tuple[float, list[float], list[float], int]:
        """The first step's seconds; then, after the warm-up, the times of ``steps`` steps and of the plain steps
        alternated with them, and the peak memory over those."""
        first_step_s = _timed(step, self.device)  # on CUDA: compilation and graph capture
        for _ in range(self.warmup):
            step()
            self.plain_step()
        reset_peak_memory(self.device)
        times, plain_times = _alternate(step, self.plain_step, self.steps, self.device)
        return first_step_s, times, plain_times, peak_memory_bytes(self.device)


def _time_adamerging(setting: _Setting, granularity: str, cuda_graphs: bool) -> tuple[dict[str, Any], list[float]]:
    """AdaMerging's figures and the times of the plain steps alternated with its steps."""
    module, optimizer, build_s = setting.build(AdaMergingModule, granularity=granularity)
    assert module.merger is not None
    device, steps = setting.device, setting.steps
    module.merger.cuda_graphs = cuda_graphs
    graphed = cuda_graphs and device.type == "cuda"
    adamerging_step = setting.training_step(module, optimizer)
    first_step_s, adamerging_times, plain_times, peak_bytes = setting.time(adamerging_step)
    eager_s = eager_ratio = None
    if graphed:
        module.merger.cuda_graphs = False
        adamerging_step()
        eager_times, eager_plain_times = _alternate(adamerging_step, setting.plain_step, steps, device)
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
    merge_times = [_timed(merge_only, device) for _ in range(steps)]

    images = torch.cat(list(setting.batch.values()))
    eval_batch = images[: max(1, min(len(images), 64))]
    module.eval()
    module.on_test_start()
    first_task = next(iter(setting.batch))

    @torch.no_grad()
    def evaluate() -> None:
        with setting.autocast():
            module.heads[first_task](module.merger(eval_batch, module._eval_tensors))

    evaluate()
    eval_seconds = statistics.median(_timed(evaluate, device) for _ in range(max(1, steps)))
    module.on_test_end()

    adamerging_s = statistics.median(adamerging_times)
    figures = {
        "adamerging_build_s": build_s,
        "adamerging_step_s": adamerging_s,
        "cuda_graphs": graphed,
        "first_step_s": first_step_s,
        "eager_step_s": eager_s,
        "eager_ratio": eager_ratio,
        "merge_s": statistics.median(merge_times),
        "merge_share": statistics.median(merge_times) / adamerging_s,
        "peak_memory_bytes": peak_bytes,
        "task_vector_bytes": sum(
            tv.numel() * tv.element_size() for tv in module.merger.stacked_task_vectors().values()
        ),
        "eval_images_per_s": len(eval_batch) / eval_seconds,
    }
    return figures, plain_times


def _time_learned(
    setting: _Setting, method: str, cls: type[MergingModule], **settings: Any
) -> tuple[dict[str, Any], list[float], MergingModule]:
    """``<method>_build_s``, ``_first_step_s``, ``_step_s`` and ``_peak_memory_bytes`` of a module of ``cls``, the
    times of the plain steps alternated with its steps, and the module."""
    module, optimizer, build_s = setting.build(cls, **settings)
    first_step_s, times, plain_times, peak_bytes = setting.time(setting.training_step(module, optimizer))
    figures = {
        f"{method}_build_s": build_s,
        f"{method}_first_step_s": first_step_s,
        f"{method}_step_s": statistics.median(times),
        f"{method}_peak_memory_bytes": peak_bytes,
    }
    return figures, plain_times, module


def _time_rank_wise(setting: _Setting, rank_fraction: float | None) -> tuple[dict[str, Any], list[float]]:
    """Rank-wise AdaMerging's figures and the times of the plain steps alternated with its steps; its build
    factorises every matrix's task vectors."""
    figures, plain_times, module = _time_learned(
        setting, "rank_wise", RankWiseAdaMergingModule, rank_fraction=rank_fraction
    )
    components = module.components
    assert components is not None
    factors = [*components.u, *components.s, *components.v]
    figures["rank_wise_gates"] = components.num_gates
    figures["rank_wise_component_bytes"] = sum(factor.numel() * factor.element_size() for factor in factors)
    return figures, plain_times


def _time_wemoe(setting: _Setting) -> tuple[dict[str, Any], list[float]]:
    """WEMoE's figures and the times of the plain steps alternated with its steps: its routers' parameters and the
    bytes of the MLPs' task vectors it mixes per sample."""
    figures, plain_times, module = _time_learned(setting, "wemoe", WEMoEModule)
    mixture = module.mixture
    assert mixture is not None
    figures["wemoe_router_parameters"] = sum(p.numel() for p in mixture.routers.parameters())
    figures["wemoe_mixed_task_vector_bytes"] = sum(
        tensor.numel() * tensor.element_size() for tensor in mixture.task_vectors.buffers()
    )
    return figures, plain_times


def _ratios(method: str, step_s: float | None, plain_s: float, adamerging_s: float | None) -> dict[str, float | None]:
    """``<method>_ratio`` (its step over the plain step) and ``<method>_vs_adamerging`` (over AdaMerging's)."""
    return {
        f"{method}_ratio": None if step_s is None else step_s / plain_s,
        f"{method}_vs_adamerging": None if step_s is None or adamerging_s is None else step_s / adamerging_s,
    }


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
    methods: Sequence[str] = ("adamerging",),
    rank_fraction: float | None = None,
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
    if isinstance(methods, str) or not methods or not set(methods) <= set(METHODS):
        raise ValueError(f"methods must be one or more of {', '.join(METHODS)}, got {methods!r}.")
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
    # weights (the zoo's seed) as the modules' encoder, the same heads.
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

    reset_peak_memory(torch_device)
    for _ in range(max(1, warmup)):
        plain_step()
    plain_peak_bytes = peak_memory_bytes(torch_device)

    setting = _Setting(zoo, num_classes, batch, plain_step, autocast, torch_device, steps, warmup, task_vector_dtype)
    figures: dict[str, Any] = dict.fromkeys((
        "adamerging_build_s", "adamerging_step_s", "cuda_graphs", "first_step_s", "eager_step_s", "eager_ratio",
        "merge_s", "merge_share", "peak_memory_bytes", "task_vector_bytes", "eval_images_per_s",
        "rank_wise_build_s", "rank_wise_first_step_s", "rank_wise_step_s", "rank_wise_peak_memory_bytes",
        "rank_wise_gates", "rank_wise_component_bytes", "wemoe_build_s", "wemoe_first_step_s", "wemoe_step_s",
        "wemoe_peak_memory_bytes", "wemoe_router_parameters", "wemoe_mixed_task_vector_bytes",
    ))
    plain_times: list[float] = []
    if "adamerging" in methods:  # first, so that its peak memory is not the rank-wise module's
        found, plain_alternated = _time_adamerging(setting, granularity, cuda_graphs)
        figures.update(found)
        plain_times += plain_alternated
    if "rank_wise" in methods:
        found, plain_alternated = _time_rank_wise(setting, rank_fraction)
        figures.update(found)
        plain_times += plain_alternated
    if "wemoe" in methods:
        found, plain_alternated = _time_wemoe(setting)
        figures.update(found)
        plain_times += plain_alternated

    plain_s = statistics.median(plain_times)
    adamerging_s = figures["adamerging_step_s"]
    peak_bytes, task_vector_bytes = figures["peak_memory_bytes"], figures["task_vector_bytes"]
    return {
        "model": model,
        "tasks": tasks,
        "images_per_task": images_per_task,
        "image_size": size,
        "methods": [method for method in METHODS if method in methods],
        "granularity": granularity,
        "rank_fraction": rank_fraction,
        "device": str(torch_device) if torch_device.type == "cpu" else torch.cuda.get_device_name(torch_device),
        "precision": precision,
        "task_vector_dtype": task_vector_dtype,
        "steps": steps,
        **figures,
        "plain_step_s": plain_s,
        "ratio": None if adamerging_s is None else adamerging_s / plain_s,
        **{
            key: value
            for method in ("rank_wise", "wemoe")
            for key, value in _ratios(method, figures[f"{method}_step_s"], plain_s, adamerging_s).items()
        },
        "plain_peak_memory_bytes": plain_peak_bytes,
        "encoder_bytes": encoder_bytes,
        "memory_excess_bytes": None if peak_bytes is None
        else peak_bytes - plain_peak_bytes - task_vector_bytes - 2 * encoder_bytes,
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
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, default=["adamerging"],
        help="the merging steps timed, each against the plain step: adamerging (layer- or task-wise by --granularity) "
        "rank_wise (rank-wise AdaMerging, its components factorised first; slow on large models) and wemoe (WEMoE: "
        "routers and per-sample MLP weights)",
    )
    parser.add_argument("--granularity", choices=("task", "layer"), default="layer", help="AdaMerging's")
    parser.add_argument(
        "--rank-fraction", type=float, default=None,
        help="rank-wise AdaMerging: each task's kept fraction of every matrix's singular components (default: all)",
    )
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
        methods=args.methods,
        rank_fraction=args.rank_fraction,
    )
    figures["allocator"] = "retain" if retained else "default"
    width = max(len(key) for key in figures)
    for key, value in figures.items():
        print(f"{key:>{width}}: {value:.4g}" if isinstance(value, float) else f"{key:>{width}}: {value}")
    if args.json:
        from lit_adamerging.io import write_text_atomic

        write_text_atomic(args.json, json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
