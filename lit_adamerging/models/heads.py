"""The frozen per-task classification head."""

from __future__ import annotations

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

    def __init__(self, weight: Tensor, bias: Tensor | None = None, normalize: bool = False) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"a head weight must be [classes, features], got shape {tuple(weight.shape)}.")
        if bias is not None and bias.shape != weight.shape[:1]:
            raise ValueError(f"head bias shape {tuple(bias.shape)} does not match {weight.shape[0]} classes.")
        self.normalize = normalize
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def forward(self, features: Tensor) -> Tensor:
        if self.normalize:
            features = F.normalize(features, dim=-1)
        return F.linear(features, self.weight.to(features.dtype), None if self.bias is None else self.bias.to(features.dtype))
