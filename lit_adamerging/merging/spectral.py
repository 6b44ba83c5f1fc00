"""Spectral merges: each layer's task vectors read as matrices and merged through their singular vectors.

Two data-free methods, pure torch:

* **TSV-M**, Task Singular Vectors merge (Gargiulo et al., *Task Singular Vectors: Reducing Task
  Interference in Model Merging*, CVPR 2025): per matrix, each task keeps its top ``rank_fraction``
  of the layer's singular components (``1 / T`` by default); the tasks' left singular vectors are
  concatenated into ``X``, the right ones into ``Y``, each is decorrelated (``X = P S Q^T ->
  P Q^T``, the closest matrix with orthonormal columns), and the layer becomes
  ``alpha * X_perp diag(sigma) Y_perp^T`` with the kept singular values ``sigma`` (:func:`tsv_factors`).
* **Iso-C and Iso-CTS**, isotropic merging (Marczak et al., *No Task Left Behind: Isotropic Model
  Merging with Common and Task-Specific Subspaces*, ICML 2025): Iso-CTS keeps the top
  ``common_fraction`` of the summed task vector's singular directions as a common subspace, projects
  each task's vector off it (on the left) and keeps that residual's top directions, an equal share
  of the remaining rank per task; the common and task directions are concatenated, decorrelated
  as in TSV-M, and every singular value is replaced by their mean (``alpha * mean(sigma) *
  X_perp Y_perp^T``, :func:`iso_factors`). Iso-C is the case ``common_fraction = 1``: the sum's
  spectrum flattened to its mean singular value.

**Which tensors are matrices** (:func:`spectral_matrices`): the weights of the modules that multiply
their input by them. ``nn.Linear`` (and subclasses, such as attention's ``out_proj``) as it is,
``[out, in]``; every convolution (``nn.Conv1d/2d/3d`` and the transposed ones, any ``groups``)
reshaped ``[shape[0], prod(shape[1:])]``, e.g. ``[out, in / groups * kh * kw]``, so a depthwise
``[C, 1, 3, 3]`` kernel is a ``[C, 9]`` matrix of rank at most 9; ``nn.MultiheadAttention``'s packed
in-projection ``in_proj_weight`` ``[3d, d]`` as **one** matrix (``q_proj_weight`` / ``k_proj_weight`` /
``v_proj_weight`` when the attention keeps them apart, one each). One matrix because it is one
linear map of one input (``x -> [q; k; v]`` is a single product), as RegMean in this library reads
it, and because the papers' released code treats it so (every 2-D tensor is one matrix there), so
their reported numbers are for that reading; splitting it would give q, k and v ``1/T`` of the rank
each, three times the packed matrix's kept rank, another method. (Encoders that keep q, k and v
as separate ``nn.Linear`` layers, as Hugging Face's CLIP does, have three matrices under the same rule.)

**Everything else** (biases, norm scales and shifts, embeddings such as open_clip's
``positional_embedding`` and ``class_embedding``, bare parameters outside those modules such as
open_clip's output projection ``proj``, and floating-point buffers merged with ``buffer_policy="merge"``)
takes the mean of its task vectors, scaled by ``alpha``, as the papers' released code does. On a
plain state dict there are no modules to read: the functional merges take the matrices' names
(``matrices=``), and without them every tensor of two or more dimensions is a matrix.

**Numerics.** The singular vectors come from symmetric eigendecompositions of Gram matrices
(``A^T A`` of the smaller side, ``torch.linalg.eigh``) in float64, batched over layers and tasks
(``[B, T, m, n]``), on the device the task vectors live on. float64 because a Gram matrix squares
the condition number: in float64 every component kept here comes out at least as accurate as a
float32 SVD would give it, and on a CPU it costs about what ``torch.linalg.svd`` costs in float32
(a third of it in float64; docs/spectral_merging.md has the figures). (On MPS, which has no
float64, float32 is used.) A singular value below ``max(m, n) * eps(float32)`` times the matrix's largest
counts as zero, the rank ``torch.linalg.matrix_rank`` reports for float32 data: its component is
dropped, never given an arbitrary direction. So a zero layer merges to zero, a rank-deficient one
keeps its rank, identical task vectors give a defined result, and the decorrelation of bases that
share directions is the partial isometry on their span. On task vectors without exact rank
deficiency everything equals the papers' equations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lit_adamerging.merging.task_vectors import BufferPolicy, stack_task_vectors

TSV_ALPHA = 1.0
"""TSV-M's scale: the paper's alpha (FusionBench's ``TaskSingularVectorMerging`` preset too)."""

ISO_ALPHA = 1.0
"""Iso-C's and Iso-CTS's scale: FusionBench's presets (the paper picks alpha on held-out validation data)."""

ISO_COMMON_FRACTION = 0.8
"""Iso-CTS's share of each layer's rank given to the common subspace (the authors' ``iso_cts`` config)."""

# A chunk of same-shape layers is decomposed at once up to this many task-vector entries.
_CHUNK_ENTRIES = 1 << 25
_EPS = torch.finfo(torch.float32).eps


class SpectralFactors(NamedTuple):
    """``u diag(s) v^T`` of a batch of merged layers: ``u [B, m, K]``, ``s [B, K]``, ``v [B, n, K]``.

    The columns of ``u`` and of ``v`` are orthonormal, except zero columns for dropped components
    (``s`` is zero there too).
    """

    u: Tensor
    s: Tensor
    v: Tensor

    def matrix(self) -> Tensor:
        """The merged layers ``u diag(s) v^T``, ``[B, m, n]``."""
        return (self.u * self.s.unsqueeze(-2)) @ self.v.mT


# ----------------------------------------------------------------------------------------------- the matrix rule
def matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """The ``[rows, columns]`` a tensor of ``shape`` is read as: ``[shape[0], prod(shape[1:])]``.

    Example:
        >>> matrix_shape((64, 3, 8, 8)), matrix_shape((192, 64))
        ((64, 192), (192, 64))
    """
    if len(shape) < 2:
        raise ValueError(f"a tensor of shape {tuple(shape)} is not a matrix: it needs two or more dimensions.")
    return int(shape[0]), math.prod(int(size) for size in shape[1:])


def spectral_matrices(encoder: nn.Module) -> list[str]:
    """The names of ``encoder``'s tensors the spectral merges read as matrices, in state-dict order.

    The weights of ``nn.Linear`` modules (subclasses included), of convolutions (any ``groups``),
    and ``nn.MultiheadAttention``'s packed ``in_proj_weight`` (or its separate q/k/v weights); see
    the module docstring for why, and for what happens to every other tensor.

    Example:
        >>> attention = nn.MultiheadAttention(8, 2)
        >>> spectral_matrices(attention)
        ['in_proj_weight', 'out_proj.weight']
    """
    names: set[str] = set()
    for module_name, module in encoder.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and isinstance(module.weight, Tensor):
            names.add(f"{prefix}weight")
        elif isinstance(module, nn.MultiheadAttention):
            for attribute in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                if getattr(module, attribute, None) is not None:
                    names.add(prefix + attribute)
    return [name for name in encoder.state_dict() if name in names]


# ----------------------------------------------------------------------------------------------- arguments
def check_alpha(alpha: float) -> None:
    """Refuse a scale that is not a positive number."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0 or not math.isfinite(alpha):
        raise ValueError(
            f"alpha must be a positive number (the merged task vector's scale; 1.0 is the papers' default), "
            f"got {alpha!r}."
        )


def check_rank_fraction(rank_fraction: float | None) -> None:
    """Refuse a TSV-M rank fraction outside (0, 1]."""
    if rank_fraction is None:
        return
    if isinstance(rank_fraction, bool) or not isinstance(rank_fraction, (int, float)) or not 0 < rank_fraction <= 1:
        raise ValueError(
            "rank_fraction must be in (0, 1] (the share of each layer's rank every task keeps; None: 1 / number of "
            f"tasks, the paper's), got {rank_fraction!r}."
        )


def check_common_fraction(common_fraction: float) -> None:
    """Refuse an Iso-CTS common-subspace fraction outside [0, 1]."""
    if (
        isinstance(common_fraction, bool) or not isinstance(common_fraction, (int, float))
        or not 0 <= common_fraction <= 1
    ):
        raise ValueError(
            "common_fraction must be in [0, 1] (the share of each layer's rank kept from the summed task vector: "
            f"0.8 is Iso-CTS's default, 1.0 is Iso-C), got {common_fraction!r}."
        )


def tsv_rank(rank: int, num_tasks: int, rank_fraction: float | None = None) -> int:
    """The singular components each task keeps in a layer of rank ``rank`` (``min(m, n)``).

    ``floor(rank_fraction * rank)`` as the paper's code (``rank_fraction`` ``None``: ``1 / num_tasks``),
    but at least one, so a small layer (a ``[C, 9]`` depthwise kernel with more than 9 tasks) is not
    left out.

    Example:
        >>> tsv_rank(768, 8), tsv_rank(9, 4), tsv_rank(9, 16)
        (96, 2, 1)
    """
    fraction = 1.0 / num_tasks if rank_fraction is None else rank_fraction
    return min(rank, max(1, int(fraction * rank)))


def iso_split(rank: int, num_tasks: int, common_fraction: float = ISO_COMMON_FRACTION) -> tuple[int, int]:
    """``(common, per_task)`` ranks of Iso-CTS in a layer of rank ``rank``: ``common + num_tasks * per_task == rank``.

    As the authors' code: ``common`` starts at ``floor(common_fraction * rank)``; the rest is split
    evenly, ``per_task = round((rank - common) / num_tasks)`` (Python's ``round``: ties to even), and
    ``common`` takes what the tasks leave. ``common_fraction = 1`` gives ``(rank, 0)``: Iso-C.

    Example:
        >>> iso_split(768, 8), iso_split(768, 4), iso_split(9, 4), iso_split(64, 3, 1.0)
        ((616, 19), (616, 38), (9, 0), (64, 0))
    """
    common = int(common_fraction * rank)
    per_task = min(round((rank - common) / num_tasks), rank // num_tasks)
    return rank - num_tasks * per_task, per_task


# ----------------------------------------------------------------------------------------------- decompositions
def _compute_dtype(tensor: Tensor) -> torch.dtype:
    return torch.float32 if tensor.device.type == "mps" else torch.float64


def _kept(s: Tensor, largest: Tensor, rows: int, columns: int) -> Tensor:
    """Which singular values ``s [..., K]`` of ``rows x columns`` matrices whose largest is ``largest`` are not zero."""
    return s > largest * (max(rows, columns) * _EPS)


def top_singular(a: Tensor, k: int, scale: Tensor | None = None) -> SpectralFactors:
    """The top ``k`` singular components of every matrix of ``a [..., m, n]``, largest first.

    From the Gram matrix of the smaller side in float64 (see the module docstring); components
    whose singular value counts as zero are zero (``u``, ``s`` and ``v`` alike): zero against each
    matrix's largest singular value, or against ``scale [..., 1]`` when given (the size of what
    ``a`` was computed from, so that a difference that is zero up to rounding is zero).

    Example:
        >>> a = torch.tensor([[3.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
        >>> top_singular(a, 1).s
        tensor([3.], dtype=torch.float64)
    """
    rows, columns = a.shape[-2:]
    if not 0 <= k <= min(rows, columns):
        raise ValueError(f"k must be in [0, {min(rows, columns)}] for {rows} x {columns} matrices, got {k}.")
    wide = rows < columns
    x = (a.mT if wide else a).to(_compute_dtype(a))  # [..., p, q], q <= p
    eigenvalues, vectors = torch.linalg.eigh(x.mT @ x)  # ascending
    eigenvalues, vectors = eigenvalues.flip(-1), vectors.flip(-1)
    s = eigenvalues[..., :k].clamp_min(0).sqrt()
    largest = eigenvalues[..., :1].clamp_min(0).sqrt() if scale is None else scale.to(s.dtype)
    kept = _kept(s, largest, rows, columns)
    s = s * kept
    right = vectors[..., :k] * kept.unsqueeze(-2)  # x's right singular vectors
    left = (x @ right) / torch.where(kept, s, 1.0).unsqueeze(-2)  # x v / s: x's left singular vectors
    return SpectralFactors(right, s, left) if wide else SpectralFactors(left, s, right)


def orthogonalize(x: Tensor) -> Tensor:
    """``P Q^T`` for ``x = P S Q^T`` (``[..., m, K]``): the closest matrix with orthonormal columns on x's span.

    The decorrelation of TSV-M and Iso-CTS (the orthogonal Procrustes / polar factor). Computed as
    ``x (x^T x)^{-1/2}`` (or ``(x x^T)^{-1/2} x`` when ``K > m``) in float64 over the nonzero
    singular values only: zero columns stay zero, and columns that share directions give a partial
    isometry instead of an arbitrary completion.

    Example:
        >>> x = torch.tensor([[2.0, 1.0], [0.0, 1.0]])
        >>> q = orthogonalize(x)
        >>> torch.allclose(q.mT @ q, torch.eye(2, dtype=q.dtype))
        True
    """
    rows, columns = x.shape[-2:]
    x = x.to(_compute_dtype(x))
    tall = columns <= rows
    eigenvalues, vectors = torch.linalg.eigh(x.mT @ x if tall else x @ x.mT)
    s = eigenvalues.clamp_min(0).sqrt()
    kept = _kept(s, s.amax(-1, keepdim=True), rows, columns)
    inverse_root = (vectors * torch.where(kept, 1.0 / torch.where(kept, s, 1.0), 0.0).unsqueeze(-2)) @ vectors.mT
    return x @ inverse_root if tall else inverse_root @ x


def _check_stack(stack: Tensor) -> None:
    if stack.dim() != 4 or 0 in stack.shape:
        raise ValueError(
            f"expected task vectors stacked as [layers, tasks, rows, columns], got shape {tuple(stack.shape)}."
        )


def _concatenated(factors: SpectralFactors, num_tasks: int) -> SpectralFactors:
    """``[B * T, m, k]`` factors as ``[B, m, T * k]``: each layer's tasks side by side, task by task."""
    def side(t: Tensor) -> Tensor:
        batch, size, k = t.shape[0] // num_tasks, t.shape[-2], t.shape[-1]
        return t.reshape(batch, num_tasks, size, k).transpose(1, 2).reshape(batch, size, num_tasks * k)

    return SpectralFactors(side(factors.u), factors.s.reshape(-1, num_tasks * factors.s.shape[-1]), side(factors.v))


def tsv_factors(stack: Tensor, rank_fraction: float | None = None) -> SpectralFactors:
    """TSV-M of ``stack [B, T, m, n]`` (B layers of one shape, T tasks): ``SpectralFactors`` whose ``matrix()`` is
    the merged layers before ``alpha``.

    Each task keeps :func:`tsv_rank` components; ``u`` and ``v`` are the decorrelated concatenations
    (:func:`orthogonalize`), ``s`` the kept singular values, task by task.
    """
    _check_stack(stack)
    check_rank_fraction(rank_fraction)
    batch, num_tasks, rows, columns = stack.shape
    k = tsv_rank(min(rows, columns), num_tasks, rank_fraction)
    joined = _concatenated(top_singular(stack.reshape(batch * num_tasks, rows, columns), k), num_tasks)
    return SpectralFactors(orthogonalize(joined.u), joined.s, orthogonalize(joined.v))


def iso_factors(stack: Tensor, common_fraction: float = ISO_COMMON_FRACTION) -> SpectralFactors:
    """Iso-CTS of ``stack [B, T, m, n]`` (Iso-C with ``common_fraction = 1``): ``SpectralFactors`` whose
    ``matrix()`` is the merged layers before ``alpha``.

    The common subspace is the summed task vector's top :func:`iso_split` directions; each task's
    vector minus its projection on them (``tau - U_c U_c^T tau``) gives its own top directions.
    ``u`` and ``v`` are the decorrelated concatenations, ``s`` the mean of the kept singular values
    (common and task-specific together) wherever a component is kept.
    """
    _check_stack(stack)
    check_common_fraction(common_fraction)
    batch, num_tasks, rows, columns = stack.shape
    common, per_task = iso_split(min(rows, columns), num_tasks, common_fraction)
    work = stack.to(_compute_dtype(stack))
    summed = top_singular(work.sum(1), common)
    if per_task:
        residual = (work - summed.u.unsqueeze(1) @ (summed.u.mT.unsqueeze(1) @ work)).reshape(-1, rows, columns)
        size = torch.linalg.matrix_norm(work.reshape(-1, rows, columns)).unsqueeze(-1)  # each task vector's scale
        own = _concatenated(top_singular(residual, per_task, size), num_tasks)
        u = orthogonalize(torch.cat([summed.u, own.u], -1))
        v = orthogonalize(torch.cat([summed.v, own.v], -1))
        s = torch.cat([summed.s, own.s], -1)
    else:  # Iso-C: the sum's singular vectors are already orthonormal
        u, v, s = summed.u, summed.v, summed.s
    kept = s > 0
    mean = s.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True).clamp_min(1)
    return SpectralFactors(u, mean * kept, v)


# ----------------------------------------------------------------------------------------------- whole encoders
def _matrix_names(task_vectors: Mapping[str, Tensor], matrices: Collection[str] | None) -> list[str]:
    if matrices is None:
        return [name for name, stacked in task_vectors.items() if stacked.dim() >= 3]
    if isinstance(matrices, str):
        raise ValueError(f"matrices must be a collection of tensor names, got the string {matrices!r}.")
    unknown = [name for name in matrices if name not in task_vectors]
    if unknown:
        raise ValueError(
            f"matrices names tensors without task vectors: {sorted(unknown)[:5]}. Name tensors of the merged encoder "
            "(spectral_matrices(encoder) lists its linear and convolution weights); buffers kept pretrained have none."
        )
    flat = [name for name in matrices if task_vectors[name].dim() < 3]
    if flat:
        name = flat[0]
        raise ValueError(
            f"matrices names {name!r}, of shape {tuple(task_vectors[name].shape[1:])}: a matrix needs two or more "
            "dimensions. Leave it out (it then takes the mean of its task vectors)."
        )
    return [name for name in task_vectors if name in set(matrices)]


def _chunks(task_vectors: Mapping[str, Tensor], names: list[str]) -> Iterator[tuple[list[str], Tensor]]:
    """Same-matrix-shape tensors of ``names`` as ``(names, [B, T, m, n])`` stacks of at most ``_CHUNK_ENTRIES``."""
    groups: dict[tuple[object, ...], list[str]] = {}
    for name in names:
        stacked = task_vectors[name]
        groups.setdefault((matrix_shape(stacked.shape[1:]), stacked.dtype, stacked.device), []).append(name)
    for (shape, _, _), members in groups.items():
        per_layer = task_vectors[members[0]].shape[0] * shape[0] * shape[1]
        step = max(1, _CHUNK_ENTRIES // per_layer)
        for start in range(0, len(members), step):
            chunk = members[start:start + step]
            yield chunk, torch.stack([task_vectors[name].detach().reshape(-1, *shape) for name in chunk])


def _spectral_task_vector(
    task_vectors: Mapping[str, Tensor],
    factors: Callable[[Tensor], SpectralFactors],
    alpha: float,
    matrices: Collection[str] | None,
) -> dict[str, Tensor]:
    check_alpha(alpha)
    if not task_vectors:
        raise ValueError("no task vectors to merge.")
    names = _matrix_names(task_vectors, matrices)
    merged: dict[str, Tensor] = {}
    for chunk, stack in _chunks(task_vectors, names):
        layers = factors(stack).matrix()
        for name, layer in zip(chunk, layers):
            stacked = task_vectors[name]
            merged[name] = (alpha * layer).to(torch.promote_types(stacked.dtype, torch.float32)).reshape(
                stacked.shape[1:]
            )
    for name, stacked in task_vectors.items():
        if name not in merged:  # biases, norms, embeddings, buffers: the mean of the task vectors
            merged[name] = alpha * stacked.detach().to(torch.promote_types(stacked.dtype, torch.float32)).mean(0)
    return {name: merged[name] for name in task_vectors}


@torch.no_grad()
def tsv_task_vector(
    task_vectors: Mapping[str, Tensor],
    alpha: float = TSV_ALPHA,
    rank_fraction: float | None = None,
    *,
    matrices: Collection[str] | None = None,
) -> dict[str, Tensor]:
    """TSV-M's merged task vector ``{name: Tensor[*shape]}`` from stacked ``{name: Tensor[T, *shape]}``.

    Args:
        task_vectors: the stacked task vectors (:func:`~lit_adamerging.merging.stack_task_vectors`).
        alpha: the scale of the merged task vector (the paper's 1.0).
        rank_fraction: each task's share of a layer's rank, in (0, 1]; ``None``: ``1 / T``.
        matrices: the names merged as matrices (:func:`spectral_matrices`); ``None``: every tensor of
            two or more dimensions. The others take ``alpha`` times the mean of their task vectors.
    """
    check_rank_fraction(rank_fraction)
    return _spectral_task_vector(task_vectors, lambda stack: tsv_factors(stack, rank_fraction), alpha, matrices)


@torch.no_grad()
def iso_task_vector(
    task_vectors: Mapping[str, Tensor],
    alpha: float = ISO_ALPHA,
    common_fraction: float = ISO_COMMON_FRACTION,
    *,
    matrices: Collection[str] | None = None,
) -> dict[str, Tensor]:
    """Iso-CTS's merged task vector (Iso-C with ``common_fraction=1.0``) from stacked task vectors.

    Args:
        task_vectors: ``{name: Tensor[T, *shape]}`` (:func:`~lit_adamerging.merging.stack_task_vectors`).
        alpha: the scale of the merged task vector.
        common_fraction: the share of each layer's rank kept from the summed task vector, in [0, 1].
        matrices: as for :func:`tsv_task_vector`.
    """
    check_common_fraction(common_fraction)
    return _spectral_task_vector(task_vectors, lambda stack: iso_factors(stack, common_fraction), alpha, matrices)


# ----------------------------------------------------------------------------------------------- state dicts
def _merged_state_dict(
    pretrained: Mapping[str, Tensor],
    finetuned: Mapping[str, Mapping[str, Tensor]],
    merge: Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]],
    buffers: Collection[str],
    buffer_policy: BufferPolicy,
) -> dict[str, Tensor]:
    """``theta_0 + merge(task vectors)`` in theta_0's dtype for every merged tensor; the others stay pretrained."""
    task_vectors = stack_task_vectors(pretrained, finetuned, buffers=buffers, buffer_policy=buffer_policy)
    merged = merge(task_vectors)
    return {
        key: (value.float() + merged[key].to(value.device)).to(value.dtype) if key in merged else value
        for key, value in pretrained.items()
    }


def tsv_merging(
    pretrained: Mapping[str, Tensor],
    finetuned: Mapping[str, Mapping[str, Tensor]],
    alpha: float = TSV_ALPHA,
    rank_fraction: float | None = None,
    *,
    matrices: Collection[str] | None = None,
    buffers: Collection[str] = (),
    buffer_policy: BufferPolicy = "pretrained",
) -> dict[str, Tensor]:
    """TSV-M (Gargiulo et al., CVPR 2025) on state dicts: ``theta_0 + alpha * TSV(tau)``.

    The module is :class:`~lit_adamerging.TSVMergingModule`; ``matrices=spectral_matrices(encoder)``
    gives its matrix rule (see :func:`tsv_task_vector` for the arguments).
    """
    check_alpha(alpha)
    check_rank_fraction(rank_fraction)
    return _merged_state_dict(
        pretrained, finetuned, lambda tv: tsv_task_vector(tv, alpha, rank_fraction, matrices=matrices), buffers,
        buffer_policy,
    )


def iso_cts_merging(
    pretrained: Mapping[str, Tensor],
    finetuned: Mapping[str, Mapping[str, Tensor]],
    alpha: float = ISO_ALPHA,
    common_fraction: float = ISO_COMMON_FRACTION,
    *,
    matrices: Collection[str] | None = None,
    buffers: Collection[str] = (),
    buffer_policy: BufferPolicy = "pretrained",
) -> dict[str, Tensor]:
    """Iso-CTS (Marczak et al., ICML 2025) on state dicts: ``theta_0 + alpha * Iso-CTS(tau)``.

    The module is :class:`~lit_adamerging.IsotropicMergingModule` (see :func:`iso_task_vector`).
    """
    check_alpha(alpha)
    check_common_fraction(common_fraction)
    return _merged_state_dict(
        pretrained, finetuned, lambda tv: iso_task_vector(tv, alpha, common_fraction, matrices=matrices), buffers,
        buffer_policy,
    )


def iso_c_merging(
    pretrained: Mapping[str, Tensor],
    finetuned: Mapping[str, Mapping[str, Tensor]],
    alpha: float = ISO_ALPHA,
    *,
    matrices: Collection[str] | None = None,
    buffers: Collection[str] = (),
    buffer_policy: BufferPolicy = "pretrained",
) -> dict[str, Tensor]:
    """Iso-C (Marczak et al., ICML 2025) on state dicts: the summed task vector's spectrum flattened to its mean.

    :func:`iso_cts_merging` with ``common_fraction=1.0``; the module is
    :class:`~lit_adamerging.IsotropicMergingModule` with ``common_fraction=1.0``.
    """
    return iso_cts_merging(
        pretrained, finetuned, alpha, 1.0, matrices=matrices, buffers=buffers, buffer_policy=buffer_policy
    )
