"""The merge with its weights split across processes: each holds 1/N of every task vector (FSDP2's layout).

The merged tensor ``theta_0 + sum_k lambda_k tau_k`` is elementwise in the weights, so a process can
build its share of every merged tensor from its shares of ``theta_0`` and of the task vectors. The
split is the one PyTorch's FSDP2 (:func:`torch.distributed.fsdp.fully_shard`) gives each parameter:
dim 0 cut as :func:`torch.chunk` cuts it into as many pieces as processes (:func:`shard_rows`); a
tensor with fewer rows than processes leaves the last processes none of it.

:class:`ShardedMergedEncoder` is :class:`~lit_adamerging.merging.MergedEncoder`'s twin on that layout.
The encoder's parameters become FSDP2 parameters (each process stores its rows); before a forward the
merge is written into those rows; FSDP2 gathers each block's full weights just in time and
reduce-scatters (averages) their gradients; :meth:`ShardedMergedEncoder.reduce_coefficient_gradients`
then turns them into the coefficients' gradient: ``<grad_p, tau_{k,p}>`` is each process's dot product
over its rows, summed across processes. The engine moves the weights; this module only merges and
reduces the coefficients' gradient.

Held whole by every process (small): 0-dim parameters (``fully_shard`` cannot split them) and merged
floating-point buffers (``buffer_policy="merge"``: FSDP2 does not shard buffers).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lit_adamerging.merging._kernels import group_grad
from lit_adamerging.merging.merge import Granularity, GroupedTaskVectors, MergingCoefficients

T = TypeVar("T")


def summed_across(tensor: Tensor, group: dist.ProcessGroup) -> Tensor:
    """``tensor`` summed over the processes of ``group``, sent from the device its backend talks through (NCCL:
    this process's GPU, for tensors built on the CPU before the model is moved)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else tensor.device
    moved = tensor.to(device)
    dist.all_reduce(moved, group=group)
    return moved.to(tensor.device)


def agreed(group: dist.ProcessGroup, build: Callable[[], T]) -> T:
    """``build()`` on every process of ``group``, raising on every process if it raised on any.

    A process that fails alone (its rows of a fine-tuned file hold NaN, or do not fit) would otherwise leave
    the others waiting in the next collective; call it where no collective runs inside ``build``.
    """
    error: Exception | None = None
    try:
        result = build()
    except Exception as caught:  # re-raised below, after every process knows
        error = caught
    failed = torch.zeros(dist.get_world_size(group), dtype=torch.int64)
    failed[dist.get_rank(group)] = error is not None
    failed = summed_across(failed, group)
    if error is not None:
        raise error
    if bool(failed.any()):
        ranks = failed.nonzero().flatten().tolist()
        raise ValueError(
            f"process(es) {ranks} of the sharded run failed while loading their rows of the weights; their own "
            "error (printed by them) says why. Nothing was merged."
        )
    return result


def shard_rows(rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(start, stop)``: the rows of a tensor with ``rows`` rows that process ``rank`` of ``world_size`` holds.

    FSDP2's split (:func:`torch.chunk` along dim 0): pieces of ``ceil(rows / world_size)`` rows, the last
    ones shorter or empty.

    Example:
        >>> [shard_rows(5, 4, rank) for rank in range(4)]
        [(0, 2), (2, 4), (4, 5), (5, 5)]
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not one of the {world_size} processes' ranks (0 to {world_size - 1}).")
    piece = -(-rows // world_size)
    start = min(rank * piece, rows)
    return start, min(start + piece, rows)


def sharded_rows(encoder: nn.Module, names: Collection[str], world_size: int, rank: int) -> dict[str, tuple[int, int]]:
    """``{name: (start, stop)}`` of the parameters among ``names`` that :class:`ShardedMergedEncoder` splits on
    ``world_size`` processes (the others, 0-dim parameters and buffers, every process holds whole)."""
    return {
        name: shard_rows(parameter.shape[0], world_size, rank)
        for name, parameter in encoder.named_parameters()
        if name in names and parameter.dim() > 0
    }


def take_rows(state: Mapping[str, Tensor], rows: Mapping[str, tuple[int, int]]) -> dict[str, Tensor]:
    """``state`` with each tensor named in ``rows`` cut to those rows (the rest whole)."""
    return {name: value[slice(*rows[name])] if name in rows else value for name, value in state.items()}


def repeated_blocks(encoder: nn.Module) -> list[nn.Module]:
    """The encoder's repeated blocks, innermost first: the members of every ``nn.ModuleList`` / ``nn.Sequential``
    whose two or more members are all of one class and hold parameters (transformer blocks, CNN stages and
    their blocks). FSDP2 gathers each one's weights on its own, so one block at a time is ever whole."""
    blocks: list[nn.Module] = []
    for module in encoder.modules():
        members = list(module.children()) if isinstance(module, (nn.ModuleList, nn.Sequential)) else []
        if len(members) >= 2 and len({type(member) for member in members}) == 1:
            blocks.extend(member for member in members if any(True for _ in member.parameters()))
    depth = {id(module): name.count(".") for name, module in encoder.named_modules()}
    return sorted(blocks, key=lambda module: -depth[id(module)])


class ShardedMergedEncoder(GroupedTaskVectors):
    """A frozen pretrained encoder split across processes, run with the merge of the task vectors' local rows.

    Args:
        encoder: the pretrained encoder, whole (every process builds it from the zoo); it is sharded here
            with ``fully_shard`` over ``mesh``, each of its repeated blocks and then the whole.
        task_vectors: ``{name: Tensor[T, *local shape]}`` in coefficient-column order: for the parameters
            of :func:`sharded_rows`, this process's rows (stacked from the pretrained and fine-tuned state
            dicts cut by :func:`take_rows`); for 0-dim parameters and merged buffers, the whole tensor.
        mesh: a one-dimensional device mesh over the processes that share the weights.
        granularity, init, clamp: as :class:`~lit_adamerging.merging.MergingCoefficients`.

    :meth:`stacked_task_vectors`, :meth:`pretrained_tensors` and :meth:`merged_tensors` are this process's rows
    (on :class:`~lit_adamerging.merging.MergedEncoder`, the whole tensors). The coefficients are replicated
    (every process holds and updates the same ones). A training forward
    writes the merge of the current coefficients into the encoder's rows; after the backward,
    :meth:`reduce_coefficient_gradients` sets the coefficients' gradient. An evaluation forward is given
    the merged rows (:meth:`merged_tensors`, computed once) and writes them only when they change.
    Every process must run the same number of forwards: each forward gathers weights from all of them.
    """

    def __init__(
        self,
        encoder: nn.Module,
        task_vectors: Mapping[str, Tensor],
        mesh: Any,
        granularity: Granularity = "layer",
        init: float = 0.3,
        clamp: bool = True,
    ) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        super().__init__()
        if not task_vectors:
            raise ValueError("no task vectors: the encoder has no floating-point tensors to merge.")
        if mesh.ndim != 1:
            raise ValueError(f"the device mesh must have one dimension (the processes sharing weights), got {mesh}.")
        self.mesh = mesh
        self.world_size, self.rank = mesh.size(), mesh.get_local_rank()
        state = encoder.state_dict(keep_vars=True)
        parameters = dict(encoder.named_parameters())
        self.rows = sharded_rows(encoder, task_vectors, self.world_size, self.rank)
        self.full_shapes = {name: tuple(state[name].shape) for name in task_vectors}
        for name, stacked in task_vectors.items():
            if name not in state:
                raise ValueError(f"the task vectors name {name!r}, which the encoder lacks.")
            local = state[name][slice(*self.rows[name])] if name in self.rows else state[name]
            if stacked.shape[1:] != local.shape:
                held = f"rows {self.rows[name]} of" if name in self.rows else "all of"
                raise ValueError(
                    f"task vectors of {name!r} have shape {tuple(stacked.shape)}, expected "
                    f"[T, {', '.join(map(str, local.shape))}] ({held} the encoder's {tuple(state[name].shape)} on "
                    f"process {self.rank} of {self.world_size})."
                )
        self._parameter_names = frozenset(name for name in task_vectors if name in parameters)
        # Parameters without task vectors stay frozen; merged ones take a gradient (the coefficients' source).
        for name, parameter in parameters.items():
            parameter.requires_grad_(name in task_vectors)
        # This process's rows of theta_0, kept apart: the parameters' rows are overwritten with the merge.
        self._store_groups(task_vectors, {
            name: state[name].detach()[slice(*self.rows[name])] if name in self.rows else state[name].detach()
            for name in task_vectors
        })
        replicated = {parameter for parameter in parameters.values() if parameter.dim() == 0}
        for block in repeated_blocks(encoder):
            fully_shard(block, mesh=mesh, ignored_params=replicated)
        fully_shard(encoder, mesh=mesh, ignored_params=replicated)
        self.encoder = encoder
        # The sharded parameters themselves: FSDP2 registers its gathered, unsharded ones on the modules between a
        # forward and the reshard that follows (for the root, until the next backward), so they are looked up here.
        self._sharded = {name: encoder.get_parameter(name) for name in self.rows}
        self._fsdp_modules = [module for module in encoder.modules() if isinstance(module, FSDPModule)]
        # The share of a whole tensor's coefficient gradient each process adds: sharded gradients are already
        # averaged over the processes by FSDP2, a whole tensor's is this process's own.
        share = torch.tensor([1.0 if name in self.rows else 1.0 / self.world_size for name in self.tensor_names])
        self.register_buffer("_gradient_share", share, persistent=False)
        self.coefficients = MergingCoefficients(self._stored_tasks, len(self.tensor_names), granularity, init, clamp)
        self._written: Mapping[str, Tensor] | None = None

    @property
    def group(self) -> dist.ProcessGroup:
        """The process group of the mesh (the processes sharing the weights)."""
        return self.mesh.get_group()

    def _local(self, name: str) -> Tensor:
        """This process's rows of the encoder's tensor ``name`` (for a whole tensor: all of it), as stored."""
        if name in self.rows:
            return self._sharded[name].to_local()
        if name in self._parameter_names:
            return self.encoder.get_parameter(name)
        return self.encoder.get_buffer(name)

    def pretrained_tensors(self) -> dict[str, Tensor]:
        """``{name: this process's rows of theta_0}`` for the merged tensors, in coefficient-column order."""
        flat = (row for block in self._blocks(self.pretrained) for row in block.unbind(0))
        rows = dict(zip(self._merged_order, flat))
        return {name: rows[name] for name in self.tensor_names}

    @torch.no_grad()
    def merged_tensors(self) -> dict[str, Tensor]:
        """This process's rows of the merged tensors for the current coefficients, by name (column order)."""
        merged = self._merge_stored(self.coefficients().detach())
        return {name: merged[name] for name in self.tensor_names}

    @torch.no_grad()
    def write(self, merged: Mapping[str, Tensor]) -> None:
        """Write ``merged`` (this process's rows by name, as :meth:`merged_tensors` gives them) into the encoder."""
        for module in self._fsdp_modules:  # drop gathered copies of the old weights: the next forward gathers anew
            module.reshard()
        for name in self.tensor_names:
            self._local(name).copy_(merged[name])
        self._written = merged

    def forward(self, images: Tensor, merged: Mapping[str, Tensor] | None = None) -> Tensor:
        """Encode ``images`` with the merge of the current coefficients, or with ``merged`` (rows merged earlier).

        A training forward's gradient reaches the encoder's parameters, not the coefficients: call
        :meth:`reduce_coefficient_gradients` after the backward.
        """
        if merged is None:
            self.write(self.merged_tensors())
            self._written = None  # the next evaluation writes its tensors again
        elif merged is not self._written:
            self.write(merged)
        return self.encoder(images)

    def reduce_coefficient_gradients(self) -> None:
        """Add the loss's gradient in the coefficients to their ``.grad``, from the encoder's gradients, and clear
        those: per merged tensor and task, this process's ``<grad, tau>`` over its rows, summed across processes."""
        first = self._blocks(self.task_vectors)[0]
        dots = torch.zeros(len(self.tensor_names), self.num_tasks, dtype=torch.float32, device=first.device)
        grads = {name: self._local_grad(name) for name in self.tensor_names}
        for names, group, index in zip(self.group_names, self._blocks(self.task_vectors), self._blocks(self.columns)):
            flat = group.reshape(*group.shape[:2], -1)
            dots.index_copy_(0, index, group_grad(flat, [grads[name] for name in names], torch.float32))
        dots *= self._gradient_share.unsqueeze(1)
        dist.all_reduce(dots, group=self.group)
        self.coefficients().backward(dots.t().to(self.coefficients.raw.dtype))
        for parameter in [*self._sharded.values(), *self.encoder.parameters()]:
            parameter.grad = None

    def _local_grad(self, name: str) -> Tensor | None:
        if name not in self._parameter_names:
            return None  # a buffer: merged without a gradient
        grad = (self._sharded[name] if name in self.rows else self.encoder.get_parameter(name)).grad
        if grad is None:
            return None
        return grad.to_local() if name in self.rows else grad

    def layout(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """``{name: (dtype, whole shape)}`` of the encoder's state dict (what :meth:`full_tensors` yields)."""
        return {name: (value.dtype, tuple(value.shape)) for name, value in self.encoder.state_dict().items()}

    def full_tensors(self) -> Iterator[tuple[str, Tensor]]:
        """``(name, whole tensor)`` for every entry of the encoder's state dict, in its order, as it now holds them;
        every process must iterate it to the end together (each sharded tensor is gathered from all)."""
        for name, value in self.encoder.state_dict().items():
            if name in self.rows:
                value = self._sharded[name].full_tensor()
            yield name, value.detach()

    @torch.no_grad()
    def apply_merge(
        self,
        merge: Callable[[Mapping[str, Tensor], list[str]], Mapping[str, Tensor]],
        matrices: Collection[str],
    ) -> dict[str, Tensor]:
        """This process's rows of ``merge(task_vectors, matrices)``: a merge that is elementwise except on the
        ``matrices``, each of which it needs whole (a spectral merge's decompositions).

        The elementwise tensors are merged from each process's rows. Each matrix's task vectors are gathered,
        one matrix at a time, on one process (matrix ``i`` on process ``i mod N``), merged there, and its rows
        sent back: no process holds more than one whole matrix's task vectors at a time.
        """
        local = self.stacked_task_vectors()
        whole = [name for name in self.tensor_names if name in set(matrices)]
        elementwise = {name: local[name] for name in self.tensor_names if name not in set(whole)}
        merged = dict(merge(elementwise, [])) if elementwise else {}
        for position, name in enumerate(whole):
            owner = position % self.world_size
            gathered = self._gather_rows(local[name], name, owner)
            result = merge({name: gathered}, [name])[name] if gathered is not None else None
            merged[name] = self._scatter_rows(result, name, owner, local[name])
        return {name: merged[name] for name in self.tensor_names}

    def _piece(self, name: str) -> int:
        return -(-self.full_shapes[name][0] // self.world_size)

    def _gather_rows(self, rows: Tensor, name: str, owner: int) -> Tensor | None:
        """The whole ``[T, *shape]`` of ``name`` on ``owner`` (``None`` elsewhere), from every process's rows."""
        if name not in self.rows:
            return rows if self.rank == owner else None
        piece = self._piece(name)
        padded = rows.new_zeros((rows.shape[0], piece, *rows.shape[2:]))
        padded[:, : rows.shape[1]] = rows
        pieces = [torch.empty_like(padded) for _ in range(self.world_size)] if self.rank == owner else None
        dist.gather(padded, pieces, dst=dist.get_global_rank(self.group, owner), group=self.group)
        if pieces is None:
            return None
        return torch.cat(pieces, dim=1)[:, : self.full_shapes[name][0]]

    def _scatter_rows(self, whole: Tensor | None, name: str, owner: int, like: Tensor) -> Tensor:
        """This process's rows of ``whole`` (given on ``owner``), sent from ``owner`` to every process."""
        shape = self.full_shapes[name]
        dtype = torch.promote_types(like.dtype, torch.float32)
        if name not in self.rows:
            out = whole.to(dtype) if whole is not None else torch.empty(shape, dtype=dtype, device=like.device)
            dist.broadcast(out, src=dist.get_global_rank(self.group, owner), group=self.group)
            return out
        piece = self._piece(name)
        out = torch.empty((piece, *shape[1:]), dtype=dtype, device=like.device)
        pieces = None
        if whole is not None:
            padded = whole.new_zeros((piece * self.world_size, *shape[1:]), dtype=dtype)
            padded[: shape[0]] = whole
            pieces = list(padded.split(piece))
        dist.scatter(out, pieces, src=dist.get_global_rank(self.group, owner), group=self.group)
        start, stop = self.rows[name]
        return out[: stop - start]


