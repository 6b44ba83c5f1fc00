"""Fisher merging (Matena & Raffel, *Merging Models with Fisher-Weighted Averaging*, NeurIPS 2022).

Each fine-tuned model ``k`` gets the diagonal of its Fisher information on unlabeled images of
its own task,

    F_k = E_x E_{y ~ p_k(y|x)} [ (d log p_k(y|x) / d theta)^2 ],

estimated with one label per image drawn from the model's own predictive distribution (so no
labels are read) and per-example gradients (:func:`fisher_sums`: ``torch.func.vmap`` over
``torch.func.grad`` of ``functional_call``, in chunks). The merge is then, entry by entry,

    theta* = sum_k c_k (F_k + floor) theta_k / sum_k c_k (F_k + floor),

with ``c_k = 1 / (||F_k|| + floor)`` (``||F_k||``: the L2 norm of model ``k``'s whole Fisher)
when ``normalize``, else ``c_k = 1`` (:class:`FisherWeightedAverage`, :func:`fisher_merge`).
The floor and the normalisation are FusionBench's CLIP defaults (``minimal_fisher_weight``
``1e-6`` added to every entry, ``normalize_fisher_weight: true``); the authors' released code
clips at the same ``1e-6`` instead of adding it and also divides by the norm. An entry no image's
gradient reaches (``F_k = 0`` in every model) is then the ``c``-weighted average of the models.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

FISHER_FLOOR = 1e-6
"""Added to every Fisher entry before the merge (FusionBench's ``minimal_fisher_weight``)."""

FISHER_IMAGES = 256
"""Images per task the Fisher is estimated on (FusionBench's CLIP ``num_fisher_examples``)."""


def sample_labels(logits: Tensor, uniforms: Tensor) -> Tensor:
    """Labels drawn from ``softmax(logits)`` by inverse transform sampling.

    For each row, the label is the first class whose cumulative probability exceeds that row's
    ``uniforms`` value (in ``[0, 1)``), so a label depends only on its own image and its own
    uniform, never on the batch it came in. ``logits`` is ``[..., C]``, ``uniforms`` ``[...]``;
    works inside ``torch.func.vmap``.

    Example:
        >>> sample_labels(torch.tensor([[0.0, 0.0], [0.0, 0.0]]), torch.tensor([0.2, 0.7]))
        tensor([0, 1])
    """
    cumulative = logits.detach().float().softmax(dim=-1).cumsum(dim=-1)
    below = (cumulative <= uniforms.unsqueeze(-1)).sum(dim=-1)
    return below.clamp(max=logits.shape[-1] - 1)  # u above a cumulative sum rounded below 1


def fisher_sums(
    encoder: nn.Module,
    head: nn.Module,
    params: Mapping[str, Tensor],
    images: Tensor,
    uniforms: Tensor,
    *,
    fixed: Mapping[str, Tensor] | None = None,
    chunk_size: int = 16,
) -> tuple[dict[str, Tensor], Tensor]:
    """Per-example squared gradients of ``log p(y|x)`` with respect to ``params``, summed over ``images``.

    ``p(y|x) = softmax(head(encoder(x)))`` with the encoder's tensors ``params`` (and ``fixed``,
    e.g. fine-tuned buffers, not differentiated) in place of its own; ``y`` is drawn with
    :func:`sample_labels` from ``uniforms [B]``. Gradients are exact per example (``vmap`` over
    ``grad``), ``chunk_size`` images at a time: a chunk holds ``chunk_size`` copies of the
    gradients. Attention runs with PyTorch's math kernel here (the fused kernels have no
    ``vmap`` rule). The encoder and head should be in eval mode.

    Returns:
        ``({name: float32 sum of squared gradients}, sampled labels [B])``; divide the sums by
        the number of images (summed across processes first, if any) for the Fisher.
    """
    if images.shape[0] != uniforms.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {uniforms.shape[0]} uniforms; give one per image.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    names = list(params)
    extra = dict(fixed or {})

    def log_likelihood(values: tuple[Tensor, ...], image: Tensor, uniform: Tensor) -> tuple[Tensor, Tensor]:
        tensors = {**dict(zip(names, values)), **extra}
        logits = head(functional_call(encoder, tensors, (image.unsqueeze(0),)))[0]
        label = sample_labels(logits, uniform)
        return logits.float().log_softmax(dim=-1).gather(-1, label.unsqueeze(-1)).squeeze(-1), label

    per_example = vmap(grad(log_likelihood, has_aux=True), in_dims=(None, 0, 0))
    values = tuple(params[name].detach() for name in names)
    sums = {name: torch.zeros(params[name].shape, dtype=torch.float32, device=params[name].device) for name in names}
    labels = []
    # grad ignores an outer no_grad; the no_grad keeps the head's or encoder's own parameters, if they require
    # gradients, from recording a graph around the per-example gradients.
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        for start in range(0, images.shape[0], chunk_size):
            grads, chunk_labels = per_example(
                values, images[start:start + chunk_size], uniforms[start:start + chunk_size]
            )
            for name, gradient in zip(names, grads):
                sums[name] += gradient.float().square().sum(dim=0)
            labels.append(chunk_labels)
    return sums, torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=images.device)


class FisherWeightedAverage:
    """The Fisher-weighted average of models, added one model at a time.

    Holds two running sums (numerator and denominator, float32, one tensor per name), never the
    models or Fishers themselves: ``add(theta_k, F_k)`` for each model, then :meth:`result`. See
    the module docstring for the formula.

    Args:
        floor: added to every Fisher entry (FusionBench's ``minimal_fisher_weight``).
        normalize: weight each model by ``1 / (||F_k|| + floor)`` (FusionBench's
            ``normalize_fisher_weight``), so a model whose Fisher is larger overall does not
            dominate every entry.
    """

    def __init__(self, floor: float = FISHER_FLOOR, normalize: bool = True) -> None:
        if not floor >= 0.0:
            raise ValueError(f"floor must be 0 or more, got {floor}.")
        self.floor = floor
        self.normalize = normalize
        self._numerator: dict[str, Tensor] = {}
        self._denominator: dict[str, Tensor] = {}
        self.num_models = 0

    def add(self, weights: Mapping[str, Tensor], fisher: Mapping[str, Tensor]) -> None:
        """Add one model: its tensors ``weights`` and their Fisher ``fisher`` (same names and shapes)."""
        if self._numerator and set(fisher) != set(self._numerator):
            raise ValueError(
                f"model {self.num_models}: its Fisher names other tensors than the first model's "
                f"({sorted(set(fisher) ^ set(self._numerator))[:5]}); every model needs a Fisher for the same tensors."
            )
        for name, value in fisher.items():
            if name not in weights:
                raise ValueError(f"model {self.num_models}: there is a Fisher for {name!r} but no such tensor.")
            if value.shape != weights[name].shape:
                raise ValueError(
                    f"model {self.num_models}, tensor {name!r}: the Fisher has shape {tuple(value.shape)}, the tensor "
                    f"{tuple(weights[name].shape)}."
                )
            if not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
                raise ValueError(
                    f"model {self.num_models}, tensor {name!r}: the Fisher has negative, NaN or infinite entries."
                )
        scale = 1.0
        if self.normalize:
            norm = math.sqrt(sum(float(value.double().square().sum()) for value in fisher.values()))
            scale = 1.0 / (norm + self.floor)
            if scale == float("inf"):
                raise ValueError(
                    f"model {self.num_models}: its Fisher is zero everywhere and floor is 0, so it cannot be "
                    "normalised; give floor > 0."
                )
        for name, value in fisher.items():
            weight = (value.float() + self.floor) * scale
            term = weight * weights[name].float()
            if name in self._numerator:
                self._numerator[name] += term
                self._denominator[name] += weight
            else:
                self._numerator[name], self._denominator[name] = term, weight
        self.num_models += 1

    def result(self) -> dict[str, Tensor]:
        """``{name: merged tensor}`` (float32), in the order of the first model's Fisher."""
        if not self.num_models:
            raise ValueError("no models were added; add at least one (weights, fisher) pair.")
        zero = [name for name, value in self._denominator.items() if bool((value == 0).any())]
        if zero:
            raise ValueError(
                f"tensor(s) {zero[:5]} have Fisher 0 in every model and floor is 0; give floor > 0 (the default 1e-6)."
            )
        return {name: self._numerator[name] / self._denominator[name] for name in self._numerator}


def fisher_merge(
    finetuned: Sequence[Mapping[str, Tensor]],
    fishers: Sequence[Mapping[str, Tensor]],
    *,
    floor: float = FISHER_FLOOR,
    normalize: bool = True,
) -> dict[str, Tensor]:
    """The Fisher-weighted average of ``finetuned`` models for every tensor ``fishers`` name.

    ``fishers[k]`` is model ``k``'s diagonal Fisher (a mean over images, e.g. ``sums / count``
    from :func:`fisher_sums`), for the same names in every model. Tensors without a Fisher are
    not returned: the caller decides what they become.

    Example:
        >>> a, b = {"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([1.0, 1.0])}
        >>> fisher_merge([a, b], [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}],
        ...              floor=0.0, normalize=False)
        {'w': tensor([0., 1.])}
    """
    if len(finetuned) != len(fishers):
        raise ValueError(f"got {len(finetuned)} models but {len(fishers)} Fishers; give one Fisher per model.")
    average = FisherWeightedAverage(floor, normalize)
    for weights, fisher in zip(finetuned, fishers):
        average.add(weights, fisher)
    return average.result()
