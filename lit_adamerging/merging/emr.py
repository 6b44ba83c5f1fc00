"""EMR-Merging (Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging", NeurIPS 2024).

Not one merged model: a unified task vector shared by every task, plus a binary mask and a scalar
rescaler per task, so inference needs to know the task. With ``tau_k`` the task vectors of the
``T`` merged tasks, entry by entry:

1. **Elect**: the sign ``gamma = sgn(sum_k tau_k)`` and, among the tasks whose entry has that sign,
   the largest magnitude ``eps = max_k |tau_k| [tau_k * gamma > 0]`` (0 when none does);
   ``tau_uni = gamma * eps``.
2. **Mask**: ``M_k = (tau_k * tau_uni > 0)``, where task ``k`` agrees with the unified vector.
3. **Rescale**: ``lambda_k = sum |tau_k| / sum |M_k * tau_uni|``, one scalar per task, the sums over
   every entry of every merged tensor (the paper's equation: one rescaler for the whole model, not
   one per layer).

Task ``k`` runs ``theta_0 + lambda_k * M_k * tau_uni``.

Choices, with their source:

* ``sgn(0) = 0`` (the paper's ``sgn``): an entry whose summed task vectors are exactly 0 gets
  ``tau_uni = 0`` and no task keeps it. The authors' released code (``emr_merge`` in
  ``harveyhuang18/EMR_Merging``, also FusionBench's) counts a zero sum as negative instead; the two
  differ only where the sum is exactly 0 while some entry is not.
* ``rescaler_sum="entries"`` (default) is the paper's sums over all entries. The released code
  adds each tensor's *mean* ``|.|`` instead (every tensor weighted alike, whatever its size):
  ``rescaler_sum="tensor_means"`` reproduces it.
* A task with no entry in its mask (``sum |M_k * tau_uni| = 0``, so its modulated vector is 0
  whatever ``lambda_k``) gets ``lambda_k = 1`` rather than a division by zero.
* The tensors taking part are those :func:`~lit_adamerging.merging.stack_task_vectors` stacks: the
  floating-point parameters, and floating-point buffers only with ``buffer_policy="merge"``
  (otherwise they stay pretrained in every task's weights, as in the other merges). Integer tensors
  never take part.

The masks are kept as packed bits (:func:`pack_masks`: 8 entries per byte, the first entry in the
highest bit, as ``numpy.packbits``), which is also how :func:`save_emr` writes them; storage is
reported by :func:`emr_storage`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from lit_adamerging.merging._export_file import json_field, read_export
from lit_adamerging.merging.task_vectors import BufferPolicy, stack_task_vectors

RescalerSum = Literal["entries", "tensor_means"]
"""How the rescaler's two sums run over the merged tensors.

- ``"entries"`` (default): over every entry of every tensor, the paper's equation.
- ``"tensor_means"``: the sum over tensors of each tensor's mean, as the authors' released code does.
"""

RESCALER_SUMS: tuple[str, ...] = ("entries", "tensor_means")
"""The values :data:`RescalerSum` takes."""

EMR_FORMAT = "lit_adamerging.emr_merging"
EMR_FORMAT_VERSION = "1"
_UNIFIED = "unified."
_MASK = "mask."
_RESCALERS = "rescalers"
_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)


class EMRFileError(ValueError):
    """A file is not a readable EMR-Merging export."""


# ----------------------------------------------------------------------------- bits
def pack_masks(masks: Tensor) -> Tensor:
    """Boolean ``[T, *shape]`` masks as uint8 ``[T, ceil(numel / 8)]``: each row's entries flattened, 8 per
    byte, the first in the highest bit, the last byte padded with zeros (``numpy.packbits(row)``).

    Example:
        >>> pack_masks(torch.tensor([[True, False, True, True, False, False, False, False, True]]))
        tensor([[176, 128]], dtype=torch.uint8)
    """
    if masks.dtype != torch.bool or masks.dim() < 1:
        raise ValueError(f"pack_masks takes boolean [T, *shape] masks, got {masks.dtype} {list(masks.shape)}.")
    rows = masks.reshape(masks.shape[0], -1)
    padding = -rows.shape[1] % 8
    if padding:
        rows = torch.cat([rows, rows.new_zeros(rows.shape[0], padding)], dim=1)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=masks.device)
    return (rows.reshape(rows.shape[0], -1, 8).to(torch.uint8) * weights).sum(dim=-1, dtype=torch.uint8)


def unpack_mask(packed: Tensor, shape: Sequence[int]) -> Tensor:
    """One row of :func:`pack_masks` (uint8 ``[ceil(numel / 8)]``) back as a boolean tensor of ``shape``."""
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.shape != (_packed_width(numel),):
        raise ValueError(
            f"a packed mask of {numel} entries is uint8 [{_packed_width(numel)}], got {packed.dtype} "
            f"{list(packed.shape)}."
        )
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(-1)[:numel].to(torch.bool).reshape(tuple(shape))


def _packed_width(numel: int) -> int:
    return -(-numel // 8)


# ----------------------------------------------------------------------------- the merge
@dataclass
class EMRMerge:
    """The result of EMR-Merging: what every task's weights are rebuilt from.

    Attributes:
        unified: ``{name: tau_uni}``, in the task vectors' dtype (each entry is one of theirs).
        packed_masks: ``{name: uint8 [T, ceil(numel / 8)]}``, row ``k`` task ``k``'s mask (:func:`pack_masks`).
        rescalers: float32 ``[T]``, ``lambda_k``.
        tasks: the task names, in row order.
        rescaler_sum: how the rescalers were summed (see :data:`RescalerSum`).
    """

    unified: dict[str, Tensor]
    packed_masks: dict[str, Tensor]
    rescalers: Tensor
    tasks: tuple[str, ...]
    rescaler_sum: str = "entries"
    _index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"the task names {list(self.tasks)} repeat a name.")
        if self.rescalers.shape != (len(self.tasks),):
            raise ValueError(f"{len(self.tasks)} tasks need rescalers of shape [{len(self.tasks)}], got "
                             f"{list(self.rescalers.shape)}.")
        if self.unified.keys() != self.packed_masks.keys():
            raise ValueError("the unified vector and the masks name different tensors.")
        for name, tensor in self.unified.items():
            expected = (len(self.tasks), _packed_width(tensor.numel()))
            if self.packed_masks[name].dtype != torch.uint8 or self.packed_masks[name].shape != expected:
                raise ValueError(f"the packed masks of {name!r} must be uint8 {list(expected)}, got "
                                 f"{self.packed_masks[name].dtype} {list(self.packed_masks[name].shape)}.")
        self._index = {task: row for row, task in enumerate(self.tasks)}

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def task_index(self, task: str | int) -> int:
        """The row of ``task`` (a name, or a row number)."""
        if isinstance(task, int) and not isinstance(task, bool):
            if not 0 <= task < self.num_tasks:
                raise IndexError(f"task number {task} is outside the {self.num_tasks} merged tasks.")
            return task
        if task not in self._index:
            raise KeyError(
                f"task {task!r} is not one of the EMR-merged tasks {list(self.tasks)}: EMR-Merging has a mask and a "
                "rescaler for the merged tasks only, so it has no weights for another task."
            )
        return self._index[task]

    def mask(self, task: str | int) -> dict[str, Tensor]:
        """Task ``task``'s boolean masks, by name."""
        row = self.task_index(task)
        return {name: unpack_mask(self.packed_masks[name][row], value.shape) for name, value in self.unified.items()}

    def task_vector(self, task: str | int) -> dict[str, Tensor]:
        """``lambda_k * M_k * tau_uni`` in float32, by name: task ``task``'s modulated task vector."""
        row = self.task_index(task)
        return {
            name: self.rescalers[row].to(value.device) * _masked(value, self.packed_masks[name][row])
            for name, value in self.unified.items()
        }

    def task_tensors(self, pretrained: Mapping[str, Tensor], task: str | int) -> dict[str, Tensor]:
        """``theta_0 + lambda_k * M_k * tau_uni`` for every tensor of the merge, by name, in the pretrained
        tensors' dtype and on their device (computed in float32)."""
        row = self.task_index(task)
        _check_pretrained(pretrained, self.unified)
        tensors = {}
        for name, value in self.unified.items():
            base = pretrained[name]
            delta = _masked(value.to(base.device), self.packed_masks[name][row].to(base.device))
            tensors[name] = (base.float() + self.rescalers[row].to(base.device) * delta).to(base.dtype)
        return tensors

    def task_state_dict(self, pretrained: Mapping[str, Tensor], task: str | int) -> dict[str, Tensor]:
        """Task ``task``'s whole encoder state dict: :meth:`task_tensors` for the merged tensors, the pretrained
        ones (copied) for the rest, in the order of ``pretrained``."""
        tensors = self.task_tensors(pretrained, task)
        return {key: tensors[key] if key in tensors else value.detach().clone() for key, value in pretrained.items()}

    def storage(self) -> EMRStorage:
        """What this merge takes to store, against ``T`` full copies of the merged tensors."""
        unified = sum(value.numel() * value.element_size() for value in self.unified.values())
        masks = sum(packed.numel() for packed in self.packed_masks.values())
        rescalers = self.rescalers.numel() * self.rescalers.element_size()
        return EMRStorage(unified, masks, rescalers, unified + masks + rescalers, self.num_tasks * unified)


def _masked(unified: Tensor, packed_row: Tensor) -> Tensor:
    """``M_k * tau_uni`` in float32 (0 where the mask is off)."""
    return torch.where(unpack_mask(packed_row, unified.shape), unified.float(), 0.0)


def _check_pretrained(pretrained: Mapping[str, Tensor], unified: Mapping[str, Tensor]) -> None:
    for name, value in unified.items():
        if name not in pretrained:
            raise KeyError(f"the pretrained state dict lacks {name!r}, a tensor of the EMR merge; give the encoder the "
                           "merge was made from.")
        if pretrained[name].shape != value.shape:
            raise ValueError(
                f"the pretrained tensor {name!r} has shape {tuple(pretrained[name].shape)} but the EMR merge's has "
                f"{tuple(value.shape)}; give the encoder the merge was made from."
            )


@torch.no_grad()
def emr_elect(
    task_vectors: Mapping[str, Tensor],
    tasks: Sequence[str] | None = None,
    rescaler_sum: RescalerSum = "entries",
) -> EMRMerge:
    """EMR-Merging of stacked task vectors ``{name: Tensor[T, *shape]}`` (as :func:`stack_task_vectors` gives).

    Args:
        task_vectors: the task vectors of every tensor taking part, task ``k`` in row ``k``.
        tasks: the tasks' names (default ``"0"``, ``"1"``, ...).
        rescaler_sum: how the rescalers sum over the tensors (see :data:`RescalerSum`).

    Example:
        >>> merged = emr_elect({"w": torch.tensor([[1.0, -2.0, 0.5], [3.0, 1.0, -0.5]])}, ["a", "b"])
        >>> merged.unified["w"], merged.mask("a")["w"], merged.rescalers
        (tensor([ 3., -2.,  0.]), tensor([ True,  True, False]), tensor([0.7000, 1.5000]))
    """
    if rescaler_sum not in RESCALER_SUMS:
        raise ValueError(f"rescaler_sum must be one of {RESCALER_SUMS}, got {rescaler_sum!r}.")
    if not task_vectors:
        raise ValueError("no task vectors: EMR-Merging needs at least one floating-point tensor.")
    num_tasks = {stacked.shape[0] if stacked.dim() else 0 for stacked in task_vectors.values()}
    if len(num_tasks) != 1 or 0 in num_tasks:
        raise ValueError(
            "every stacked task vector must be [T, *shape] with the same T >= 1 tasks, got shapes "
            f"{ {name: list(value.shape) for name, value in list(task_vectors.items())[:5]} }."
        )
    (count,) = num_tasks
    names = tuple(str(row) for row in range(count)) if tasks is None else tuple(tasks)
    if len(names) != count:
        raise ValueError(f"{len(names)} task names {list(names)} for task vectors of {count} tasks.")
    unified, packed = {}, {}
    kept = torch.zeros(count, dtype=torch.float64)  # sum |tau_k|, per task
    covered = torch.zeros(count, dtype=torch.float64)  # sum |M_k * tau_uni|, per task
    for name, stacked in task_vectors.items():
        if not stacked.is_floating_point():
            raise ValueError(f"the task vectors of {name!r} are {stacked.dtype}; EMR-Merging merges floating-point "
                             "tensors only (integer buffers stay pretrained).")
        values = stacked.detach().float()  # the task vectors' own tensor when they are float32
        sign = torch.sign(values.sum(dim=0))
        signed = values * sign  # |tau_k| where tau_k has the elected sign, <= 0 elsewhere (and where the sign is 0)
        agrees = signed > 0
        magnitude = signed.clamp_(min=0).amax(dim=0)
        del signed
        unified[name] = (sign * magnitude).to(stacked.dtype)  # exact: each entry is one of the task vectors'
        # M_k = (tau_k * tau_uni > 0) is ``agrees``: where tau_k agrees, |tau_uni| >= |tau_k| > 0 with the same
        # sign; elsewhere tau_k * sign <= 0. Comparing signs, not products, keeps it exact for tiny entries.
        packed[name] = pack_masks(agrees)
        own = values.reshape(count, -1).abs().sum(dim=1, dtype=torch.float64)
        share = torch.where(agrees, magnitude, 0).reshape(count, -1).sum(dim=1, dtype=torch.float64)
        if rescaler_sum == "tensor_means":
            own, share = own / magnitude.numel(), share / magnitude.numel()
        kept += own.cpu()
        covered += share.cpu()
    rescalers = torch.where(covered > 0, kept / covered.clamp(min=torch.finfo(torch.float64).tiny), 1.0)
    return EMRMerge(unified, packed, rescalers.float(), names, rescaler_sum)


def emr_merging(
    pretrained: Mapping[str, Tensor],
    finetuned: Mapping[str, Mapping[str, Tensor]],
    *,
    rescaler_sum: RescalerSum = "entries",
    buffers: Collection[str] = (),
    buffer_policy: BufferPolicy = "pretrained",
    dtype: torch.dtype = torch.float32,
) -> EMRMerge:
    """EMR-Merging of plain state dicts: the task vectors ``theta_k - theta_0`` (:func:`stack_task_vectors`, which
    checks every fine-tuned state dict against the pretrained one), then :func:`emr_elect`.

    Rebuild task ``k``'s encoder with ``emr_merging(...).task_state_dict(pretrained, k)``.
    """
    stacked = stack_task_vectors(pretrained, finetuned, buffers=buffers, buffer_policy=buffer_policy, dtype=dtype)
    return emr_elect(stacked, list(finetuned), rescaler_sum)


# ----------------------------------------------------------------------------- storage
class EMRStorage(NamedTuple):
    """Bytes an EMR merge takes: the unified vector, the ``T`` bit masks and ``T`` rescalers, against ``T`` full
    copies of the merged tensors (``task_models``; the pretrained weights, needed by both, are not counted)."""

    unified: int
    masks: int
    rescalers: int
    total: int
    task_models: int

    @property
    def ratio(self) -> float:
        """``total / task_models``."""
        return self.total / self.task_models if self.task_models else float("nan")


def emr_storage(shapes: Mapping[str, Sequence[int]], num_tasks: int, element_bytes: int = 4) -> EMRStorage:
    """The bytes of an EMR merge of ``num_tasks`` tasks over tensors of ``shapes``, ``element_bytes`` per entry
    (4: float32), without computing it.

    Example:
        >>> emr_storage({"w": (10, 10)}, num_tasks=8)
        EMRStorage(unified=400, masks=104, rescalers=32, total=536, task_models=3200)
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be at least 1, got {num_tasks}.")
    numels = [math.prod(shape) for shape in shapes.values()]
    unified = sum(numels) * element_bytes
    masks = num_tasks * sum(_packed_width(numel) for numel in numels)
    rescalers = 4 * num_tasks
    return EMRStorage(unified, masks, rescalers, unified + masks + rescalers, num_tasks * unified)


# ----------------------------------------------------------------------------- file
def save_emr(merge: EMRMerge, path: str | Path) -> Path:
    """Write ``merge`` to ``path`` (``.safetensors``), atomically; NaN or infinite values are refused.

    The file holds ``unified.<name>`` (the unified vector), ``mask.<name>`` (uint8 ``[T, ceil(numel / 8)]``,
    :func:`pack_masks`), ``rescalers`` (float32 ``[T]``) and, as metadata, ``format``
    (``lit_adamerging.emr_merging``), ``version``, ``tasks`` (a JSON list), ``tensors`` (JSON ``{name:
    shape}``, in order), ``rescaler_sum`` and ``mask_bits`` (the packing). :func:`load_emr` reads it back.
    """
    from safetensors.torch import save_file

    from lit_adamerging.io import write_atomic

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: an EMR-Merging export is a .safetensors file; give a path ending in .safetensors.")
    bad = [name for name, value in merge.unified.items() if not bool(value.isfinite().all())]
    if bad or not bool(merge.rescalers.isfinite().all()):
        raise FloatingPointError(
            f"the EMR merge holds NaN or infinite values ({(bad or ['rescalers'])[:5]}); nothing was written to {path}."
        )
    tensors: dict[str, Tensor] = {}
    for name, value in merge.unified.items():
        tensors[_UNIFIED + name] = value.detach().cpu().contiguous()
        tensors[_MASK + name] = merge.packed_masks[name].cpu().contiguous()
    tensors[_RESCALERS] = merge.rescalers.detach().cpu().float().contiguous()
    metadata = {
        "format": EMR_FORMAT,
        "version": EMR_FORMAT_VERSION,
        "tasks": json.dumps(list(merge.tasks)),
        "tensors": json.dumps({name: list(value.shape) for name, value in merge.unified.items()}),
        "rescaler_sum": merge.rescaler_sum,
        "mask_bits": "row k = task k; entries flattened in C order, 8 per byte, first entry in the highest bit",
    }
    return write_atomic(path, lambda temporary: save_file(tensors, temporary, metadata=metadata))


def load_emr(path: str | Path) -> EMRMerge:
    """Read a :func:`save_emr` file (what :class:`~lit_adamerging.ExportMergedEncoder` writes for EMR-Merging).

    Everything is checked (format, tasks, every tensor's presence, dtype, shape and finite values, the
    masks' padding bits); a file that fails is an :class:`EMRFileError` naming it and what is wrong.
    Rebuild task ``k``'s encoder with ``load_emr(path).task_state_dict(pretrained_state_dict, k)``.
    """
    path = Path(path)
    metadata, tensors = read_export(
        path, "an EMR-Merging export", EMR_FORMAT, EMR_FORMAT_VERSION, EMRFileError,
        "ExportMergedEncoder writes one for the emr_merging method (lit_adamerging.merging.save_emr from Python)",
    )
    return _merge_from_file(tensors, metadata, path)


def _json_field(metadata: Mapping[str, str], key: str, path: Path) -> object:
    return json_field(metadata, key, path, EMRFileError)


def _merge_from_file(tensors: dict[str, Tensor], metadata: Mapping[str, str], path: Path) -> EMRMerge:
    tasks = _json_field(metadata, "tasks", path)
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks) or len(set(tasks)) != len(
        tasks
    ):
        raise EMRFileError(f"{path}: the metadata's 'tasks' must be a non-empty list of distinct names, got {tasks!r}.")
    shapes = _json_field(metadata, "tensors", path)
    if not isinstance(shapes, dict) or not shapes or not all(
        isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape) for shape in shapes.values()
    ):
        raise EMRFileError(f"{path}: the metadata's 'tensors' must map each tensor's name to its shape.")
    rescaler_sum = metadata.get("rescaler_sum", "")
    if rescaler_sum not in RESCALER_SUMS:
        raise EMRFileError(f"{path}: the metadata's 'rescaler_sum' is {rescaler_sum!r}, not one of {RESCALER_SUMS}.")
    expected = {_RESCALERS, *(_UNIFIED + name for name in shapes), *(_MASK + name for name in shapes)}
    if tensors.keys() != expected:
        missing, extra = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
        raise EMRFileError(f"{path}: the tensors do not match the metadata (missing {missing[:5]}, unexpected "
                           f"{extra[:5]}); the file is garbled.")
    count = len(tasks)
    rescalers = tensors[_RESCALERS]
    if rescalers.dtype != torch.float32 or rescalers.shape != (count,) or not bool(
        (rescalers.isfinite() & (rescalers > 0)).all()
    ):
        raise EMRFileError(f"{path}: 'rescalers' must be {count} positive finite float32 values, got "
                           f"{rescalers.dtype} {list(rescalers.shape)}.")
    unified, packed = {}, {}
    for name, shape in shapes.items():
        value, mask = tensors[_UNIFIED + name], tensors[_MASK + name]
        if list(value.shape) != shape or not value.is_floating_point() or not bool(value.isfinite().all()):
            raise EMRFileError(f"{path}: {_UNIFIED + name!r} must be finite floating-point values of shape {shape}, "
                               f"got {value.dtype} {list(value.shape)}.")
        width = _packed_width(value.numel())
        if mask.dtype != torch.uint8 or list(mask.shape) != [count, width]:
            raise EMRFileError(f"{path}: {_MASK + name!r} must be uint8 [{count}, {width}] (packed bits), got "
                               f"{mask.dtype} {list(mask.shape)}.")
        spare = 8 * width - value.numel()
        if spare and bool((mask[:, -1] & ((1 << spare) - 1)).any()):
            raise EMRFileError(f"{path}: {_MASK + name!r} has bits set past its {value.numel()} entries; the file is "
                               "garbled.")
        unified[name], packed[name] = value, mask
    return EMRMerge(unified, packed, rescalers, tuple(tasks), rescaler_sum)
