"""The merge: ``theta_p = theta_0,p + sum_k lambda_{k,p} tau_{k,p}``, one fused op per tensor.

:func:`merge_tensor` computes one merged tensor as a matrix-vector product over the stacked task
vectors (never a Python loop over tasks), always in fp32 (autocast is switched off inside), and
keeps no copy of the task vectors for the backward pass, even when they are stored in bf16/fp16.
:class:`MergedEncoder` ties it together: a frozen pretrained encoder, its stacked task vectors
and learnable :class:`MergingCoefficients`, run through :func:`torch.func.functional_call`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

Granularity = Literal["task", "layer"]


class _WeightedSum(torch.autograd.Function):
    """``base + coefficients @ stacked`` in fp32; the backward reads ``stacked`` as stored."""

    @staticmethod
    def forward(ctx: Any, base: Tensor, stacked: Tensor, coefficients: Tensor) -> Tensor:
        ctx.save_for_backward(stacked)
        ctx.base_dtype = base.dtype
        with torch.autocast(base.device.type, enabled=False):
            flat = stacked.reshape(stacked.shape[0], -1)
            merged = torch.addmv(base.reshape(-1).float(), flat.t().float(), coefficients.float())
        return merged.view(base.shape).to(base.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, None, Tensor | None]:
        (stacked,) = ctx.saved_tensors
        if not ctx.needs_input_grad[2]:
            return None, None, None
        with torch.autocast(grad.device.type, enabled=False):
            flat = stacked.reshape(stacked.shape[0], -1)
            grad_coefficients = torch.mv(flat.float(), grad.reshape(-1).float())
        return None, None, grad_coefficients


def merge_tensor(base: Tensor, stacked: Tensor, coefficients: Tensor) -> Tensor:
    """Merge one tensor: ``base + sum_k coefficients[k] * stacked[k]``, differentiable in ``coefficients``.

    ``base`` and ``stacked`` are treated as constants (no gradient flows to them).

    Example:
        >>> merge_tensor(torch.zeros(2), torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([0.5, 1.0]))
        tensor([3.5000, 5.0000])
    """
    if stacked.shape[1:] != base.shape or coefficients.shape != stacked.shape[:1]:
        raise ValueError(
            f"cannot merge: base {tuple(base.shape)}, stacked {tuple(stacked.shape)}, "
            f"coefficients {tuple(coefficients.shape)}; expected stacked [T, *base.shape] and coefficients [T]."
        )
    return _WeightedSum.apply(base.detach(), stacked.detach(), coefficients)


def merge(
    base: Mapping[str, Tensor], task_vectors: Mapping[str, Tensor], coefficients: Tensor
) -> dict[str, Tensor]:
    """Merge every tensor of ``task_vectors``; ``coefficients[:, i]`` weighs the i-th tensor's tasks.

    Args:
        base: pretrained tensors by name (a superset of ``task_vectors``' keys).
        task_vectors: ``{name: Tensor[T, *shape]}`` from :func:`stack_task_vectors`.
        coefficients: ``[T, P]`` with ``P == len(task_vectors)`` (see :class:`MergingCoefficients`).
    """
    if coefficients.dim() != 2 or coefficients.shape[1] != len(task_vectors):
        raise ValueError(
            f"coefficients must have shape [T, {len(task_vectors)}] (one column per merged tensor), "
            f"got {tuple(coefficients.shape)}."
        )
    return {
        name: merge_tensor(base[name], stacked, coefficients[:, index])
        for index, (name, stacked) in enumerate(task_vectors.items())
    }


class MergingCoefficients(nn.Module):
    """Learnable merging coefficients ``lambda``: task-wise ``[T]`` or layer-wise ``[T, P]``.

    ``forward()`` always returns ``[T, P]`` (task-wise values are broadcast over the P tensors),
    clamped to ``[0, 1]`` when ``clamp`` is set; a value clamped away gets zero gradient, as in
    the paper. The pretrained model's coefficient is 1 and is not a parameter.

    Example:
        >>> coefficients = MergingCoefficients(num_tasks=2, num_tensors=3, granularity="task", init=0.3)
        >>> coefficients().shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        num_tasks: int,
        num_tensors: int,
        granularity: Granularity = "layer",
        init: float = 0.3,
        clamp: bool = True,
    ) -> None:
        super().__init__()
        if granularity not in ("task", "layer"):
            raise ValueError(f"granularity must be 'task' or 'layer', got {granularity!r}.")
        if num_tasks < 1 or num_tensors < 1:
            raise ValueError(f"need at least one task and one tensor, got {num_tasks} tasks, {num_tensors} tensors.")
        self.granularity = granularity
        self.clamp = clamp
        self.num_tensors = num_tensors
        columns = num_tensors if granularity == "layer" else 1
        self.raw = nn.Parameter(torch.full((num_tasks, columns), float(init)))

    def forward(self) -> Tensor:
        values = self.raw.clamp(0.0, 1.0) if self.clamp else self.raw
        return values.expand(-1, self.num_tensors)


class MergedEncoder(nn.Module):
    """A frozen pretrained encoder whose forward runs with the merged weights.

    Holds the encoder (its parameters frozen; they are ``theta_0``), the stacked task vectors as
    non-persistent buffers (never saved in a state dict) and the :class:`MergingCoefficients`.

    Example:
        >>> encoder = nn.Linear(3, 2)
        >>> tuned = {t: {k: v + 1.0 for k, v in encoder.state_dict().items()} for t in ("a", "b")}
        >>> from lit_adamerging.merging import stack_task_vectors
        >>> merged = MergedEncoder(encoder, stack_task_vectors(encoder.state_dict(), tuned), granularity="task")
        >>> merged(torch.zeros(4, 3)).shape
        torch.Size([4, 2])
    """

    def __init__(
        self,
        encoder: nn.Module,
        task_vectors: Mapping[str, Tensor],
        granularity: Granularity = "layer",
        init: float = 0.3,
        clamp: bool = True,
    ) -> None:
        super().__init__()
        if not task_vectors:
            raise ValueError("no task vectors: the encoder has no floating-point tensors to merge.")
        state = encoder.state_dict(keep_vars=True)
        unknown = [name for name in task_vectors if name not in state]
        if unknown:
            raise ValueError(f"task vectors name tensors the encoder lacks: {unknown[:5]}.")
        num_tasks = next(iter(task_vectors.values())).shape[0]
        self.encoder = encoder.requires_grad_(False)
        self.tensor_names: list[str] = list(task_vectors)
        buffers = {name for name, _ in encoder.named_buffers()}
        self.merged_buffer_names: frozenset[str] = frozenset(n for n in self.tensor_names if n in buffers)
        self.task_vectors = nn.Module()
        for index, stacked in enumerate(task_vectors.values()):
            self.task_vectors.register_buffer(str(index), stacked, persistent=False)
        self.coefficients = MergingCoefficients(num_tasks, len(task_vectors), granularity, init, clamp)

    @property
    def num_tasks(self) -> int:
        return self.coefficients.raw.shape[0]

    def stacked_task_vectors(self) -> dict[str, Tensor]:
        """``{tensor name: Tensor[T, *shape]}`` in merge order."""
        return {name: getattr(self.task_vectors, str(i)) for i, name in enumerate(self.tensor_names)}

    def merged_tensors(self) -> dict[str, Tensor]:
        """The merged tensors by name, differentiable in the coefficients."""
        base = self.encoder.state_dict(keep_vars=True)
        return merge(base, self.stacked_task_vectors(), self.coefficients())

    def forward(self, images: Tensor, merged: Mapping[str, Tensor] | None = None) -> Tensor:
        """Encode ``images`` with the merged weights (``merged`` reuses tensors merged earlier).

        Merged buffers (``buffer_policy="merge"``) are detached: batch norm takes no gradient
        through its running statistics, so they follow the coefficients without training them.
        """
        tensors = dict(self.merged_tensors() if merged is None else merged)
        for name in self.merged_buffer_names.intersection(tensors):
            tensors[name] = tensors[name].detach()
        return torch.func.functional_call(self.encoder, tensors, (images,))

    @torch.no_grad()
    def merged_state_dict(self) -> dict[str, Tensor]:
        """The merged encoder as a plain state dict that loads into the original model class."""
        merged = self.merged_tensors()
        return {
            name: (merged[name] if name in merged else tensor).detach().clone().contiguous()
            for name, tensor in self.encoder.state_dict().items()
        }

