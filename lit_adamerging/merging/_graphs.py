"""A training step (merge and encoder, forward and backward) captured as CUDA graphs and replayed."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

Step = Callable[[Tensor, Tensor], Tensor]
"""``step(coefficients, images) -> features``."""

# At most this many CUDA graph pairs (one per input shape and autocast setting) per StepGraphs:
# each keeps a step's activations in its own memory pool. Other shapes run eagerly.
MAX_CAPTURES = 4


def graphable(images: Tensor, trainable: bool) -> bool:
    """Whether a step on ``images`` may be a graph: a training forward on CUDA (gradients on, ``trainable``
    coefficients), not itself inside a capture or a compilation."""
    return (
        images.is_cuda
        and torch.is_grad_enabled()
        and trainable
        and not torch.cuda.is_current_stream_capturing()
        and not torch.compiler.is_compiling()
    )


class StepGraphs:
    """CUDA graphs of a step, one pair (forward, backward) per input shape and autocast setting.

    Attributes:
        captured: ``{inputs key: graphed step}``; ``None`` for inputs whose capture failed (they run eagerly).
        awaiting_backward: the keys whose graphed forward has not had its backward yet.
    """

    def __init__(self) -> None:
        self.captured: dict[tuple[Any, ...], Step | None] = {}
        self.awaiting_backward: set[tuple[Any, ...]] = set()

    def clear(self) -> None:
        """Drop every graph (they point at the memory of the tensors they were captured with)."""
        self.captured.clear()
        self.awaiting_backward.clear()

    def __call__(self, step: Step, coefficients: Tensor, images: Tensor) -> Tensor | None:
        """``step(coefficients, images)`` replayed from its graph (captured the first time these inputs are
        seen), or ``None`` where it must run eagerly: no graph for them, or the last replay's backward has
        not run yet (a replay would overwrite what it needs).

        The features returned are the graph's output buffer, overwritten by the next replay.
        """
        device = images.device.type
        autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        key = (tuple(images.shape), images.dtype, images.device, *autocast)
        if key not in self.captured and len(self.captured) < MAX_CAPTURES:
            self.captured[key] = _capture(step, coefficients, images)
        graphed = self.captured.get(key)
        if graphed is None or key in self.awaiting_backward:
            if graphed is not None:
                warnings.warn(
                    "MergedEncoder: a second training forward of the same shape before the first one's backward "
                    "runs without its CUDA graph (slower, still exact); call backward once per forward.",
                    stacklevel=3,
                )
            return None
        features = graphed(coefficients, images)
        self.awaiting_backward.add(key)
        features.register_hook(functools.partial(_backward_reached, self.awaiting_backward, key))
        return features


def _capture(step: Step, coefficients: Tensor, images: Tensor) -> Step | None:
    """``step``, forward and backward, as CUDA graphs for inputs like these; ``None`` (with a warning) if
    it cannot be captured: those inputs then run eagerly."""
    device = images.device.type
    stream = torch.cuda.current_stream(images.device)
    try:
        # Capture records the autocast casts in use; its weight-cast cache must be off for that.
        with torch.autocast(
            device,
            dtype=torch.get_autocast_dtype(device),
            enabled=torch.is_autocast_enabled(device),
            cache_enabled=False,
        ):
            return torch.cuda.make_graphed_callables(
                step, (coefficients.detach().clone().requires_grad_(True), images.detach().clone())
            )
    except RuntimeError as error:  # an operation of the encoder that a graph cannot hold
        torch.cuda.set_stream(stream)  # a failed capture leaves its side stream current
        torch.cuda.synchronize(images.device)
        warnings.warn(
            f"MergedEncoder: the training step could not be captured as a CUDA graph for inputs of shape "
            f"{tuple(images.shape)} ({type(error).__name__}: {str(error).splitlines()[0]}); it runs eagerly. "
            "Set cuda_graphs=False to skip the attempt.",
            stacklevel=4,
        )
        return None


def _backward_reached(awaiting: set[tuple[Any, ...]], key: tuple[Any, ...], grad: Tensor) -> None:
    awaiting.discard(key)
