"""Rank-wise merging: each matrix's task vectors split into singular components, one gate per component.

The functional core of :class:`~lit_adamerging.RankWiseAdaMergingModule` (AdaRank's idea: Lee et
al., *AdaRank: Adaptive Rank Pruning for Enhanced Model Merging*, arXiv 2503.22178, ICLR 2026),
pure torch:

* :func:`rank_components` factorises once: per matrix (the rule of
  :func:`~lit_adamerging.merging.spectral.spectral_matrices`) and task, ``tau_k = U_k diag(s_k) V_k^T``
  with the top ``rank_fraction`` of its components (all of them by default), from the batched
  float64 Gram eigendecompositions of :func:`~lit_adamerging.merging.spectral.top_singular`, stored
  in float32 as ``u [B, m, T*K]``, ``s [B, T, K]``, ``v [B, n, T*K]`` per chunk of same-shape layers.
  A component whose singular value counts as zero is zero (its gate then changes nothing).
* :func:`rank_wise_task_vector` merges given gates ``g [B, T, K]`` per chunk, differentiably:
  ``scale * sum_k U_k diag(g_k * s_k) V_k^T`` for every matrix (one batched product per chunk, no
  Python loop over tasks or components), ``scale * sum_k tau_k`` (task arithmetic) for every other
  tensor. ``theta_0`` plus it is the merged encoder (:func:`rank_wise_merging`).

So with every gate at 1 and all components kept the merge is task arithmetic at ``scale``; with
every gate at ``c`` the matrices are task arithmetic at ``scale * c``.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lit_adamerging.merging.spectral import (
    _chunks,
    _matrix_names,
    check_rank_fraction,
    top_singular,
    tsv_factors,
    tsv_rank,
)

RANK_WISE_SCALE = 0.3
"""The task vectors' scale: task arithmetic's 0.3, the AdaRank code's ``prior`` for task arithmetic."""

RankBase = Literal["task_arithmetic", "tsv"]
"""Whose components are gated: task arithmetic's task vectors (each task's own singular components, the
other tensors summed) or TSV-M's (each task's top ``1/T`` components with the tasks' singular vectors
decorrelated, :func:`~lit_adamerging.merging.spectral.tsv_factors`; the other tensors averaged, as TSV-M)."""
RANK_BASES: tuple[str, ...] = ("task_arithmetic", "tsv")


@dataclass
class RankComponents:
    """The singular components of every matrix's task vectors, grouped in chunks of same-shape layers.

    Chunk ``i`` holds the layers ``names[i]`` with ``u[i] [B, m, T*K]``, ``s[i] [B, T, K]`` and
    ``v[i] [B, n, T*K]``: column ``t * K + k`` of ``u`` and ``v`` is task ``t``'s component ``k``
    (largest first). ``shapes`` gives each matrix's tensor shape (a convolution's kernel is read as
    ``[out, in * kh * kw]``).
    """

    names: list[list[str]]
    u: list[Tensor]
    s: list[Tensor]
    v: list[Tensor]
    shapes: dict[str, torch.Size]
    others: str = "sum"  # how the tensors that are not matrices combine their task vectors: "sum" or "mean"

    @property
    def gate_shapes(self) -> list[torch.Size]:
        """The shape of each chunk's gates, ``[B, T, K]`` (the shape of ``s``)."""
        return [s.shape for s in self.s]

    @property
    def num_gates(self) -> int:
        """The number of gates: one per task, matrix and kept component."""
        return sum(s.numel() for s in self.s)

    @property
    def matrices(self) -> list[str]:
        """The factorised tensors' names, chunk by chunk."""
        return [name for names in self.names for name in names]

    def split(self, gates: Tensor) -> list[Tensor]:
        """A flat ``[num_gates]`` vector as the chunks' ``[B, T, K]`` gates."""
        if gates.dim() != 1 or gates.numel() != self.num_gates:
            raise ValueError(
                f"expected a flat vector of {self.num_gates} gates (one per task, matrix and component), got shape "
                f"{tuple(gates.shape)}."
            )
        return [part.reshape(shape) for part, shape in zip(gates.split([s.numel() for s in self.s]), self.gate_shapes)]

    def to(self, device: torch.device | str) -> RankComponents:
        """The components on ``device``."""
        return RankComponents(
            self.names, [u.to(device) for u in self.u], [s.to(device) for s in self.s], [v.to(device) for v in self.v],
            self.shapes, self.others,
        )


def check_matrix_shapes(task_vectors: Mapping[str, Tensor], matrices: Collection[str]) -> None:
    """Refuse a named matrix without a usable matrix shape: fewer than two dimensions, or an empty side."""
    for name in matrices:
        if name not in task_vectors:
            continue  # _matrix_names names it
        shape = tuple(task_vectors[name].shape[1:])
        if len(shape) < 2 or 0 in shape:
            raise ValueError(
                f"rank-wise merging cannot split {name!r} into singular components: its shape {shape} is not a "
                "matrix (it needs two or more dimensions, none of them empty). Leave it out of matrices (it then "
                "takes task arithmetic's coefficient)."
            )


@torch.no_grad()
def rank_components(
    task_vectors: Mapping[str, Tensor],
    matrices: Collection[str] | None = None,
    rank_fraction: float | None = None,
    base: RankBase = "task_arithmetic",
) -> RankComponents:
    """The singular components of each matrix's stacked task vectors ``{name: Tensor[T, *shape]}``.

    Args:
        task_vectors: the stacked task vectors (:func:`~lit_adamerging.merging.stack_task_vectors`).
        matrices: the names factorised (:func:`~lit_adamerging.merging.spectral.spectral_matrices`);
            ``None``: every tensor of two or more dimensions.
        rank_fraction: each task keeps its top ``max(1, floor(rank_fraction * min(m, n)))`` components
            of every matrix, in (0, 1]; ``None`` (the default, AdaRank's ``initial_rank_ratio`` 1.0): all
            (with ``base="tsv"``: TSV-M's rank fraction, ``None`` its ``1 / T``).
        base: ``"task_arithmetic"`` (each task's own components; the other tensors summed) or ``"tsv"``
            (TSV-M's decorrelated components, gates at 1 give TSV-M's merge; the other tensors averaged).
    """
    if base not in RANK_BASES:
        raise ValueError(f"base must be one of {', '.join(RANK_BASES)}, got {base!r}.")
    if not task_vectors:
        raise ValueError("no task vectors to factorise.")
    check_rank_fraction(rank_fraction)
    if matrices is not None and not isinstance(matrices, str):
        check_matrix_shapes(task_vectors, matrices)
    names = _matrix_names(task_vectors, matrices)
    if not names:
        raise ValueError(
            "no matrices to split into singular components: the encoder has no linear, convolution or attention "
            "weight with task vectors. Rank-wise merging needs at least one."
        )
    chunk_names: list[list[str]] = []
    us: list[Tensor] = []
    ss: list[Tensor] = []
    vs: list[Tensor] = []
    for chunk, stack in _chunks(task_vectors, names):
        batch, num_tasks, rows, columns = stack.shape
        full = min(rows, columns)
        dtype = torch.promote_types(stack.dtype, torch.float32)
        chunk_names.append(chunk)
        if base == "tsv":  # already joined task by task: u [B, m, T*k], s [B, T*k], v [B, n, T*k]
            k = tsv_rank(full, num_tasks, rank_fraction)
            merged = tsv_factors(stack, rank_fraction)
            us.append(merged.u.to(dtype))
            ss.append(merged.s.reshape(batch, num_tasks, k).to(dtype))
            vs.append(merged.v.to(dtype))
            continue
        k = full if rank_fraction is None else min(full, max(1, int(rank_fraction * full)))
        factors = top_singular(stack.reshape(batch * num_tasks, rows, columns), k)

        def joined(side: Tensor, size: int) -> Tensor:
            return side.reshape(batch, num_tasks, size, k).transpose(1, 2).reshape(batch, size, num_tasks * k)

        us.append(joined(factors.u, rows).to(dtype))
        ss.append(factors.s.reshape(batch, num_tasks, k).to(dtype))
        vs.append(joined(factors.v, columns).to(dtype))
    shapes = {name: task_vectors[name].shape[1:] for name in names}
    return RankComponents(chunk_names, us, ss, vs, shapes, "mean" if base == "tsv" else "sum")


def _gate_list(components: RankComponents, gates: Tensor | Sequence[Tensor]) -> list[Tensor]:
    if isinstance(gates, Tensor):
        return components.split(gates)
    gates = list(gates)
    if [tuple(g.shape) for g in gates] != [tuple(shape) for shape in components.gate_shapes]:
        raise ValueError(
            f"expected gates of shapes {[tuple(shape) for shape in components.gate_shapes]} (one [layers, tasks, "
            f"components] block per chunk), got {[tuple(g.shape) for g in gates]}."
        )
    return gates


def rank_wise_task_vector(
    task_vectors: Mapping[str, Tensor],
    components: RankComponents,
    gates: Tensor | Sequence[Tensor],
    scale: float = RANK_WISE_SCALE,
) -> dict[str, Tensor]:
    """The merged task vector ``{name: Tensor[*shape]}`` for ``gates``, differentiable in them.

    Matrices: ``scale * sum_k U_k diag(g_k * s_k) V_k^T``; every other tensor of ``task_vectors``:
    ``scale * sum_k tau_k`` (TSV-M's base: ``scale * mean_k tau_k``). ``gates`` is a flat ``[num_gates]``
    vector or the chunks' ``[B, T, K]`` blocks (:attr:`RankComponents.gate_shapes`); the result follows
    ``task_vectors``' order.
    """
    check_scale(scale)
    merged: dict[str, Tensor] = {}
    for names, u, s, v, g in zip(components.names, components.u, components.s, components.v,
                                 _gate_list(components, gates)):
        weights = (g.to(s.dtype) * s).reshape(s.shape[0], -1)  # [B, T*K], column t*K + k
        layers = (u * weights.unsqueeze(-2)) @ v.mT  # [B, m, n]
        for name, layer in zip(names, layers.unbind(0)):
            merged[name] = scale * layer.reshape(components.shapes[name])
    for name, stacked in task_vectors.items():
        if name not in merged:
            stacked = stacked.detach().to(torch.promote_types(stacked.dtype, torch.float32))
            merged[name] = scale * (stacked.mean(0) if components.others == "mean" else stacked.sum(0))
    return {name: merged[name] for name in task_vectors}


def rank_wise_merging(
    pretrained: Mapping[str, Tensor],
    task_vectors: Mapping[str, Tensor],
    components: RankComponents,
    gates: Tensor | Sequence[Tensor],
    scale: float = RANK_WISE_SCALE,
) -> dict[str, Tensor]:
    """``theta_0 + rank_wise_task_vector(...)`` for every tensor with task vectors; the others stay pretrained.

    Example:
        >>> theta0 = {"w": torch.zeros(3, 2), "b": torch.zeros(3)}
        >>> tv = {"w": torch.randn(2, 3, 2), "b": torch.randn(2, 3)}
        >>> parts = rank_components(tv, matrices=["w"])
        >>> merged = rank_wise_merging(theta0, tv, parts, torch.ones(parts.num_gates), scale=1.0)
        >>> torch.allclose(merged["w"], tv["w"].sum(0), atol=1e-5), torch.allclose(merged["b"], tv["b"].sum(0))
        (True, True)
    """
    update = rank_wise_task_vector(task_vectors, components, gates, scale)
    return {
        key: (value.float() + update[key].to(value.device)).to(value.dtype) if key in update else value
        for key, value in pretrained.items()
    }


def check_scale(scale: float) -> None:
    """Refuse a scale that is not a finite number."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(
            f"scale must be a finite number (the task vectors' coefficient, task arithmetic's 0.3), got {scale!r}."
        )


__all__ = [
    "RANK_BASES", "RANK_WISE_SCALE", "RankBase", "RankComponents", "check_matrix_shapes", "check_scale",
    "rank_components", "rank_wise_merging", "rank_wise_task_vector",
]
