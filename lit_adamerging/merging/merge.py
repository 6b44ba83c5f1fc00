"""The merge: ``theta_p = theta_0,p + sum_k lambda_{k,p} tau_{k,p}`` for every merged tensor ``p``.

:func:`merge` is one autograd node for the whole encoder: per tensor, one fused ``addmv``
(pretrained tensor + stacked task vectors ``[T, *shape]`` times that tensor's coefficients; never a
Python loop over tasks), and per tensor one matrix-vector product in the backward. The arithmetic
is fp32 even under autocast, and the backward keeps no copy of the task vectors, even when they
are stored in bf16/fp16.
:class:`MergedEncoder` ties it together with learnable :class:`MergingCoefficients` and runs the
encoder through :func:`torch.func.functional_call`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

Granularity = Literal["task", "layer"]

# On CPU, products over [T, n] run in slices of this many entries so the vector they read or write
# (and any upcast of bf16/fp16 task vectors) stays in cache: about 2x faster when n is large.
_CPU_SLICE = 1 << 18


def _merge_one(base: Tensor, stacked: Tensor, coefficients: Tensor, dtype: torch.dtype) -> Tensor:
    """``base + sum_k coefficients[k] * stacked[k]`` computed in ``dtype``, returned in ``base.dtype``."""
    flat = stacked.reshape(stacked.shape[0], -1)
    base_flat = base.reshape(-1)
    if flat.device.type != "cpu":
        out = torch.addmv(base_flat.to(dtype), flat.t().to(dtype), coefficients)
    else:
        out = torch.empty(flat.shape[1], dtype=dtype)
        for start in range(0, flat.shape[1], _CPU_SLICE):
            stop = start + _CPU_SLICE
            torch.addmv(
                base_flat[start:stop].to(dtype), flat[:, start:stop].t().to(dtype), coefficients, out=out[start:stop]
            )
    return out.view(base.shape).to(base.dtype)


def _coefficient_grad(stacked: Tensor, grad: Tensor, out: Tensor) -> None:
    """``out[k] = <stacked[k], grad>`` over all entries, in ``out.dtype``."""
    flat = stacked.reshape(stacked.shape[0], -1)
    grad = grad.reshape(-1).to(out.dtype)
    if flat.device.type != "cpu":
        torch.mv(flat.to(out.dtype), grad, out=out)
        return
    out.zero_()
    for start in range(0, flat.shape[1], _CPU_SLICE):
        stop = start + _CPU_SLICE
        out.addmv_(flat[:, start:stop].to(out.dtype), grad[start:stop])


class _Merge(torch.autograd.Function):
    """Every merged tensor in one autograd node; fp32 (at least) with autocast off.

    Inputs: ``coefficients [T, P]``, then the P base tensors, then the P stacked task vectors.
    The backward reads the task vectors as stored (no upcast copy is kept between the passes).
    """

    @staticmethod
    def forward(ctx: Any, coefficients: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
        count = len(tensors) // 2
        bases, stacked = tensors[:count], tensors[count:]
        ctx.save_for_backward(*stacked)
        ctx.dtype = dtype = torch.promote_types(coefficients.dtype, torch.float32)
        with torch.autocast(coefficients.device.type, enabled=False):
            columns = coefficients.to(dtype).t()
            return tuple(_merge_one(b, tv, column, dtype) for b, tv, column in zip(bases, stacked, columns))

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        stacked = ctx.saved_tensors
        nothing = (None,) * (2 * len(stacked))
        if not ctx.needs_input_grad[0]:
            return (None, *nothing)
        rows = torch.zeros(len(stacked), stacked[0].shape[0], dtype=ctx.dtype, device=stacked[0].device)
        with torch.autocast(rows.device.type, enabled=False):
            for index, (tv, grad) in enumerate(zip(stacked, grads)):
                if grad is not None:
                    _coefficient_grad(tv, grad, rows[index])
        return (rows.t(), *nothing)


def merge(base: Mapping[str, Tensor], task_vectors: Mapping[str, Tensor], coefficients: Tensor) -> dict[str, Tensor]:
    """``{name: base[name] + sum_k coefficients[k, i] * task_vectors[name][k]}``, differentiable in the coefficients.

    Args:
        base: pretrained tensors by name (a superset of ``task_vectors``' keys); treated as constants.
        task_vectors: ``{name: Tensor[T, *shape]}`` from :func:`stack_task_vectors`; treated as constants.
        coefficients: ``[T, P]``, column ``i`` weighing the i-th tensor's tasks (see :class:`MergingCoefficients`).

    Example:
        >>> merge({"w": torch.zeros(2)}, {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}, torch.tensor([[0.5], [1.0]]))
        {'w': tensor([3.5000, 5.0000])}
    """
    if coefficients.dim() != 2 or coefficients.shape[1] != len(task_vectors):
        raise ValueError(
            f"coefficients must have shape [T, {len(task_vectors)}] (one column per merged tensor), "
            f"got {tuple(coefficients.shape)}."
        )
    for name, stacked in task_vectors.items():
        if stacked.shape[1:] != base[name].shape or stacked.shape[0] != coefficients.shape[0]:
            raise ValueError(
                f"cannot merge {name!r}: base {tuple(base[name].shape)}, stacked {tuple(stacked.shape)}, "
                f"coefficients {tuple(coefficients.shape)}; expected stacked [T, *base.shape] and coefficients [T, P]."
            )
    bases = [base[name].detach() for name in task_vectors]
    merged = _Merge.apply(coefficients, *bases, *(stacked.detach() for stacked in task_vectors.values()))
    return dict(zip(task_vectors, merged))


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
        num_tasks = next(iter(task_vectors.values())).shape[0]
        self.encoder = encoder.requires_grad_(False)
        self.tensor_names: list[str] = list(task_vectors)
        buffers = {name for name, _ in encoder.named_buffers()}
        self.merged_buffer_names: frozenset[str] = frozenset(n for n in self.tensor_names if n in buffers)
        self.task_vectors = nn.Module()
        for index, stacked in enumerate(task_vectors.values()):
            self.task_vectors.register_buffer(str(index), stacked, persistent=False)
        self.coefficients = MergingCoefficients(num_tasks, len(self.tensor_names), granularity, init, clamp)

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

