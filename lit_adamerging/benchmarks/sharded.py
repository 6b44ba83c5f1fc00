"""Sharded benchmark: what each process holds and how long a step takes, AdaMerging split across processes
(:class:`~lit_adamerging.ShardedMergingStrategy`) against DDP (every process holds everything), on CPU processes.

Each configuration is a real ``fit`` of :class:`~lit_adamerging.AdaMergingModule` (layer-wise) with a random-init
encoder of a real architecture and random "fine-tuned" copies (:class:`~lit_adamerging.SyntheticZoo`), on random
images of ``--images-per-task`` per task and process and step, through Lightning's launcher (one command per
configuration, run by this one). Per process it records:

* ``task_vector_bytes``: the task vectors it stores (sharded: its rows of them);
* ``tensor_bytes``: every tensor it holds when the fit starts (task vectors, pretrained and merged weights, heads,
  data): what grows with the model, beside the interpreter and its libraries (about 0.9 GB resident here);
* ``peak_rss_bytes``: its peak resident memory over the whole run (loading included: every process builds the
  pretrained encoder whole and reads one fine-tuned model, or its rows of it, at a time);
* ``step_peak_rss_bytes``: its peak resident memory over the timed steps only (Linux; with glibc the heap freed
  while loading is given back first, so this is the training's working set; elsewhere the whole run's);
* ``step_s``: the median time of the timed steps (after ``--warmup`` steps), the first process's.

Every process gets ``--threads`` threads (default: the CPUs divided by the processes), the same for both
strategies. The table printed gives the largest value over the processes (the step time: the first process's).

Example::

    python -m lit_adamerging.benchmarks.sharded --model open_clip:ViT-B-32 --tasks 8 --processes 1 2 4
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lit_adamerging.benchmarks.common import errors_reported, log, peak_memory_bytes, quiet_lightning, reset_peak_memory

STRATEGIES = ("ddp", "sharded")


def _live_tensor_bytes() -> int:
    """Bytes of every tensor storage the process's Python objects reach (each storage once; a sharded parameter
    counts its local rows): what the process holds beyond the interpreter and its libraries."""
    seen: set[int] = set()
    total = 0
    for value in gc.get_objects():
        if not isinstance(value, torch.Tensor):
            continue
        local = value.to_local() if hasattr(value, "to_local") else value
        try:
            storage = local.untyped_storage()
        except (RuntimeError, NotImplementedError):  # meta or sparse tensors own no storage
            continue
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


class _Recorder(pl.Callback):
    """Times the steps after the warm-up and records each process's memory to ``<out>.rank<r>.json``."""

    def __init__(self, out: str, warmup: int) -> None:
        self.out, self.warmup = out, warmup
        self.times: list[float] = []
        self._start = 0.0
        self.whole_run_peak = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.tensor_bytes = _live_tensor_bytes()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.warmup:
            if platform.libc_ver()[0] == "glibc":  # give back the heap that loading freed, kept by glibc otherwise
                ctypes.CDLL(None).malloc_trim(0)
            self.whole_run_peak = peak_memory_bytes(torch.device("cpu"))
            reset_peak_memory(torch.device("cpu"))  # the peak from here on is the steps' working set
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._start)

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        stored = pl_module.merger.task_vector_bytes()
        step_peak = peak_memory_bytes(torch.device("cpu"))
        record = {
            "task_vector_bytes": stored,
            "tensor_bytes": self.tensor_bytes,
            "peak_rss_bytes": max(self.whole_run_peak, step_peak),
            "step_peak_rss_bytes": step_peak,
            "step_s": statistics.median(self.times) if self.times else None,
        }
        Path(f"{self.out}.rank{trainer.global_rank}.json").write_text(json.dumps(record))


def _worker(args: argparse.Namespace) -> None:
    """One configuration: this process is one of Lightning's (it launches the others with this command)."""
    from lit_adamerging import (
        AdaMergingModule,
        MultiTaskDataModule,
        ShardedMergingStrategy,
        SyntheticTask,
        SyntheticZoo,
    )
    from lit_adamerging.benchmarks.step import input_size
    from lit_adamerging.models import create_encoder

    torch.set_num_threads(args.threads)
    (processes,) = args.processes
    size = input_size(create_encoder(args.model))
    images = args.images_per_task * processes * (args.warmup + args.steps)  # one pass: no image read twice
    tasks = {f"task{k}": SyntheticTask(num_classes=10, num_images=images, image_size=size, seed=k)
             for k in range(args.tasks)}
    data = MultiTaskDataModule(tasks, batch_size=args.images_per_task, eval_batch_size=args.images_per_task)
    model = AdaMergingModule(SyntheticZoo(args.model), data.num_classes, cuda_graphs=False)
    strategy: Any = ShardedMergingStrategy() if args.strategy == "sharded" else "ddp"
    trainer = pl.Trainer(
        accelerator="cpu", devices=processes, strategy=strategy, max_steps=args.warmup + args.steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[_Recorder(args.out, args.warmup)],
    )
    with quiet_lightning():
        trainer.fit(model, datamodule=data)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def run(model: str, tasks: int, processes: list[int], images_per_task: int, steps: int, warmup: int,
        threads: int | None) -> list[dict[str, Any]]:
    """Every strategy on every number of processes, each in its own command; one row per configuration."""
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for count in processes:
            for strategy in STRATEGIES:
                out = str(Path(folder) / f"{strategy}{count}")
                per_process = threads or max(1, (os.cpu_count() or 1) // count)
                command = [sys.executable, "-m", "lit_adamerging.benchmarks.sharded", "--worker", "--model", model,
                           "--tasks", str(tasks), "--processes", str(count), "--images-per-task",
                           str(images_per_task), "--steps", str(steps), "--warmup", str(warmup), "--strategy",
                           strategy, "--threads", str(per_process), "--out", out]
                log(f"{strategy} on {count} process(es), {per_process} thread(s) each")
                env = {**os.environ, "OMP_NUM_THREADS": str(per_process), "USE_LIBUV": "0"}
                started = time.perf_counter()
                done = subprocess.run(command, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(f"{strategy} on {count} processes failed:\n{done.stderr[-3000:]}")
                records = [json.loads(Path(f"{out}.rank{rank}.json").read_text()) for rank in range(count)]
                rows.append({
                    "strategy": strategy, "processes": count, "threads_per_process": per_process,
                    "task_vector_bytes": max(r["task_vector_bytes"] for r in records),
                    "task_vector_bytes_all": sum(r["task_vector_bytes"] for r in records),
                    "tensor_bytes": max(r["tensor_bytes"] for r in records),
                    "peak_rss_bytes": max(r["peak_rss_bytes"] for r in records),
                    "step_peak_rss_bytes": max(r["step_peak_rss_bytes"] for r in records),
                    "step_s": records[0]["step_s"],
                    "run_s": time.perf_counter() - started,
                })
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    def gb(value: int) -> str:
        return f"{value / 1e9:.2f}"

    lines = ["| strategy | processes | task vectors / process (GB) | tensors / process (GB) | peak RSS / process "
             "(GB) | peak RSS in the steps (GB) | step (s) |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['strategy']} | {row['processes']} | {gb(row['task_vector_bytes'])} | "
                     f"{gb(row['tensor_bytes'])} | {gb(row['peak_rss_bytes'])} | {gb(row['step_peak_rss_bytes'])} | "
                     f"{row['step_s']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]] | None:
    parser = argparse.ArgumentParser(
        prog="python -m lit_adamerging.benchmarks.sharded", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", default="open_clip:ViT-B-32", help="encoder (random init), e.g. open_clip:ViT-B-32")
    parser.add_argument("--tasks", type=int, default=8, help="number of merged tasks")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4], help="process counts to run")
    parser.add_argument("--images-per-task", type=int, default=2, help="images per task, process and step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="steps before the timed ones")
    parser.add_argument("--threads", type=int, default=None, help="threads per process (default: CPUs / processes)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", choices=STRATEGIES, default="sharded", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return None
    with errors_reported(parser.prog):
        for name in ("tasks", "steps", "images_per_task"):
            if getattr(args, name) < 1:
                parser.error(f"--{name.replace('_', '-')} must be at least 1.")
        if any(count < 1 for count in args.processes):
            parser.error("--processes must be at least 1.")
        rows = run(args.model, args.tasks, args.processes, args.images_per_task, args.steps, args.warmup, args.threads)
    print(_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
