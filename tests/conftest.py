"""Shared fixtures: tiny encoders with synthetic, seeded "fine-tuned" copies; lazy state dicts that check
they are loaded one at a time."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterable, Sequence

import pytest
import torch
from torch import Tensor, nn

from lit_adamerging.models import LazyStateDicts, create_encoder
from lit_adamerging.models.encoders import register_open_clip_configs

register_open_clip_configs()  # some tests build test-vit-tiny with open_clip itself

TINY_CLIP = "open_clip:test-vit-tiny"
TINY_TIMM = "timm:test_efficientnet"

ZooBuilder = Callable[..., tuple[nn.Module, dict[str, dict[str, Tensor]]]]


def _build_tiny_zoo(
    name: str = TINY_CLIP,
    tasks: Sequence[str] = ("a", "b", "c"),
    seed: int = 0,
    noise: float = 0.05,
    perturb_buffers: bool = False,
) -> tuple[nn.Module, dict[str, dict[str, Tensor]]]:
    """A seeded encoder (eval mode) and ``{task: state dict}`` of perturbed copies of it.

    Every floating-point parameter of task ``k`` is ``theta_0 + noise * max(std(theta_0), 0.01) * N(0, 1)``.
    With ``perturb_buffers`` the pretrained batch-norm statistics are randomised, each task's float
    buffers are perturbed as well (``running_var`` stays positive) and integer buffers
    (``num_batches_tracked``) get a task-dependent value; otherwise buffers are copied unchanged.
    Does not touch the global RNG.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = create_encoder(name)
    buffer_names = {key for key, _ in encoder.named_buffers()}
    if perturb_buffers:
        with torch.no_grad():
            for key, buffer in encoder.named_buffers():
                if key.endswith("running_mean"):
                    buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))
                elif key.endswith("running_var"):
                    buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))
    pretrained = encoder.state_dict()
    finetuned: dict[str, dict[str, Tensor]] = {}
    for index, task in enumerate(tasks):
        state: dict[str, Tensor] = {}
        for key, value in pretrained.items():
            if not value.is_floating_point():
                state[key] = value + (index + 1) * 7 if perturb_buffers and key in buffer_names else value.clone()
            elif key in buffer_names and not perturb_buffers:
                state[key] = value.clone()
            elif key.endswith("running_var"):
                state[key] = value * torch.exp(noise * torch.randn(value.shape, generator=generator))
            else:
                scale = max(value.float().std().item() if value.numel() > 1 else 0.0, 0.01)
                state[key] = value + noise * scale * torch.randn(value.shape, generator=generator)
        finetuned[task] = state
    return encoder, finetuned


@pytest.fixture
def make_tiny_zoo() -> ZooBuilder:
    """Factory ``(name, tasks, seed, noise, perturb_buffers) -> (encoder, {task: state dict})``.

    ``name`` defaults to ``"open_clip:test-vit-tiny"``; ``"timm:test_efficientnet"`` has batch norm.
    """
    return _build_tiny_zoo


def _one_at_a_time(load: Callable[[str], dict[str, Tensor]], tasks: Iterable[str]) -> tuple[LazyStateDicts, list[str]]:
    loads: list[str] = []
    alive: list[weakref.ref] = []

    def tracked(task: str) -> dict[str, Tensor]:
        assert all(ref() is None for ref in alive), f"a fine-tuned state dict was still in memory when {task!r} was loaded"
        loads.append(task)
        state = load(task)
        alive.extend(weakref.ref(value) for value in state.values())
        return state

    return LazyStateDicts({task: functools.partial(tracked, task) for task in tasks}), loads


@pytest.fixture
def one_at_a_time() -> Callable[[Callable[[str], dict[str, Tensor]], Iterable[str]], tuple[LazyStateDicts, list[str]]]:
    """Factory ``(load, tasks) -> (LazyStateDicts, loads)``: ``load(task)`` behind a lazy mapping that
    records each load in ``loads`` and fails if a state dict it handed out earlier is still alive."""
    return _one_at_a_time
