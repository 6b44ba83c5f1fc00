"""The merge: ``theta_p = theta_0,p + sum_k lambda_{k,p} tau_{k,p}`` for every merged tensor ``p``.

:func:`merge` is one autograd node for the whole encoder. Tensors of the same shape and dtype
(the same matrix in every transformer block, every LayerNorm vector) are stored together as one
group ``[G, T, *shape]`` (:func:`~lit_adamerging.merging.task_vectors.group_task_vectors`), their
pretrained values as one block ``[G, *shape]``, so the merge costs a few batched products per
group rather than kernels per tensor (``_kernels``: compiled kernels on a GPU, batched products
on a CPU; ``_autograd``: the node over all groups). The arithmetic is fp32 even under autocast.
Nothing per task is looped over in Python.

:class:`MergedEncoder`, the module twin of :func:`merge`, ties it together with learnable
:class:`MergingCoefficients`. Everything that does not change between steps is built once: the
grouped pretrained blocks (the encoder's own tensors are views of them, so nothing is stored
twice), the coefficient columns of each group and the parameter slots the merged tensors are
swapped into. On CUDA, a training forward and its backward (merge and encoder) are captured once
as CUDA graphs and replayed every step (``_graphs``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lit_adamerging.merging._autograd import Merge, column_indices
from lit_adamerging.merging._graphs import StepGraphs, graphable
from lit_adamerging.merging.task_vectors import StackedTaskVectors, group_names, group_task_vectors

Granularity = Literal["task", "layer"]


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
    for members, group in zip(names, groups):
        for name in members:
            if group.shape[2:] != base[name].shape or group.shape[1] != coefficients.shape[0]:
                raise ValueError(
                    f"cannot merge {name!r}: base {tuple(base[name].shape)}, stacked {tuple(group.shape[1:])}, "
                    f"coefficients {tuple(coefficients.shape)}; expected stacked [T, *base.shape] and "
                    "coefficients [T, P]."
                )
    blocks = [torch.stack([base[name].detach() for name in members]) for members in names]
    columns = column_indices(names, order, coefficients.device)
    merged = Merge.apply(columns, coefficients, *blocks, *(group.detach() for group in groups))
    by_name = dict(zip((name for members in names for name in members), merged))
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


class GroupedTaskVectors(nn.Module):
    """What :class:`MergedEncoder` and :class:`~lit_adamerging.merging.ShardedMergedEncoder` store alike: the task
    vectors and pretrained values of the merged tensors, same-shape (and same-dtype) tensors together, one
    ``[G, T, *shape]`` group and one ``[G, *shape]`` block each (a few batched products per step instead of
    kernels per tensor), with each group's coefficient columns; and the :class:`MergingCoefficients`."""

    coefficients: MergingCoefficients

    def _store_groups(self, task_vectors: Mapping[str, Tensor], pretrained: Mapping[str, Tensor]) -> None:
        """Group ``task_vectors`` (``{name: [T, *shape]}`` in coefficient-column order) with their ``pretrained``
        values as non-persistent buffers; sets ``tensor_names``, ``group_names`` and the merged order."""
        self.tensor_names: list[str] = list(task_vectors)
        self._stored_tasks = next(iter(task_vectors.values())).shape[0]
        dtypes = {name: pretrained[name].dtype for name in self.tensor_names}
        split = [members for group in group_names(task_vectors) for members in _split_by(group, dtypes.__getitem__)]
        self.group_names, groups = group_task_vectors(task_vectors, split)
        self.task_vectors = nn.Module()
        self.pretrained = nn.Module()
        self.columns = nn.Module()
        columns = column_indices(self.group_names, self.tensor_names, torch.device("cpu"))
        for index, (names, group) in enumerate(zip(self.group_names, groups)):
            self.task_vectors.register_buffer(str(index), group, persistent=False)
            self.pretrained.register_buffer(str(index), torch.stack([pretrained[name] for name in names]),
                                            persistent=False)
            self.columns.register_buffer(str(index), columns[index].to(group.device), persistent=False)
        self._merged_order = [name for names in self.group_names for name in names]

    @property
    def num_tasks(self) -> int:
        return self.coefficients.raw.shape[0]

    def _blocks(self, holder: nn.Module) -> list[Tensor]:
        return [getattr(holder, str(index)) for index in range(len(self.group_names))]

    def stacked_task_vectors(self) -> StackedTaskVectors:
        """``{tensor name: Tensor[T, *shape]}`` (rows of the stored groups, which it keeps) in coefficient-column
        order."""
        return StackedTaskVectors(zip(self.group_names, self._blocks(self.task_vectors)), self.tensor_names)

    def task_vector_bytes(self) -> int:
        """Bytes of task vectors stored (the groups)."""
        return sum(block.numel() * block.element_size() for block in self._blocks(self.task_vectors))

    def _merge_stored(self, coefficients: Tensor) -> dict[str, Tensor]:
        """The stored tensors merged with ``coefficients [T, P]``, by name, in group order."""
        merged = Merge.apply(
            self._blocks(self.columns), coefficients, *self._blocks(self.pretrained), *self._blocks(self.task_vectors)
        )
        return dict(zip(self._merged_order, merged))


class MergedEncoder(GroupedTaskVectors):
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
        self.encoder = encoder.requires_grad_(False)
        buffers = {name for name, _ in encoder.named_buffers()}
        self.merged_buffer_names: frozenset[str] = frozenset(n for n in task_vectors if n in buffers)
        self._store_groups(task_vectors, {name: state[name].detach() for name in task_vectors})
        self._slots = [_slot(encoder, name) for name in self._merged_order]
        self._tie_pretrained()
        self.coefficients = MergingCoefficients(self._stored_tasks, len(self.tensor_names), granularity, init, clamp)
        self.cuda_graphs = cuda_graphs
        self._graphs = StepGraphs()

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
        self._graphs.clear()
        return self

    def __getstate__(self) -> dict[str, Any]:
        # CUDA graphs are neither copied nor pickled.
        return {**self.__dict__, "_graphs": StepGraphs()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._tie_pretrained()  # a copy (deepcopy, pickle) gets its own blocks: the encoder views them again

    def pretrained_tensors(self) -> dict[str, Tensor]:
        """``{name: theta_0}`` of the merged tensors, in coefficient-column order (views of the stored blocks)."""
        state = self.encoder.state_dict()
        return {name: state[name] for name in self.tensor_names}

    def apply_merge(
        self, merge: Callable[[Mapping[str, Tensor], list[str]], Mapping[str, Tensor]], matrices: Collection[str]
    ) -> dict[str, Tensor]:
        """``merge(task_vectors, matrices)``: a merge of the stacked task vectors that reads the tensors named in
        ``matrices`` as matrices (a spectral merge); :class:`~lit_adamerging.merging.ShardedMergedEncoder` gives
        the same result from task vectors split across processes."""
        return dict(merge(self.stacked_task_vectors(), [name for name in self.tensor_names if name in set(matrices)]))


    def merged_tensors(self) -> dict[str, Tensor]:
        """The merged tensors by name (coefficient-column order), differentiable in the coefficients."""
        merged = self._merge_stored(self.coefficients())
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
        coefficients = self.coefficients()
        if self.cuda_graphs and graphable(images, self.coefficients.raw.requires_grad):
            features = self._graphs(self._step, coefficients, images)
            if features is not None:
                return features
        return self._step(coefficients, images)

    def _step(self, coefficients: Tensor, images: Tensor) -> Tensor:
        return self._encode(images, self._merge_stored(coefficients))

    @torch.no_grad()
    def merged_state_dict(self) -> dict[str, Tensor]:
        """The merged encoder as a plain state dict that loads into the original model class."""
        merged = self.merged_tensors()
        return {
            name: (merged[name] if name in merged else tensor).detach().clone().contiguous()
            for name, tensor in self.encoder.state_dict().items()
        }


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
