"""The merge of every group as one autograd node, differentiable in the coefficients only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lit_adamerging.merging._kernels import group_grad, merge_group


class Merge(torch.autograd.Function):
    """Every merged tensor in one autograd node; fp32 (at least) with autocast off.

    Inputs: ``columns`` (per group, a long tensor of its tensors' coefficient columns, on the
    groups' device, see :func:`column_indices`), ``coefficients [T, P]``, the pretrained blocks
    ``[G, *shape]``, then the task vector groups ``[G, T, *shape]``. Outputs: the merged tensors,
    group by group, each a view of its group's result. The backward reads the task vectors as
    stored (no upcast copy is kept between the passes) and makes no host-device copy, so it can be
    captured in a CUDA graph.
    """

    @staticmethod
    def forward(ctx: Any, columns: Sequence[Tensor], coefficients: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
        bases, groups = tensors[: len(columns)], tensors[len(columns) :]
        ctx.save_for_backward(*groups)
        ctx.columns = columns
        ctx.num_columns = coefficients.shape[1]
        ctx.dtype = dtype = torch.promote_types(coefficients.dtype, torch.float32)
        merged: list[Tensor] = []
        with torch.autocast(coefficients.device.type, enabled=False):
            weights = coefficients.to(dtype).t()  # [P, T]
            for base, group, index in zip(bases, groups, columns):
                flat = merge_group(
                    base.reshape(base.shape[0], -1), group.reshape(*group.shape[:2], -1), weights.index_select(0, index)
                )
                merged.extend(row.view(base.shape[1:]).to(base.dtype) for row in flat)
        return tuple(merged)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        groups = ctx.saved_tensors
        nothing = (None,) * (len(groups) * 2)
        if not ctx.needs_input_grad[1]:
            return (None, None, *nothing)
        first, dtype = groups[0], ctx.dtype
        rows = torch.zeros(ctx.num_columns, first.shape[1], dtype=dtype, device=first.device)
        with torch.autocast(first.device.type, enabled=False):
            start = 0
            for group, index in zip(groups, ctx.columns):
                count = group.shape[0]
                flat = group.reshape(count, group.shape[1], -1)
                rows.index_copy_(0, index, group_grad(flat, grads[start : start + count], dtype))
                start += count
        return (None, rows.t(), *nothing)


def column_indices(names: Sequence[Sequence[str]], order: Sequence[str], device: torch.device) -> list[Tensor]:
    """Per group of ``names``, the positions of its tensors in ``order`` (their coefficient columns)."""
    position = {name: index for index, name in enumerate(order)}
    return [torch.tensor([position[name] for name in group], dtype=torch.long, device=device) for group in names]
