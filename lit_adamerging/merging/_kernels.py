"""The merge's arithmetic on one group of same-shape task vectors ``[G, T, n]``, forward and backward.

On a GPU, one kernel per group and pass, compiled by ``torch.compile`` (:func:`weighted_sum`,
:func:`row_dots`), reads bf16/fp16 task vectors as stored, without an fp32 copy. On a CPU, a
group of small tensors is one batched product, a group of large ones an ``addmv`` per tensor in
cache-sized slices. The arithmetic is in the dtype of the weights (forward) or the gradient
(backward), fp32 at least (the caller's choice).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

# On CPU, products over [T, n] run in slices of this many entries so the vector they read or write
# (and any upcast of bf16/fp16 task vectors) stays in cache: about 2x faster when n is large. A
# group whose tensors are together no larger runs as one batched product (one call, not G).
CPU_SLICE = 1 << 18

# One compiled kernel per distinct group shape: with static shapes Inductor splits the long
# reductions and the kernels run at memory bandwidth (dynamic shapes were 10-20x slower, measured).
MAX_GROUP_SHAPES = 256


def weighted_sum(group: Tensor, weights: Tensor, base: Tensor) -> Tensor:
    """``base [G, n] + sum_k weights[:, k] * group[:, k]`` for ``group [G, T, n]``, in ``weights.dtype``."""
    return base + (group.to(weights.dtype) * weights.unsqueeze(-1)).sum(dim=1)


def row_dots(group: Tensor, grads: Tensor) -> Tensor:
    """``[G, T]`` with entry ``[g, k] = <group[g, k], grads[g]>`` for ``group [G, T, n]``, in ``grads.dtype``."""
    return (group.to(grads.dtype) * grads.unsqueeze(1)).sum(dim=-1)


@functools.cache
def compiled(function: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``function`` compiled by Inductor: the upcast, product and sum fuse into one kernel that reads the
    task vectors once, as stored (eager would materialise ``[G, T, n]`` in fp32).

    Each call may compile once more for a new group shape: up to :data:`MAX_GROUP_SHAPES` of them
    (``torch.compiler.config.recompile_limit``, raised for the call only) before Dynamo falls back
    to eager.
    """
    kernel = torch.compile(function, dynamic=False, fullgraph=True)

    def run(*args: Tensor) -> Tensor:
        limit = torch.compiler.config.recompile_limit
        torch.compiler.config.recompile_limit = MAX_GROUP_SHAPES
        try:
            return kernel(*args)
        finally:
            torch.compiler.config.recompile_limit = limit

    return run


def merge_group(base: Tensor, group: Tensor, weights: Tensor) -> Tensor:
    """``[G, n]``: ``base [G, n] + sum_k weights[:, k] * group[:, k]`` for ``group [G, T, n]``, in ``weights.dtype``."""
    dtype = weights.dtype
    if group.device.type != "cpu":
        return compiled(weighted_sum)(group, weights, base.to(dtype))
    if group.shape[0] * group.shape[2] <= CPU_SLICE:  # small tensors: one batched product, not G
        return torch.baddbmm(base.to(dtype).unsqueeze(1), weights.unsqueeze(1), group.to(dtype)).squeeze(1)
    out = torch.empty(base.shape, dtype=dtype)
    for row, stacked, column, base_row in zip(out, group, weights, base):
        for start in range(0, stacked.shape[1], CPU_SLICE):
            stop = start + CPU_SLICE
            torch.addmv(
                base_row[start:stop].to(dtype), stacked[:, start:stop].t().to(dtype), column, out=row[start:stop]
            )
    return out


def group_grad(group: Tensor, grads: Sequence[Tensor | None], dtype: torch.dtype) -> Tensor:
    """``[G, T]`` in ``dtype``: entry ``[g, k]`` is ``<group[g, k], grads[g]>`` for ``group [G, T, n]``.

    A missing gradient (``None``) counts as zeros.
    """
    if group.device.type == "cpu" and group.shape[0] * group.shape[2] > CPU_SLICE:  # no [G, n] copy of the grads
        out = torch.zeros(group.shape[:2], dtype=dtype)
        for row, stacked, grad in zip(out, group, grads):
            if grad is None:
                continue
            grad = grad.reshape(-1).to(dtype)
            for start in range(0, stacked.shape[1], CPU_SLICE):
                stop = start + CPU_SLICE
                row.addmv_(stacked[:, start:stop].to(dtype), grad[start:stop])
        return out
    zeros = torch.zeros(group.shape[2], dtype=dtype, device=group.device)
    stacked_grads = torch.stack([zeros if grad is None else grad.reshape(-1).to(dtype) for grad in grads])
    if group.device.type == "cpu":  # small tensors: one batched product, not G
        return torch.bmm(stacked_grads.unsqueeze(1), group.to(dtype).transpose(1, 2)).squeeze(1)
    return compiled(row_dots)(group, stacked_grads)
