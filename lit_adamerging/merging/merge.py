"""The merge: ``theta_p = theta_0,p + sum_k lambda_{k,p} tau_{k,p}`` for every merged tensor ``p``.

:func:`merge` is one autograd node for the whole encoder. Tensors of the same shape and dtype
(the same matrix in every transformer block, every LayerNorm vector) are stored together as one
group ``[G, T, *shape]`` (:func:`group_names`), so the merge costs a few batched products
per group rather than kernels per tensor: on a GPU, one fused kernel per group forward
(:func:`weighted_sum`) and one backward (:func:`row_dots`), compiled by ``torch.compile`` so they
read bf16/fp16 task vectors as stored, without an fp32 copy; on a CPU, an ``addmv`` per tensor in
cache-sized slices. The arithmetic is fp32 even under autocast. Nothing per task is looped over
in Python.
:class:`MergedEncoder` ties it together with learnable :class:`MergingCoefficients` and runs the
encoder through :func:`torch.func.functional_call`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

Granularity = Literal["task", "layer"]

# On CPU, products over [T, n] run in slices of this many entries so the vector they read or write
# (and any upcast of bf16/fp16 task vectors) stays in cache: about 2x faster when n is large.
_CPU_SLICE = 1 << 18


def group_names(task_vectors: Mapping[str, Tensor]) -> list[list[str]]:
    """The names of same-shape, same-dtype, same-device task vectors, grouped in order of first appearance.

    Example:
        >>> group_names({"a": torch.zeros(2, 3), "b": torch.ones(2, 4), "c": torch.ones(2, 3)})
        [['a', 'c'], ['b']]
    """
    members: dict[tuple[Any, ...], list[str]] = {}
    for name, stacked in task_vectors.items():
        members.setdefault((tuple(stacked.shape), stacked.dtype, stacked.device), []).append(name)
    return list(members.values())


def group_task_vectors(task_vectors: Mapping[str, Tensor]) -> tuple[list[list[str]], list[Tensor]]:
    """:func:`group_names` and one ``[G, T, *shape]`` tensor per group.

    A group whose tensors are, in order, the views of one block (as :func:`stack_task_vectors`
    lays them out) is that block, shared rather than copied; any other group is a ``torch.stack``.
    """
    names = group_names(task_vectors)
    return names, [_block_or_stack([task_vectors[name] for name in group]) for group in names]


def _block_or_stack(tensors: list[Tensor]) -> Tensor:
    block = tensors[0]._base  # set on views only (``detach`` would drop it)
    shares_block = (
        block is not None
        and block.is_contiguous()
        and block.shape == (len(tensors), *tensors[0].shape)
        and all(t._base is block and t.data_ptr() == block[j].data_ptr() for j, t in enumerate(tensors))
    )
    return block.detach() if shares_block else torch.stack([tensor.detach() for tensor in tensors])


def weighted_sum(group: Tensor, weights: Tensor, base: Tensor) -> Tensor:
    """``base [G, n] + sum_k weights[:, k] * group[:, k]`` for ``group [G, T, n]``, in ``weights.dtype``."""
    return base + (group.to(weights.dtype) * weights.unsqueeze(-1)).sum(dim=1)


def row_dots(group: Tensor, grads: Tensor) -> Tensor:
    """``[G, T]`` with entry ``[g, k] = <group[g, k], grads[g]>`` for ``group [G, T, n]``, in ``grads.dtype``."""
    return (group.to(grads.dtype) * grads.unsqueeze(1)).sum(dim=-1)


# One compiled kernel per distinct group shape: with static shapes Inductor splits the long
# reductions and the kernels run at memory bandwidth (dynamic shapes were 10-20x slower, measured).
_MAX_GROUP_SHAPES = 256


@functools.cache
def _compiled(function: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``function`` compiled by Inductor: the upcast, product and sum fuse into one kernel that reads the
    task vectors once, as stored (eager would materialise ``[G, T, n]`` in fp32)."""
    compiled = torch.compile(function, dynamic=False, fullgraph=True)

    def run(*args: Tensor) -> Tensor:
        with torch._dynamo.config.patch(recompile_limit=_MAX_GROUP_SHAPES):
            return compiled(*args)

    return run


def _merge_one(base: Tensor, stacked: Tensor, coefficients: Tensor, dtype: torch.dtype) -> Tensor:
    """CPU: ``base + sum_k coefficients[k] * stacked[k]`` in ``dtype``, in cache-sized slices; returned in ``base.dtype``."""
    flat = stacked.reshape(stacked.shape[0], -1)
    base_flat = base.reshape(-1)
    out = torch.empty(flat.shape[1], dtype=dtype)
    for start in range(0, flat.shape[1], _CPU_SLICE):
        stop = start + _CPU_SLICE
        torch.addmv(base_flat[start:stop].to(dtype), flat[:, start:stop].t().to(dtype), coefficients, out=out[start:stop])
    return out.view(base.shape).to(base.dtype)


def _merge_group(bases: Sequence[Tensor], group: Tensor, columns: Tensor, dtype: torch.dtype) -> list[Tensor]:
    """The merged tensors of one group: ``group [G, T, *shape]``, ``columns [G, T]`` (their coefficients)."""
    if group.device.type == "cpu":
        return [_merge_one(base, stacked, column, dtype) for base, stacked, column in zip(bases, group, columns)]
    flat = group.reshape(group.shape[0], group.shape[1], -1)
    stacked_bases = torch.stack([base.reshape(-1) for base in bases]).to(dtype)
    merged = _compiled(weighted_sum)(flat, columns, stacked_bases)
    return [row.view(base.shape).to(base.dtype) for row, base in zip(merged, bases)]


def _group_grad(group: Tensor, grads: Sequence[Tensor | None], dtype: torch.dtype) -> Tensor:
    """``[G, T]``: entry ``[g, k]`` is ``<group[g, k], grads[g]>`` over all entries (0 for a missing grad)."""
    flat = group.reshape(group.shape[0], group.shape[1], -1)
    if group.device.type == "cpu":
        out = torch.zeros(flat.shape[:2], dtype=dtype)
        for row, stacked, grad in zip(out, flat, grads):
            if grad is None:
                continue
            grad = grad.reshape(-1).to(dtype)
            for start in range(0, stacked.shape[1], _CPU_SLICE):
                stop = start + _CPU_SLICE
                row.addmv_(stacked[:, start:stop].to(dtype), grad[start:stop])
        return out
    zeros = torch.zeros(flat.shape[2], dtype=dtype, device=flat.device)
    stacked_grads = torch.stack([zeros if grad is None else grad.reshape(-1).to(dtype) for grad in grads])
    return _compiled(row_dots)(flat, stacked_grads)


class _Merge(torch.autograd.Function):
    """Every merged tensor in one autograd node; fp32 (at least) with autocast off.

    Inputs: ``columns`` (per group, the coefficient columns of its tensors), ``coefficients [T, P]``,
    then the P base tensors in column order, then the groups ``[G, T, *shape]``. The backward reads
    the task vectors as stored (no upcast copy is kept between the passes).
    """

    @staticmethod
    def forward(ctx: Any, columns: tuple[tuple[int, ...], ...], coefficients: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
        count = coefficients.shape[1]
        bases, groups = tensors[:count], tensors[count:]
        ctx.save_for_backward(*groups)
        ctx.columns = columns
        ctx.dtype = dtype = torch.promote_types(coefficients.dtype, torch.float32)
        merged: list[Tensor | None] = [None] * count
        with torch.autocast(coefficients.device.type, enabled=False):
            weights = coefficients.to(dtype).t()  # [P, T]
            for group, indices in zip(groups, columns):
                outputs = _merge_group([bases[i] for i in indices], group, weights[list(indices)], dtype)
                for index, output in zip(indices, outputs):
                    merged[index] = output
        return tuple(merged)  # type: ignore[arg-type]

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        groups = ctx.saved_tensors
        nothing = (None,) * (len(grads) + len(groups))
        if not ctx.needs_input_grad[1]:
            return (None, None, *nothing)
        rows = torch.zeros(len(grads), groups[0].shape[1], dtype=ctx.dtype, device=groups[0].device)
        with torch.autocast(rows.device.type, enabled=False):
            for group, indices in zip(groups, ctx.columns):
                rows[list(indices)] = _group_grad(group, [grads[i] for i in indices], ctx.dtype)
        return (None, rows.t(), *nothing)


def merge_groups(
    base: Mapping[str, Tensor],
    names: Sequence[Sequence[str]],
    groups: Sequence[Tensor],
    coefficients: Tensor,
    order: Sequence[str],
) -> dict[str, Tensor]:
    """:func:`merge` on grouped task vectors: ``groups[g]`` is ``[G, T, *shape]``, holding the tensors ``names[g]``.

    Column ``i`` of ``coefficients [T, P]`` weighs tensor ``order[i]``; the result follows ``order``.
    """
    if coefficients.dim() != 2 or coefficients.shape[1] != len(order):
        raise ValueError(
            f"coefficients must have shape [T, {len(order)}] (one column per merged tensor), "
            f"got {tuple(coefficients.shape)}."
        )
    position = {name: index for index, name in enumerate(order)}
    for group_names, group in zip(names, groups):
        for name in group_names:
            if group.shape[2:] != base[name].shape or group.shape[1] != coefficients.shape[0]:
                raise ValueError(
                    f"cannot merge {name!r}: base {tuple(base[name].shape)}, stacked {tuple(group.shape[1:])}, "
                    f"coefficients {tuple(coefficients.shape)}; expected stacked [T, *base.shape] and coefficients [T, P]."
                )
    columns = tuple(tuple(position[name] for name in group_names) for group_names in names)
    bases = [base[name].detach() for name in order]
    merged = _Merge.apply(columns, coefficients, *bases, *(group.detach() for group in groups))
    return dict(zip(order, merged))


def merge(base: Mapping[str, Tensor], task_vectors: Mapping[str, Tensor], coefficients: Tensor) -> dict[str, Tensor]:
    """``{name: base[name] + sum_k coefficients[k, i] * task_vectors[name][k]}``, differentiable in the coefficients.

    Args:
        base: pretrained tensors by name (a superset of ``task_vectors``' keys); treated as constants.
        task_vectors: ``{name: Tensor[T, *shape]}`` from :func:`stack_task_vectors`; treated as constants.
        coefficients: ``[T, P]``, column ``i`` weighing the i-th tensor's tasks (see :class:`MergingCoefficients`).

    Groups the task vectors on every call; :class:`MergedEncoder` groups them once.

    Example:
        >>> merge({"w": torch.zeros(2)}, {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}, torch.tensor([[0.5], [1.0]]))
        {'w': tensor([3.5000, 5.0000])}
    """
    names, groups = group_task_vectors(task_vectors)
    return merge_groups(base, names, groups, coefficients, list(task_vectors))


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
    non-persistent buffers (never saved in a state dict), grouped by shape, and the
    :class:`MergingCoefficients`. ``task_vectors`` is ``{name: [T, *shape]}`` in coefficient-column
    order; the groups share memory with it when it comes from :func:`stack_task_vectors`, else they
    are copies (drop the dict afterwards to free its memory).

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
        num_tasks = next(iter(task_vectors.values())).shape[0]
        self.encoder = encoder.requires_grad_(False)
        self.tensor_names: list[str] = list(task_vectors)
        buffers = {name for name, _ in encoder.named_buffers()}
        self.merged_buffer_names: frozenset[str] = frozenset(n for n in self.tensor_names if n in buffers)
        # Same-shape tensors stored together, [G, T, *shape] per group: a few batched products per
        # step instead of kernels per tensor.
        self.group_names, groups = group_task_vectors(task_vectors)
        self.task_vectors = nn.Module()
        for index, group in enumerate(groups):
            self.task_vectors.register_buffer(str(index), group, persistent=False)
        self.coefficients = MergingCoefficients(num_tasks, len(self.tensor_names), granularity, init, clamp)

    @property
    def num_tasks(self) -> int:
        return self.coefficients.raw.shape[0]

    def _groups(self) -> list[Tensor]:
        return [getattr(self.task_vectors, str(index)) for index in range(len(self.group_names))]

    def stacked_task_vectors(self) -> dict[str, Tensor]:
        """``{tensor name: Tensor[T, *shape]}`` (views of the stored groups) in coefficient-column order."""
        views = {name: group[j] for names, group in zip(self.group_names, self._groups()) for j, name in enumerate(names)}
        return {name: views[name] for name in self.tensor_names}

    def merged_tensors(self) -> dict[str, Tensor]:
        """The merged tensors by name, differentiable in the coefficients."""
        base = self.encoder.state_dict(keep_vars=True)
        return merge_groups(base, self.group_names, self._groups(), self.coefficients(), self.tensor_names)

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

