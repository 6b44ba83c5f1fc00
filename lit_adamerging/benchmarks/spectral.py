"""What the spectral merges cost: TSV-M, Iso-C and Iso-CTS on ViT-B/32-shaped task vectors.

Builds open_clip's ViT-B-32 image encoder without weights, gives every floating-point tensor ``T``
random task vectors of a fine-tuned model's scale (a rank-32 part plus noise, entries about 1e-3),
stacked ``[T, *shape]`` per tensor as the modules hold them, and times each merge of
:mod:`lit_adamerging.merging.spectral` on them (the merge only: building the vectors is not timed).
With ``--blocks K`` only the first ``K`` of the 12 transformer blocks' matrices are merged
(everything else is); the full-model figure is then extrapolated, block time x 12 / K, and printed
as such. ``--reference`` also times the papers' structure on the first block: a Python loop
over layers and tasks calling ``torch.linalg.svd`` (float32), then the decorrelation by SVD;
``--precision`` compares one MLP layer's result with ``torch.linalg.svd`` in float32 and float64.
On a CPU shared with other work, ``--threads 1`` avoids LAPACK's threads waiting on each other.

Example::

    python -m lit_adamerging.benchmarks.spectral --tasks 8
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from lit_adamerging.merging.spectral import (
    ISO_COMMON_FRACTION,
    iso_factors,
    iso_task_vector,
    spectral_matrices,
    tsv_factors,
    tsv_task_vector,
)
from lit_adamerging.models import create_encoder

BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.")
METHODS: dict[str, Callable[..., dict[str, Tensor]]] = {
    "tsv_merging": lambda task_vectors, matrices: tsv_task_vector(task_vectors, matrices=matrices),
    "iso_c_merging": lambda task_vectors, matrices: iso_task_vector(task_vectors, 1.0, 1.0, matrices=matrices),
    "iso_cts_merging": lambda task_vectors, matrices: iso_task_vector(
        task_vectors, 1.0, ISO_COMMON_FRACTION, matrices=matrices
    ),
}


def random_task_vectors(pretrained: Mapping[str, Tensor], num_tasks: int, seed: int = 0) -> dict[str, Tensor]:
    """``{name: Tensor[T, *shape]}`` of a fine-tuned model's scale: entries about 1e-3, a rank-32 part per matrix."""
    generator = torch.Generator().manual_seed(seed)
    stacked: dict[str, Tensor] = {}
    for key, value in pretrained.items():
        if not value.is_floating_point():
            continue
        rows = torch.empty(num_tasks, *value.shape)
        for task in range(num_tasks):
            noise = 1e-3 * torch.randn(value.shape, generator=generator)
            if value.dim() >= 2:
                left = torch.randn(value.shape[0], 32, generator=generator)
                low = left @ torch.randn(32, value[0].numel(), generator=generator)
                noise += 1e-3 / 32**0.5 * low.reshape(value.shape)
            rows[task] = noise
        stacked[key] = rows
    return stacked


def _timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def _svd(matrix: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    u, s, vh = torch.linalg.svd(matrix.to(dtype), full_matrices=False)
    return u, s, vh.mT


def _decorrelated(x: Tensor, dtype: torch.dtype) -> Tensor:
    p, _, q = _svd(x, dtype)
    return p @ q.mT


def reference_tsv(stacked: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """One layer's TSV-M (``stacked [T, m, n]``) as the released code computes it: ``torch.linalg.svd`` in ``dtype``
    per task, then one per concatenation to decorrelate it."""
    k = int(min(stacked.shape[1:]) / stacked.shape[0])
    parts = [_svd(tau, dtype) for tau in stacked]
    u = torch.cat([part[0][:, :k] for part in parts], 1)
    s = torch.cat([part[1][:k] for part in parts])
    v = torch.cat([part[2][:, :k] for part in parts], 1)
    return _decorrelated(u, dtype) @ torch.diag(s) @ _decorrelated(v, dtype).mT


def reference_iso_c(stacked: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """One layer's Iso-C by ``torch.linalg.svd`` in ``dtype``."""
    u, s, v = _svd(stacked.sum(0), dtype)
    return s.mean() * u @ v.mT


def precision_lines(stacked: Tensor) -> list[str]:
    """TSV-M and Iso-C of one layer three ways, errors against a float64 SVD: the float32 SVD, this library's."""
    def error(got: Tensor, reference: Tensor) -> float:
        return float((got.double() - reference).norm() / reference.norm())

    seconds: dict[str, float] = {}
    results: dict[str, Tensor] = {}
    for label, compute in {
        "float64 svd": lambda: reference_tsv(stacked, torch.float64),
        "float32 svd": lambda: reference_tsv(stacked, torch.float32),
        "tsv_factors": lambda: tsv_factors(stacked[None]).matrix()[0],
    }.items():
        start = time.perf_counter()
        results[label] = compute()
        seconds[label] = time.perf_counter() - start
    iso64, iso32 = reference_iso_c(stacked, torch.float64), reference_iso_c(stacked, torch.float32)
    iso = iso_factors(stacked[None], 1.0).matrix()[0]
    return [
        f"one {list(stacked.shape)} layer, relative error against torch.linalg.svd in float64 "
        f"({seconds['float64 svd']:.1f} s):",
        f"  TSV-M  torch.linalg.svd float32 {error(results['float32 svd'], results['float64 svd']):.1e} "
        f"({seconds['float32 svd']:.1f} s), tsv_factors {error(results['tsv_factors'], results['float64 svd']):.1e} "
        f"({seconds['tsv_factors']:.1f} s)",
        f"  Iso-C  torch.linalg.svd float32 {error(iso32, iso64):.1e}, iso_factors {error(iso, iso64):.1e}",
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture (default: %(default)s)")
    parser.add_argument("--tasks", type=int, default=8, help="number of task vectors (default: %(default)s)")
    parser.add_argument("--blocks", type=int, default=None, help="merge only the first K transformer blocks' "
                        "matrices and extrapolate to all of them (default: all)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="where the task vectors live and the merge runs")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads; default: "
                        "torch's own choice)")
    parser.add_argument("--reference", action="store_true",
                        help="also time the per-layer, per-task torch.linalg.svd loop on the first block")
    parser.add_argument("--precision", action="store_true", help="also compare one MLP layer's TSV-M and Iso-C with "
                        "torch.linalg.svd in float32 and float64")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    unknown = [method for method in methods if method not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = create_encoder(f"open_clip:{args.model}")
    task_vectors = {
        name: stacked.to(args.device) for name, stacked in random_task_vectors(encoder.state_dict(), args.tasks).items()
    }
    matrices = spectral_matrices(encoder)
    blocks = sorted({int(match.group(1)) for name in matrices if (match := BLOCK.match(name))})
    chosen = blocks if args.blocks is None else blocks[: args.blocks]
    in_blocks = [name for name in matrices if (match := BLOCK.match(name)) and int(match.group(1)) in chosen]
    outside = {name: stacked for name, stacked in task_vectors.items() if not BLOCK.match(name)}
    blocked = {name: task_vectors[name] for name in in_blocks}
    shapes = sorted({tuple(task_vectors[name].shape[1:]) for name in matrices})
    print(
        f"open_clip {args.model} image encoder, {args.tasks} tasks, {len(matrices)} matrices of shapes {shapes} "
        f"and {len(task_vectors) - len(matrices)} other tensors; device {args.device}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    for method in methods:
        merge = METHODS[method]
        rest = _timed(lambda: merge(outside, [name for name in matrices if name in outside]))
        block_seconds = _timed(lambda: merge(blocked, in_blocks))
        if len(chosen) == len(blocks):
            print(f"{method:<16} {rest + block_seconds:7.1f} s")
        else:
            total = rest + block_seconds * len(blocks) / len(chosen)
            print(f"{method:<16} {total:7.1f} s extrapolated ({block_seconds:.1f} s for {len(chosen)} of "
                  f"{len(blocks)} blocks x {len(blocks) / len(chosen):g}, plus {rest:.1f} s for the rest)")
    first = [name for name in matrices if (match := BLOCK.match(name)) and int(match.group(1)) == blocks[0]]
    if args.reference:
        def loop() -> None:
            for name in first:
                reference_tsv(task_vectors[name].reshape(args.tasks, task_vectors[name].shape[1], -1))

        seconds = _timed(loop)
        ours = _timed(lambda: tsv_task_vector({name: task_vectors[name] for name in first}, matrices=first))
        print(f"one block's TSV-M: per-layer, per-task torch.linalg.svd (float32) {seconds:.1f} s, "
              f"tsv_task_vector {ours:.1f} s")
    if args.precision:
        largest = max(first, key=lambda name: task_vectors[name].numel())
        print("\n".join(precision_lines(task_vectors[largest].reshape(args.tasks, task_vectors[largest].shape[1], -1))))

if __name__ == "__main__":
    main()
