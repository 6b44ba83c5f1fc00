"""The merge: ``theta_p = theta_0,p + sum_k lambda_{k,p} tau_{k,p}`` for every merged tensor ``p``.

:func:`merge` is one autograd node for the whole encoder. Tensors of the same shape and dtype
(the same matrix in every transformer block, every LayerNorm vector) are stored together as one
group ``[G, T, *shape]`` (:func:`group_names`), their pretrained values as one block ``[G, *shape]``,
so the merge costs a few batched products per group rather than kernels per tensor: on a GPU,
one fused kernel per group forward (:func:`weighted_sum`) and one backward (:func:`row_dots`),
compiled by ``torch.compile`` so they read bf16/fp16 task vectors as stored, without an fp32
copy; on a CPU, a batched product per group of small tensors and an ``addmv`` per large tensor
in cache-sized slices. The arithmetic is fp32 even under
autocast. Nothing per task is looped over in Python.

:class:`MergedEncoder` ties it together with learnable :class:`MergingCoefficients`. Everything
that does not change between steps is built once: the grouped pretrained blocks (the encoder's
own tensors are views of them, so nothing is stored twice), the coefficient columns of each group
and the parameter slots the merged tensors are swapped into. On CUDA, a training forward and its
backward (merge and encoder) are captured once as CUDA graphs and replayed every step.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

Granularity = Literal["task", "layer"]

# On CPU, products over [T, n] run in slices of this many entries so the vector they read or write
# (and any upcast of bf16/fp16 task vectors) stays in cache: about 2x faster when n is large. A
# group whose tensors are together no larger runs as one batched product (one call, not G).
_CPU_SLICE = 1 << 18

# At most this many CUDA graph pairs (one per input shape and autocast setting) per MergedEncoder:
# each keeps a step's activations in its own memory pool. Other shapes run eagerly.
_MAX_CAPTURES = 4


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


def _merge_group(base: Tensor, group: Tensor, weights: Tensor) -> Tensor:
    """``[G, n]``: ``base [G, n] + sum_k weights[:, k] * group[:, k]`` for ``group [G, T, n]``, in ``weights.dtype``."""
    dtype = weights.dtype
    if group.device.type != "cpu":
        return _compiled(weighted_sum)(group, weights, base.to(dtype))
    if group.shape[0] * group.shape[2] <= _CPU_SLICE:  # small tensors: one batched product, not G
        return torch.baddbmm(base.to(dtype).unsqueeze(1), weights.unsqueeze(1), group.to(dtype)).squeeze(1)
    out = torch.empty(base.shape, dtype=dtype)
    for row, stacked, column, base_row in zip(out, group, weights, base):
        for start in range(0, stacked.shape[1], _CPU_SLICE):
            stop = start + _CPU_SLICE
            torch.addmv(
                base_row[start:stop].to(dtype), stacked[:, start:stop].t().to(dtype), column, out=row[start:stop]
            )
    return out


def _group_grad(group: Tensor, grads: Sequence[Tensor | None], dtype: torch.dtype) -> Tensor:
    """``[G, T]`` in ``dtype``: entry ``[g, k]`` is ``<group[g, k], grads[g]>`` for ``group [G, T, n]``.

    A missing gradient (``None``) counts as zeros.
    """
    if group.device.type == "cpu" and group.shape[0] * group.shape[2] > _CPU_SLICE:  # no [G, n] copy of the grads
        out = torch.zeros(group.shape[:2], dtype=dtype)
        for row, stacked, grad in zip(out, group, grads):
            if grad is None:
                continue
            grad = grad.reshape(-1).to(dtype)
            for start in range(0, stacked.shape[1], _CPU_SLICE):
                stop = start + _CPU_SLICE
                row.addmv_(stacked[:, start:stop].to(dtype), grad[start:stop])
        return out
    zeros = torch.zeros(group.shape[2], dtype=dtype, device=group.device)
    stacked_grads = torch.stack([zeros if grad is None else grad.reshape(-1).to(dtype) for grad in grads])
    if group.device.type == "cpu":  # small tensors: one batched product, not G
        return torch.bmm(stacked_grads.unsqueeze(1), group.to(dtype).transpose(1, 2)).squeeze(1)
    return _compiled(row_dots)(group, stacked_grads)


class _Merge(torch.autograd.Function):
    """Every merged tensor in one autograd node; fp32 (at least) with autocast off.

    Inputs: ``columns`` (per group, a long tensor of its tensors' coefficient columns, on the
    groups' device), ``coefficients [T, P]``, the pretrained blocks ``[G, *shape]``, then the task
    vector groups ``[G, T, *shape]``. Outputs: the merged tensors, group by group, each a view of
    its group's result. The backward reads the task vectors as stored (no upcast copy is kept
    between the passes) and makes no host-device copy, so it can be captured in a CUDA graph.
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
                flat = _merge_group(
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
                rows.index_copy_(0, index, _group_grad(flat, grads[start : start + count], dtype))
                start += count
        return (None, rows.t(), *nothing)


def _column_indices(names: Sequence[Sequence[str]], order: Sequence[str], device: torch.device) -> list[Tensor]:
    position = {name: index for index, name in enumerate(order)}
    return [torch.tensor([position[name] for name in group], dtype=torch.long, device=device) for group in names]


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
    for group_names, group in zip(names, groups):
        for name in group_names:
            if group.shape[2:] != base[name].shape or group.shape[1] != coefficients.shape[0]:
                raise ValueError(
                    f"cannot merge {name!r}: base {tuple(base[name].shape)}, stacked {tuple(group.shape[1:])}, "
                    f"coefficients {tuple(coefficients.shape)}; expected stacked [T, *base.shape] and "
                    "coefficients [T, P]."
                )
    blocks = [torch.stack([base[name].detach() for name in group_names]) for group_names in names]
    columns = _column_indices(names, order, coefficients.device)
    merged = _Merge.apply(columns, coefficients, *blocks, *(group.detach() for group in groups))
    by_name = dict(zip((name for group_names in names for name in group_names), merged))
    return {name: by_name[name] for name in order}


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
    are copies (drop the dict afterwards to free its memory). The encoder's merged tensors are
    re-laid out as views of grouped pretrained blocks ``[G, *shape]`` (also after ``.to()``), so
    the merge reads them without stacking them again each step.

    With ``cuda_graphs`` (the default), a forward on CUDA with gradients enabled (a training step)
    is captured once per input shape and autocast setting, merge and encoder, forward and
    backward, as CUDA graphs (:func:`torch.cuda.make_graphed_callables`), then replayed: a step
    then costs a few host calls instead of hundreds per tensor and layer. The returned features
    are the graph's output buffer, overwritten by the next training forward of that shape: use
    them within the step. An encoder whose forward cannot be captured (a host synchronisation,
    data-dependent control flow) runs eagerly after a warning; ``cuda_graphs=False`` skips the try.

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
        cuda_graphs: bool = True,
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
        # Same-shape tensors stored together, [G, T, *shape] per group (and their pretrained values
        # [G, *shape], hence also one dtype of those): a few batched products per step instead of
        # kernels per tensor.
        dtypes = {name: state[name].dtype for name in self.tensor_names}
        self.group_names = [
            members for group in group_names(task_vectors) for members in _split_by(group, dtypes.__getitem__)
        ]
        self.task_vectors = nn.Module()
        self.pretrained = nn.Module()
        self.columns = nn.Module()
        columns = _column_indices(self.group_names, self.tensor_names, torch.device("cpu"))
        for index, names in enumerate(self.group_names):
            group = _block_or_stack([task_vectors[name] for name in names])
            self.task_vectors.register_buffer(str(index), group, persistent=False)
            pretrained = torch.stack([state[name].detach() for name in names])
            self.pretrained.register_buffer(str(index), pretrained, persistent=False)
            self.columns.register_buffer(str(index), columns[index].to(group.device), persistent=False)
        self._merged_order = [name for names in self.group_names for name in names]
        self._slots = [_slot(encoder, name) for name in self._merged_order]
        self._tie_pretrained()
        self.coefficients = MergingCoefficients(num_tasks, len(self.tensor_names), granularity, init, clamp)
        self.cuda_graphs = cuda_graphs
        self._captured: dict[tuple[Any, ...], Callable[..., Tensor] | None] = {}
        self._awaiting_backward: set[tuple[Any, ...]] = set()

    @property
    def num_tasks(self) -> int:
        return self.coefficients.raw.shape[0]

    def _blocks(self, holder: nn.Module) -> list[Tensor]:
        return [getattr(holder, str(index)) for index in range(len(self.group_names))]

    def _tie_pretrained(self) -> None:
        """Make the encoder's merged tensors views of the pretrained blocks (one copy of ``theta_0``)."""
        views = (row for block in self._blocks(self.pretrained) for row in block.unbind(0))
        for (owner, key, is_buffer), view in zip(self._slots, views):
            if is_buffer:
                owner._buffers[key] = view
            else:
                owner._parameters[key].data = view

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> MergedEncoder:
        # A move or cast re-creates the encoder's tensors one by one: tie them to the moved blocks
        # again, and drop CUDA graphs that point at the old memory.
        super()._apply(fn, recurse)
        self._tie_pretrained()
        self._captured.clear()
        self._awaiting_backward.clear()
        return self

    def __getstate__(self) -> dict[str, Any]:
        # CUDA graphs are neither copied nor pickled.
        return {**self.__dict__, "_captured": {}, "_awaiting_backward": set()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._tie_pretrained()  # a copy (deepcopy, pickle) gets its own blocks: the encoder views them again

    def stacked_task_vectors(self) -> dict[str, Tensor]:
        """``{tensor name: Tensor[T, *shape]}`` (views of the stored groups) in coefficient-column order."""
        views = {
            name: group[j]
            for names, group in zip(self.group_names, self._blocks(self.task_vectors))
            for j, name in enumerate(names)
        }
        return {name: views[name] for name in self.tensor_names}

    def _merge(self, coefficients: Tensor) -> dict[str, Tensor]:
        """The merged tensors for ``coefficients [T, P]``, by name, in group order."""
        merged = _Merge.apply(
            self._blocks(self.columns), coefficients, *self._blocks(self.pretrained), *self._blocks(self.task_vectors)
        )
        return dict(zip(self._merged_order, merged))

    def merged_tensors(self) -> dict[str, Tensor]:
        """The merged tensors by name (coefficient-column order), differentiable in the coefficients."""
        merged = self._merge(self.coefficients())
        return {name: merged[name] for name in self.tensor_names}

    @contextlib.contextmanager
    def _swapped(self, tensors: Mapping[str, Tensor]) -> Iterator[None]:
        """The encoder with ``tensors`` in place of its merged parameters and buffers (buffers detached:
        batch norm takes no gradient through its running statistics)."""
        saved: list[Tensor] = []
        try:
            for (owner, key, is_buffer), name in zip(self._slots, self._merged_order):
                table = owner._buffers if is_buffer else owner._parameters
                saved.append(table[key])
                table[key] = tensors[name].detach() if is_buffer else tensors[name]
            yield
        finally:
            for (owner, key, is_buffer), tensor in zip(self._slots, saved):
                (owner._buffers if is_buffer else owner._parameters)[key] = tensor

    def _encode(self, images: Tensor, tensors: Mapping[str, Tensor]) -> Tensor:
        with self._swapped(tensors):
            return self.encoder(images)

    def forward(self, images: Tensor, merged: Mapping[str, Tensor] | None = None) -> Tensor:
        """Encode ``images`` with the merged weights (``merged`` reuses tensors merged earlier).

        Merged buffers (``buffer_policy="merge"``) are detached: batch norm takes no gradient
        through its running statistics, so they follow the coefficients without training them.
        """
        if merged is not None:
            return self._encode(images, merged)
        if self._graphable(images):
            return self._graphed(images)
        return self._encode(images, self._merge(self.coefficients()))

    def _graphable(self, images: Tensor) -> bool:
        return (
            self.cuda_graphs
            and images.is_cuda
            and torch.is_grad_enabled()
            and self.coefficients.raw.requires_grad
            and not torch.cuda.is_current_stream_capturing()
            and not torch.compiler.is_compiling()
        )

    def _graphed(self, images: Tensor) -> Tensor:
        coefficients = self.coefficients()
        device = images.device.type
        autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        key = (tuple(images.shape), images.dtype, images.device, *autocast)
        if key not in self._captured and len(self._captured) < _MAX_CAPTURES:
            self._captured[key] = self._capture(coefficients, images)
        graphed = self._captured.get(key)
        if graphed is None or key in self._awaiting_backward:
            if graphed is not None:
                # A replay would overwrite the outputs and saved state the earlier forward's backward needs.
                warnings.warn(
                    "MergedEncoder: a second training forward of the same shape before the first one's backward "
                    "runs without its CUDA graph (slower, still exact); call backward once per forward.",
                    stacklevel=3,
                )
            return self._encode(images, self._merge(coefficients))
        features = graphed(coefficients, images)
        self._awaiting_backward.add(key)
        features.register_hook(functools.partial(_backward_reached, self._awaiting_backward, key))
        return features

    def _capture(self, coefficients: Tensor, images: Tensor) -> Callable[..., Tensor] | None:
        """The merge and the encoder, forward and backward, as CUDA graphs for inputs like these;
        ``None`` (with a warning) if the encoder cannot be captured: those inputs then run eagerly."""

        def step(coefficients: Tensor, images: Tensor) -> Tensor:
            return self._encode(images, self._merge(coefficients))

        device = images.device.type
        stream = torch.cuda.current_stream(images.device)
        try:
            # Capture records the autocast casts in use; its weight-cast cache must be off for that.
            with torch.autocast(
                device,
                dtype=torch.get_autocast_dtype(device),
                enabled=torch.is_autocast_enabled(device),
                cache_enabled=False,
            ):
                return torch.cuda.make_graphed_callables(
                    step, (coefficients.detach().clone().requires_grad_(True), images.detach().clone())
                )
        except RuntimeError as error:  # an operation of the encoder that a graph cannot hold
            torch.cuda.set_stream(stream)  # a failed capture leaves its side stream current
            torch.cuda.synchronize(images.device)
            warnings.warn(
                f"MergedEncoder: the training step could not be captured as a CUDA graph for inputs of shape "
                f"{tuple(images.shape)} ({type(error).__name__}: {str(error).splitlines()[0]}); it runs eagerly. "
                "Set cuda_graphs=False to skip the attempt.",
                stacklevel=4,
            )
            return None

    @torch.no_grad()
    def merged_state_dict(self) -> dict[str, Tensor]:
        """The merged encoder as a plain state dict that loads into the original model class."""
        merged = self.merged_tensors()
        return {
            name: (merged[name] if name in merged else tensor).detach().clone().contiguous()
            for name, tensor in self.encoder.state_dict().items()
        }


def _backward_reached(awaiting: set[tuple[Any, ...]], key: tuple[Any, ...], grad: Tensor) -> None:
    awaiting.discard(key)


def _split_by(names: Sequence[str], key: Callable[[str], Any]) -> list[list[str]]:
    """``names`` split into lists of equal ``key``, in order of first appearance."""
    parts: dict[Any, list[str]] = {}
    for name in names:
        parts.setdefault(key(name), []).append(name)
    return list(parts.values())


def _slot(module: nn.Module, name: str) -> tuple[nn.Module, str, bool]:
    """``(owning module, attribute, is a buffer)`` of the parameter or buffer ``name`` of ``module``."""
    path, _, key = name.rpartition(".")
    owner = module.get_submodule(path)
    if key in owner._buffers:
        return owner, key, True
    if key in owner._parameters:
        return owner, key, False
    raise ValueError(f"{name!r} is neither a parameter nor a buffer of the encoder.")
