"""The merge: ``theta_p = theta_0,p + sum_k lambda_{k,p} tau_{k,p}`` for every merged tensor ``p``.

:class:`StackedTaskVectors` stores the task vectors of all tensors of one shape together, as one
``[G, T, n]`` buffer (an encoder has a handful of distinct shapes: a ViT-B/32 has 158 tensors in
10 shapes). :func:`merge` then costs one batched matrix product per shape group (never a loop over
tasks or tensors) plus one fused add of the pretrained weights. The arithmetic is fp32 even under
autocast, and the backward keeps no copy of the task vectors, even when they are stored in
bf16/fp16. :class:`MergedEncoder` ties it together with learnable :class:`MergingCoefficients` and
runs the encoder through :func:`torch.func.functional_call`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

Granularity = Literal["task", "layer"]


def _compute_dtype(stacked: Tensor) -> torch.dtype:
    return torch.promote_types(stacked.dtype, torch.float32)


class _GroupWeightedSum(torch.autograd.Function):
    """``out[g] = coefficients[g] @ stacked[g]`` for ``stacked [G, T, n]``, ``coefficients [G, T]``.

    Computed in fp32 (at least) with autocast off. Low-precision storage is upcast one tensor at a
    time, and the backward reads ``stacked`` as stored, so no full-precision copy is ever kept.
    """

    @staticmethod
    def forward(ctx: Any, stacked: Tensor, coefficients: Tensor) -> Tensor:
        ctx.save_for_backward(stacked)
        dtype = _compute_dtype(stacked)
        with torch.autocast(stacked.device.type, enabled=False):
            coefficients = coefficients.to(dtype)
            if stacked.dtype == dtype:
                return torch.bmm(coefficients.unsqueeze(1), stacked).squeeze(1)
            return torch.stack([row @ group.to(dtype) for row, group in zip(coefficients, stacked)])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor]:
        (stacked,) = ctx.saved_tensors
        dtype = _compute_dtype(stacked)
        with torch.autocast(grad.device.type, enabled=False):
            grad = grad.to(dtype)
            if stacked.dtype == dtype:
                return None, torch.bmm(stacked, grad.unsqueeze(2)).squeeze(2)
            return None, torch.stack([group.to(dtype) @ row for row, group in zip(grad, stacked)])


class StackedTaskVectors(nn.Module):
    """Task vectors ``{name: Tensor[T, *shape]}`` stored as one ``[G, T, n]`` buffer per shape.

    The buffers are non-persistent: they never enter a state dict or a checkpoint. Indexing by
    name gives a ``[T, *shape]`` view; iteration order is the order given.

    Example:
        >>> tv = StackedTaskVectors({"w": torch.ones(2, 3), "b": torch.zeros(2, 3), "c": torch.ones(2, 1)})
        >>> tv.weighted_sums(torch.tensor([[1.0, 1.0, 1.0], [0.5, 0.5, 0.5]]))["w"]
        tensor([1.5000, 1.5000, 1.5000])
    """

    def __init__(self, task_vectors: Mapping[str, Tensor]) -> None:
        super().__init__()
        if not task_vectors:
            raise ValueError("no task vectors to store.")
        num_tasks = {stacked.shape[0] for stacked in task_vectors.values()}
        if len(num_tasks) != 1:
            raise ValueError(f"every task vector stack needs the same number of tasks, got {sorted(num_tasks)}.")
        self.num_tasks: int = num_tasks.pop()
        self.names: list[str] = list(task_vectors)
        self.shapes: dict[str, torch.Size] = {name: stacked.shape[1:] for name, stacked in task_vectors.items()}
        columns_by_shape: dict[torch.Size, list[int]] = {}
        for column, name in enumerate(self.names):
            columns_by_shape.setdefault(self.shapes[name], []).append(column)
        self._groups: list[list[int]] = list(columns_by_shape.values())
        self._slot: dict[str, tuple[int, int]] = {}
        for group, columns in enumerate(self._groups):
            stacked = torch.stack([task_vectors[self.names[c]].detach().reshape(self.num_tasks, -1) for c in columns])
            self.register_buffer(f"group{group}", stacked, persistent=False)
            self.register_buffer(f"columns{group}", torch.tensor(columns), persistent=False)
            for position, column in enumerate(columns):
                self._slot[self.names[column]] = (group, position)

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __getitem__(self, name: str) -> Tensor:
        group, position = self._slot[name]
        return getattr(self, f"group{group}")[position].view(self.num_tasks, *self.shapes[name])

    def items(self) -> Iterator[tuple[str, Tensor]]:
        return ((name, self[name]) for name in self.names)

    def weighted_sums(self, coefficients: Tensor) -> dict[str, Tensor]:
        """``{name: sum_k coefficients[k, i] * tau_k[name]}`` (fp32) with ``i`` the name's position."""
        if coefficients.dim() != 2 or coefficients.shape != (self.num_tasks, len(self.names)):
            raise ValueError(
                f"coefficients must have shape [T, {len(self.names)}] (one column per merged tensor) with "
                f"T = {self.num_tasks} tasks, got {tuple(coefficients.shape)}."
            )
        by_column = coefficients.t()
        sums: dict[str, Tensor] = {}
        for group, columns in enumerate(self._groups):
            rows = by_column.index_select(0, getattr(self, f"columns{group}"))
            flat = _GroupWeightedSum.apply(getattr(self, f"group{group}"), rows)
            for column, tensor in zip(columns, flat.unbind(0)):
                name = self.names[column]
                sums[name] = tensor.view(self.shapes[name])
        return {name: sums[name] for name in self.names}


def merge(
    base: Mapping[str, Tensor], task_vectors: Mapping[str, Tensor] | StackedTaskVectors, coefficients: Tensor
) -> dict[str, Tensor]:
    """``{name: base[name] + sum_k coefficients[k, i] * task_vectors[name][k]}``, differentiable in the coefficients.

    Args:
        base: pretrained tensors by name (a superset of the task vectors' names); treated as constants.
        task_vectors: ``{name: Tensor[T, *shape]}`` from :func:`stack_task_vectors`, or the same
            already grouped as :class:`StackedTaskVectors` (what a training loop should hold).
        coefficients: ``[T, P]``, column ``i`` for the i-th tensor (see :class:`MergingCoefficients`).

    Example:
        >>> merge({"w": torch.zeros(2)}, {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}, torch.tensor([[0.5], [1.0]]))
        {'w': tensor([3.5000, 5.0000])}
    """
    if not isinstance(task_vectors, StackedTaskVectors):
        if coefficients.dim() != 2 or coefficients.shape[1] != len(task_vectors):
            raise ValueError(
                f"coefficients must have shape [T, {len(task_vectors)}] (one column per merged tensor), "
                f"got {tuple(coefficients.shape)}."
            )
        for name, stacked in task_vectors.items():
            if stacked.shape[1:] != base[name].shape:
                raise ValueError(
                    f"cannot merge {name!r}: base {tuple(base[name].shape)}, stacked {tuple(stacked.shape)}; "
                    "expected stacked [T, *base.shape]."
                )
        task_vectors = StackedTaskVectors(task_vectors).to(coefficients.device)
    sums = task_vectors.weighted_sums(coefficients)
    bases = [base[name].detach() for name in sums]
    merged = torch._foreach_add(bases, [total.to(b.dtype) for total, b in zip(sums.values(), bases)])
    return dict(zip(sums, merged))


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
        for name, stacked in task_vectors.items():
            if name not in state:
                raise ValueError(f"the task vectors name {name!r}, which the encoder lacks.")
            if stacked.shape[1:] != state[name].shape:
                raise ValueError(
                    f"task vectors of {name!r} have shape {tuple(stacked.shape)}, expected "
                    f"[T, {', '.join(map(str, state[name].shape))}] for the encoder's tensor."
                )
        self.encoder = encoder.requires_grad_(False)
        self.task_vectors = StackedTaskVectors(task_vectors)
        self.tensor_names: list[str] = self.task_vectors.names
        buffers = {name for name, _ in encoder.named_buffers()}
        self.merged_buffer_names: frozenset[str] = frozenset(n for n in self.tensor_names if n in buffers)
        self.coefficients = MergingCoefficients(
            self.task_vectors.num_tasks, len(self.tensor_names), granularity, init, clamp
        )

    @property
    def num_tasks(self) -> int:
        return self.coefficients.raw.shape[0]

    def stacked_task_vectors(self) -> dict[str, Tensor]:
        """``{tensor name: Tensor[T, *shape]}`` in merge order."""
        return dict(self.task_vectors.items())

    def merged_tensors(self) -> dict[str, Tensor]:
        """The merged tensors by name, differentiable in the coefficients."""
        base = self.encoder.state_dict(keep_vars=True)
        return merge(base, self.task_vectors, self.coefficients())

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

