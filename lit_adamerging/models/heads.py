"""The frozen per-task classification head."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F


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
        """``source`` names where the tensors come from (file and task) in the errors of bad heads."""
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


def head_source(path: str | Path, task: str) -> str:
    """How the errors of a head read from a file name it (the ``source`` of :class:`ClassificationHead`)."""
    return f"{path} (head of task {task!r})"
