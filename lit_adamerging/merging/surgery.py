"""Representation Surgery (Yang et al., ICML 2024): a small per-task map on the merged encoder's features.

For task ``k`` the surgered features are ``z - W_up,k relu(W_down,k z)``: ``W_down,k`` maps the
encoder's ``width`` features down to ``rank`` (16 in the paper), ``W_up,k`` back up, no biases.
The low-rank branch estimates the *representation bias* of the merged model on task ``k`` and the
surgery subtracts it; it is trained (encoder and heads frozen) to bring the surgered merged features
close, in L1, to the features of task ``k``'s own fine-tuned model on unlabeled images of that task.
The surgery sits between the encoder and the frozen head: ``head_k(surgery_k(encoder(x)))``.

``W_up`` starts at zero, so an untrained surgery is the identity on the features; ``W_down`` starts
as :class:`torch.nn.Linear` does (Kaiming-uniform), so the gradient reaches ``W_up`` from the first
step. This is the released code's initialisation.

A trained :class:`SurgeryModules` is plain data: :meth:`SurgeryModules.plain_state_dict` names its
tensors ``<task>.down`` ``[rank, width]`` and ``<task>.up`` ``[width, rank]``, and
:meth:`SurgeryModules.from_plain_state_dict` rebuilds it (or apply them by hand: ``z - relu(z @ down.T) @ up.T``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

SURGERY_RANK = 16
"""The paper's rank of the surgery map (``Linear(width, 16)`` then ``Linear(16, width)``)."""


class FeatureSurgery(nn.Module):
    """``z - up(relu(down(z)))`` on features ``z [..., width]``; the identity until ``up`` is trained.

    Args:
        width: the encoder's feature width.
        rank: the width of the low-rank branch.
    """

    def __init__(self, width: int, rank: int = SURGERY_RANK) -> None:
        super().__init__()
        if width < 1 or rank < 1:
            raise ValueError(f"surgery width and rank must be positive, got width {width} and rank {rank}.")
        self.down = nn.Linear(width, rank, bias=False)  # nn.Linear's own (Kaiming-uniform) initialisation
        self.up = nn.Linear(rank, width, bias=False)
        nn.init.zeros_(self.up.weight)

    @property
    def width(self) -> int:
        return self.down.in_features

    @property
    def rank(self) -> int:
        return self.down.out_features

    def forward(self, features: Tensor) -> Tensor:
        return features - self.up(torch.relu(self.down(features)))


class SurgeryModules(nn.Module):
    """One :class:`FeatureSurgery` per task (``tasks``), all of one width and rank.

    ``surgery(features, task)`` applies task ``task``'s map; a task without one (an unseen task,
    which has no fine-tuned model to learn from) gets its features back unchanged.

    Example:
        >>> surgery = SurgeryModules(["a", "b"], width=8, rank=2)
        >>> features = torch.randn(3, 8)
        >>> torch.equal(surgery(features, "a"), features)  # untrained: the identity
        True
    """

    def __init__(self, tasks: Sequence[str], width: int, rank: int = SURGERY_RANK) -> None:
        super().__init__()
        if isinstance(tasks, str):
            raise ValueError(f"tasks must be a list of task names, got the string {tasks!r}.")
        self.tasks: list[str] = list(tasks)
        self.width = width
        self.rank = rank
        self.maps = nn.ModuleDict({task: FeatureSurgery(width, rank) for task in self.tasks})

    def forward(self, features: Tensor, task: str) -> Tensor:
        return self.maps[task](features) if task in self.maps else features

    def plain_state_dict(self) -> dict[str, Tensor]:
        """``{"<task>.down": [rank, width], "<task>.up": [width, rank]}``: detached, contiguous copies."""
        state = {}
        for task, surgery in self.maps.items():
            state[f"{task}.down"] = surgery.down.weight.detach().clone().contiguous()
            state[f"{task}.up"] = surgery.up.weight.detach().clone().contiguous()
        return state

    @classmethod
    def from_plain_state_dict(cls, state: Mapping[str, Tensor], source: str = "the state dict") -> SurgeryModules:
        """The modules :meth:`plain_state_dict` (or an exported ``.surgery.safetensors`` file) describes.

        Width and rank are read from the shapes; ``source`` names the file in the errors.
        """
        tasks: dict[str, dict[str, Tensor]] = {}
        for key, value in state.items():
            task, dot, part = key.rpartition(".")
            if not dot or part not in ("down", "up"):
                raise ValueError(f"{source}: key {key!r} is not '<task>.down' or '<task>.up'; it holds no surgery.")
            tasks.setdefault(task, {})[part] = value
        if not tasks:
            raise ValueError(f"{source} holds no surgery tensors ('<task>.down', '<task>.up').")
        shapes = set()
        for task, parts in tasks.items():
            if set(parts) != {"down", "up"}:
                raise ValueError(f"{source}: task {task!r} has only {sorted(parts)}; a surgery needs 'down' and 'up'.")
            down, up = parts["down"], parts["up"]
            if down.dim() != 2 or up.shape != down.shape[::-1]:
                raise ValueError(
                    f"{source}: task {task!r} has down {tuple(down.shape)} and up {tuple(up.shape)}; expected "
                    "[rank, width] and [width, rank]."
                )
            shapes.add(tuple(down.shape))
        if len(shapes) > 1:
            raise ValueError(f"{source}: the tasks' surgeries have different shapes {sorted(shapes)}.")
        rank, width = shapes.pop()
        modules = cls(list(tasks), width, rank)
        with torch.no_grad():
            for task, parts in tasks.items():
                modules.maps[task].down.weight.copy_(parts["down"])
                modules.maps[task].up.weight.copy_(parts["up"])
        return modules

