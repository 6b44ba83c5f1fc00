"""The frozen per-task classification head."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lit_adamerging.models.checkpoints import unusable_tensor_kind


class ClassificationHead(nn.Module):
    """``logits = normalize?(features) @ weight.T + bias``.

    A CLIP zero-shot head is ``normalize=True`` with the logit scale folded into ``weight``; a
    linear probe or a fine-tuned classifier is ``normalize=False`` with a bias.

    Example:
        >>> head = ClassificationHead(torch.eye(3, 4), torch.zeros(3))
        >>> head(torch.ones(2, 4)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self, weight: Tensor, bias: Tensor | None = None, normalize: bool = False, source: str = "ClassificationHead"
    ) -> None:
        """``source`` names where the tensors come from (file and task) in the errors of bad heads.

        Shapes are checked before any value is read, then the kind of tensor, then the values.
        """
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(
                f"{source}: the head weight must be 2-D [classes, features], got shape {tuple(weight.shape)}."
            )
        if bias is not None and bias.shape != weight.shape[:1]:
            raise ValueError(
                f"{source}: the head bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},): one value "
                f"per class of the weight {tuple(weight.shape)}."
            )
        for name, value in (("weight", weight), ("bias", bias)):
            kind = None if value is None else unusable_tensor_kind(value)
            if kind is not None:
                raise ValueError(
                    f"{source}: the head {name} is {kind}; a head needs dense tensors with values, so save "
                    "materialised ones (`.to_dense()`, after loading the real weights)."
                )
            if value is not None and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ValueError(
                    f"{source}: the head {name} has NaN or infinite values; the file is corrupt or its training "
                    "diverged."
                )
        self.normalize = normalize
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def forward(self, features: Tensor) -> Tensor:
        if self.normalize:
            features = F.normalize(features, dim=-1)
        bias = None if self.bias is None else self.bias.to(features.dtype)
        return F.linear(features, self.weight.to(features.dtype), bias)


def check_head_fits(
    weight: Tensor, path: str | Path, task: str, *, num_classes: int | None = None, features: int | None = None
) -> None:
    """Refuse a head ``weight`` whose shape does not fit the task's class count or the encoder's feature width.

    Only the shape is read, so a head file declaring a huge weight is refused before its values are touched.
    A weight that is not 2-D is left to :class:`ClassificationHead`, which says so.

    Example:
        >>> check_head_fits(torch.zeros(3, 8), "head.pt", "mnist", num_classes=10)
        Traceback (most recent call last):
        ...
        ValueError: task 'mnist': its head has 3 classes but its dataset has 10 (head file head.pt); ...
    """
    if weight.dim() != 2:
        return
    rows, columns = weight.shape
    if num_classes is not None and rows != num_classes:
        raise ValueError(
            f"task {task!r}: its head has {rows} classes but its dataset has {num_classes} (head file {path}); the "
            "head and the data must describe the same classes, so give the head trained for this task's classes."
        )
    if features is not None and columns != features:
        raise ValueError(
            f"task {task!r}: its head takes {columns} features but the encoder returns {features} (head file "
            f"{path}); the head was trained on another encoder's features, so give a head made for this encoder."
        )


def head_source(path: str | Path, task: str) -> str:
    """How the errors of a head read from a file name it (the ``source`` of :class:`ClassificationHead`)."""
    return f"{path} (head of task {task!r})"
