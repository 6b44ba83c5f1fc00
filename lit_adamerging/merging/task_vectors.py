"""Task vectors: what each fine-tuned model adds to the pretrained one, stacked over tasks.

For every floating-point tensor ``p`` of the encoder, ``stack_task_vectors`` returns one tensor of
shape ``[T, *p.shape]`` whose row ``k`` is ``theta_k[p] - theta_0[p]``. Every fine-tuned state
dict is checked against the pretrained one first (keys, shapes, dtypes, finite values); any
problem raises :class:`TaskVectorError` naming the task and the key.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

BufferPolicy = Literal["pretrained", "merge", "require_equal"]
"""What happens to floating-point buffers (e.g. batch-norm running statistics).

- ``"pretrained"`` (default): the merged model keeps the pretrained buffers unchanged.
- ``"merge"``: buffers are merged like parameters, with the same coefficients.
- ``"require_equal"``: every fine-tuned buffer must equal the pretrained one, else an error.

Integer buffers (``num_batches_tracked``, index tables) are never merged nor compared.
"""

BUFFER_POLICIES: tuple[str, ...] = ("pretrained", "merge", "require_equal")


class TaskVectorError(ValueError):
    """A fine-tuned state dict does not fit the pretrained one."""


def _preview(keys: Collection[str], limit: int = 5) -> str:
    ordered = sorted(keys)
    shown = ", ".join(repr(k) for k in ordered[:limit])
    return shown + (f", ... ({len(ordered)} in all)" if len(ordered) > limit else "")


def _check_finite(tensor: Tensor, where: str) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise TaskVectorError(f"{where} contains NaN or Inf values; the checkpoint is corrupt or diverged.")


def check_compatible(pretrained: Mapping[str, Tensor], finetuned: Mapping[str, Tensor], task: str) -> None:
    """Raise :class:`TaskVectorError` unless ``finetuned`` has the keys, shapes and dtypes of ``pretrained``."""
    missing = pretrained.keys() - finetuned.keys()
    if missing:
        raise TaskVectorError(
            f"task {task!r}: the fine-tuned state dict lacks keys of the pretrained encoder: {_preview(missing)}. "
            "Both must come from the same architecture (check the model name and any key prefix)."
        )
    extra = finetuned.keys() - pretrained.keys()
    if extra:
        raise TaskVectorError(
            f"task {task!r}: the fine-tuned state dict has keys the pretrained encoder lacks: {_preview(extra)}. "
            "Both must come from the same architecture (check the model name and any key prefix)."
        )
    for key, base in pretrained.items():
        tuned = finetuned[key]
        if tuned.shape != base.shape:
            raise TaskVectorError(
                f"task {task!r}, key {key!r}: shape {tuple(tuned.shape)} differs from the pretrained "
                f"{tuple(base.shape)}; the fine-tuned model has another architecture. Merge only models fine-tuned "
                "from this pretrained encoder (check the zoo's model name and each task's file)."
            )
        if tuned.dtype != base.dtype:
            raise TaskVectorError(
                f"task {task!r}, key {key!r}: dtype {tuned.dtype} differs from the pretrained {base.dtype}; "
                "convert both checkpoints to one dtype before merging."
            )


def stack_task_vectors(
    pretrained: Mapping[str, Tensor],
    finetuned: Mapping[str, Mapping[str, Tensor]],
    *,
    buffers: Collection[str] = (),
    buffer_policy: BufferPolicy = "pretrained",
    dtype: torch.dtype = torch.float32,
) -> StackedTaskVectors:
    """Stack ``theta_k - theta_0`` over tasks for every tensor that gets merged.

    Args:
        pretrained: the pretrained encoder's state dict.
        finetuned: ``{task: state dict}`` of the fine-tuned encoders, same keys as ``pretrained``; each is
            read once, in order, so a mapping that loads a state dict on access keeps one in memory at a time.
        buffers: the keys of ``pretrained`` that are buffers, not parameters (see :data:`BufferPolicy`).
        buffer_policy: what to do with floating-point buffers.
        dtype: storage dtype of the stacked vectors (``torch.bfloat16`` halves their memory; an entry that
            overflows it, as float16's 65504 can be, is a :class:`TaskVectorError`).

    Returns:
        ``{key: Tensor[T, *shape]}`` in the key order of ``pretrained``, tasks in the order of ``finetuned``;
        a :class:`StackedTaskVectors`: same-shape tensors are the rows of one ``[G, T, *shape]`` block
        it keeps (see :func:`group_task_vectors`).

    Example:
        >>> base = {"w": torch.zeros(2), "b": torch.ones(1)}
        >>> tuned = {"a": {"w": torch.tensor([1.0, 2.0]), "b": torch.ones(1)},
        ...          "b": {"w": torch.tensor([3.0, 4.0]), "b": torch.full((1,), 2.0)}}
        >>> stack_task_vectors(base, tuned)["w"]
        tensor([[1., 2.],
                [3., 4.]])
    """
    if not finetuned:
        raise TaskVectorError("no fine-tuned state dicts were given; merging needs at least one task.")
    if buffer_policy not in BUFFER_POLICIES:
        raise TaskVectorError(f"buffer_policy must be one of {BUFFER_POLICIES}, got {buffer_policy!r}.")
    if not dtype.is_floating_point:
        raise TaskVectorError(f"task vectors need a floating-point storage dtype, got {dtype}.")
    unknown = set(buffers) - pretrained.keys()
    if unknown:
        raise TaskVectorError(f"buffers names keys the pretrained state dict lacks: {_preview(unknown)}.")
    for key, base in pretrained.items():
        _check_finite(base, f"pretrained key {key!r}")
    merged_keys = [
        key
        for key, base in pretrained.items()
        if base.is_floating_point() and (key not in buffers or buffer_policy == "merge")
    ]
    stacked = empty_stacked({key: pretrained[key] for key in merged_keys}, len(finetuned), dtype)
    # Tasks in the outer loop, each state dict read once: a lazily loading ``finetuned`` then holds
    # one fine-tuned model in memory at a time, never all T of them beside their task vectors.
    for row, task in enumerate(finetuned):  # not .items(): enumerate's reused tuple would keep the last state alive
        state = finetuned[task]
        check_compatible(pretrained, state, task)
        if buffer_policy == "require_equal":
            _check_buffers_equal(pretrained, state, task, buffers)
        _fill_row(stacked, row, pretrained, state, task)
        del state
    return stacked


def _fill_row(
    stacked: dict[str, Tensor], row: int, pretrained: Mapping[str, Tensor], state: Mapping[str, Tensor], task: str
) -> None:
    for key, rows in stacked.items():
        base = pretrained[key]
        _check_finite(state[key], f"task {task!r}, key {key!r}")
        vector = state[key].to(base.device, torch.float32) - base.float()
        rows[row].copy_(vector)
        if torch.finfo(rows.dtype).max < torch.finfo(torch.float32).max:  # float16, bfloat16: may overflow
            _check_cast(vector, rows[row], task, key)


def _check_cast(vector: Tensor, stored: Tensor, task: str, key: str) -> None:
    """A :class:`TaskVectorError` if storing ``vector`` in ``stored``'s dtype turned finite entries into infinities."""
    overflowed = vector.isfinite() & ~stored.isfinite()
    if not bool(overflowed.any()):
        return
    largest = float(vector[overflowed].abs().max())
    dtype = str(stored.dtype).removeprefix("torch.")
    raise TaskVectorError(
        f"task {task!r}, key {key!r}: the task vector holds entries up to {largest:.6g} in magnitude, beyond "
        f"{dtype}'s largest finite value {torch.finfo(stored.dtype).max:.6g}, so {int(overflowed.sum())} of them "
        f"would be stored as infinities. Store the task vectors as bfloat16 (float32's range in half the memory) "
        "or float32 (task_vector_dtype / dtype)."
    )


def empty_stacked(like: Mapping[str, Tensor], num_tasks: int, dtype: torch.dtype | None = None) -> StackedTaskVectors:
    """Uninitialised ``{key: Tensor[num_tasks, *like[key].shape]}`` on ``like[key]``'s device, in
    ``dtype`` (default ``like[key]``'s).

    Same-shape tensors are the rows of one ``[G, T, *shape]`` block (:class:`StackedTaskVectors`),
    the layout in which :class:`~lit_adamerging.merging.MergedEncoder` stores task vectors: it
    takes such a block as it is, without a copy.
    """
    members: dict[tuple[tuple[int, ...], torch.dtype, torch.device], list[str]] = {}
    for key, tensor in like.items():
        members.setdefault((tuple(tensor.shape), dtype or tensor.dtype, tensor.device), []).append(key)
    blocks = (
        (names, torch.empty((len(names), num_tasks, *shape), dtype=block_dtype, device=device))
        for (shape, block_dtype, device), names in members.items()
    )
    return StackedTaskVectors(blocks, like)


class StackedTaskVectors(dict[str, Tensor]):
    """``{name: Tensor[T, *shape]}`` whose entries are rows of ``[G, T, *shape]`` blocks, which it keeps.

    Args:
        blocks: ``(names, block)`` pairs; ``block[j]`` becomes the entry ``names[j]``.
        order: the order of the entries (default: the blocks' order).

    :func:`group_task_vectors` hands a block to the merge as it is, not a copy, while the entries
    of its names are still its rows (an entry replaced later makes its group a copy). Pickled
    (``torch.save``) or copied, it is an ``OrderedDict`` of its entries, which
    ``torch.load(weights_only=True)`` reads.

    Example:
        >>> block = torch.arange(8.0).reshape(2, 2, 2)
        >>> stacked = StackedTaskVectors([(["a", "b"], block)], order=["b", "a"])
        >>> list(stacked), stacked["b"]
        (['b', 'a'], tensor([[4., 5.],
                [6., 7.]]))
    """

    def __init__(self, blocks: Iterable[tuple[Sequence[str], Tensor]], order: Iterable[str] | None = None) -> None:
        self.blocks: list[tuple[tuple[str, ...], Tensor]] = [(tuple(names), block) for names, block in blocks]
        rows: dict[str, Tensor] = {}
        for names, block in self.blocks:
            if block.dim() < 2 or block.shape[0] != len(names):
                raise ValueError(
                    f"a block of shape {tuple(block.shape)} does not hold {len(names)} tensors {list(names)[:3]} "
                    "as [G, T, *shape]."
                )
            for name, row in zip(names, block.unbind(0)):
                if name in rows:
                    raise ValueError(f"the tensor {name!r} is in two blocks.")
                rows[name] = row
        keys = list(rows if order is None else order)
        if len(keys) != len(rows) or set(keys) != set(rows):
            raise ValueError(
                f"order must name each tensor of the blocks once; it names {_preview(keys)}, the blocks hold "
                f"{_preview(rows)}."
            )
        super().__init__((name, rows[name]) for name in keys)

    def __reduce__(self) -> tuple[type[OrderedDict[str, Tensor]], tuple[list[tuple[str, Tensor]]]]:
        return OrderedDict, (list(self.items()),)

    def block(self, names: Sequence[str]) -> Tensor | None:
        """The kept block whose rows are the entries ``names``, in that order, or ``None``."""
        for members, block in self.blocks:
            if members == tuple(names) and block.is_contiguous() and all(
                _is_row(self.get(name), block, j) for j, name in enumerate(names)
            ):
                return block
        return None


def _is_row(tensor: Tensor | None, block: Tensor, row: int) -> bool:
    """Whether ``tensor`` is ``block[row]``: the same memory, laid out the same way."""
    return (
        tensor is not None
        and tensor.device == block.device
        and tensor.dtype == block.dtype
        and tensor.shape == block.shape[1:]
        and tensor.stride() == block.stride()[1:]
        and tensor.untyped_storage().data_ptr() == block.untyped_storage().data_ptr()
        and tensor.storage_offset() == block.storage_offset() + row * block.stride(0)
    )


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


def group_task_vectors(
    task_vectors: Mapping[str, Tensor], names: Sequence[Sequence[str]] | None = None
) -> tuple[list[list[str]], list[Tensor]]:
    """The groups ``names`` (default :func:`group_names`) and one ``[G, T, *shape]`` tensor per group.

    A group that is a block :class:`StackedTaskVectors` keeps (as :func:`stack_task_vectors` lays
    them out) is that block, shared rather than copied; any other group is a ``torch.stack``.
    Either way the result is detached (the merge takes no gradient through task vectors).
    """
    names = group_names(task_vectors) if names is None else [list(group) for group in names]
    return names, [_grouped(task_vectors, group) for group in names]


def _grouped(task_vectors: Mapping[str, Tensor], names: Sequence[str]) -> Tensor:
    block = task_vectors.block(names) if isinstance(task_vectors, StackedTaskVectors) else None
    if block is None:
        return torch.stack([task_vectors[name].detach() for name in names])
    return block.detach()


def _check_buffers_equal(
    pretrained: Mapping[str, Tensor], state: Mapping[str, Tensor], task: str, buffers: Collection[str]
) -> None:
    for key in buffers:
        if pretrained[key].is_floating_point() and not torch.equal(state[key], pretrained[key]):
            raise TaskVectorError(
                f"task {task!r}, buffer {key!r} differs from the pretrained one, but buffer_policy is "
                "'require_equal'. Use 'pretrained' to keep the pretrained buffers or 'merge' to merge them."
            )
