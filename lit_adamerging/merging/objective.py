"""AdaMerging's objective: the Shannon entropy of each head's predictions."""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F


def entropy(logits: Tensor) -> Tensor:
    """Shannon entropy (nats) of ``softmax(logits)`` over the last dim, computed in fp32.

    Example:
        >>> import torch
        >>> entropy(torch.zeros(1, 4))  # uniform over 4 classes: log(4)
        tensor([1.3863])
    """
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)
