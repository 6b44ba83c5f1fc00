"""Plain helpers and constants shared by the test modules (``from helpers import run_cli``); the fixtures
that wrap some of them are in conftest.py.

Test modules import from here, never from each other or from conftest.py. pytest finds this module
through ``pythonpath = tests`` in setup.cfg.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import subprocess
import sys
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml
from torch import Tensor, nn

from lit_adamerging import SyntheticTask, SyntheticZoo
from lit_adamerging.data.offline import DATA_ENV, checkout_datasets_dir
from lit_adamerging.models import LazyStateDicts, create_encoder

# The tiny models the tests build: open_clip's test-vit-tiny (32 px; its config ships with lit_adamerging) and
# timm's test_efficientnet (has batch norm), by their own names and as lit_adamerging encoder names.
TINY_CLIP_MODEL = "test-vit-tiny"
TINY_CLIP = f"open_clip:{TINY_CLIP_MODEL}"
TINY_TIMM_MODEL = "test_efficientnet"
TINY_TIMM = f"timm:{TINY_TIMM_MODEL}"

REPOSITORY = Path(__file__).resolve().parents[1]
CONFIGS = REPOSITORY / "configs"
TINY_CONFIG = CONFIGS / "tiny.yaml"

# A Lightning callback, as source for the probes.py that command tests write beside their runs (the command imports
# it from there; that file must import os, signal and lightning.pytorch as pl).
KILL_AT_PROBE = '''
class KillAt(pl.Callback):
    """SIGKILL this process after optimizer step ``step`` (no clean-up, no final checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
'''

# The file name a Payload is pointed at: it must never appear (the payload never ran).
MARKER = "pwned.txt"

ZooBuilder = Callable[..., tuple[nn.Module, dict[str, dict[str, Tensor]]]]


def build_tiny_zoo(
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


def loaded_one_at_a_time(
    load: Callable[[str], dict[str, Tensor]], tasks: Iterable[str]
) -> tuple[LazyStateDicts, list[str]]:
    """``load(task)`` behind a lazy mapping that records each load in ``loads`` and fails if a state dict it
    handed out earlier is still alive: ``(LazyStateDicts, loads)``."""
    loads: list[str] = []
    alive: list[weakref.ref] = []

    def tracked(task: str) -> dict[str, Tensor]:
        still_alive = any(ref() is not None for ref in alive)
        assert not still_alive, f"a fine-tuned state dict was still in memory when {task!r} was loaded"
        loads.append(task)
        state = load(task)
        alive.extend(weakref.ref(value) for value in state.values())
        return state

    return LazyStateDicts({task: functools.partial(tracked, task) for task in tasks}), loads


def offline_root() -> tuple[Path | None, str]:
    """Where the tests read the offline datasets (``$LIT_ADAMERGING_DATA``, else beside the checkout) and how to
    say it."""
    chosen = os.environ.get(DATA_ENV)
    if chosen:
        return Path(chosen).expanduser(), f"{DATA_ENV}={chosen}"
    beside = checkout_datasets_dir()
    if beside is None:
        return None, f"{DATA_ENV} is not set and lit_adamerging is not imported from a source checkout"
    return beside, f"{DATA_ENV} is not set and {beside} (beside the checkout)"


class Payload:
    """Unpickling it writes ``path``: what a malicious checkpoint would do with os.system."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return eval, (f"__import__('pathlib').Path({self.path!r}).write_text('code ran')",)


def run_cli(
    cwd: Path, *args: str, script: bool = False, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``lit-adamerging *args`` in ``cwd`` (``python -m lit_adamerging.cli``; the installed script with ``script``),
    with Python's warnings off unless ``env`` (added to the environment) sets ``PYTHONWARNINGS``."""
    executable = shutil.which("lit-adamerging", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    command = [executable] if script and executable else [sys.executable, "-m", "lit_adamerging.cli"]
    env = {**os.environ, "COLUMNS": "200", "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(command + list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def load_config() -> dict:
    """configs/tiny.yaml as a dict."""
    return yaml.safe_load(TINY_CONFIG.read_text())


def printed_metric(output: str, name: str) -> float:
    """The first value printed for ``name`` in Lightning's results table (plain or rich)."""
    match = re.search(re.escape(name) + r"[\s│|]+([0-9.]+)", output)
    assert match, f"{name} not printed:\n{output}"
    return float(match.group(1))


def naive_accuracies(config: dict, coefficients: torch.Tensor) -> dict[str, float]:
    """Accuracy of every task's head with theta0 + sum_k lam[k, p] tau[k, p], merged with a plain loop.

    ``coefficients`` is ``[tasks, 1]`` (task-wise) or ``[tasks, merged tensors]``, already clamped.
    """
    tasks = {name: SyntheticTask(**spec["init_args"]) for name, spec in config["data"]["tasks"].items()}
    return reference_accuracies(SyntheticZoo(**config["model"]["zoo"]["init_args"]), tasks, list(tasks), coefficients)


def reference_accuracies(
    zoo: SyntheticZoo, tasks: dict[str, SyntheticTask], seen: list[str], coefficients: Tensor
) -> dict[str, float]:
    """Every task's accuracy with theta0 + sum over the seen tasks k of lam[k, p] tau[k, p] (a plain loop).

    ``coefficients`` is ``[seen tasks, 1]`` (task-wise) or ``[seen tasks, merged tensors]``, already clamped.
    """
    loaded = zoo.load({name: task.num_classes for name, task in tasks.items()})
    theta0 = loaded.encoder.state_dict()
    parameters = {name for name, _ in loaded.encoder.named_parameters()}
    merged = dict(theta0)
    for p, name in enumerate(key for key in theta0 if key in parameters):
        total = theta0[name].clone()
        for k, task in enumerate(seen):
            lam = coefficients[k, p if coefficients.shape[1] > 1 else 0]
            total += lam * (loaded.finetuned[task][name] - theta0[name])
        merged[name] = total
    encoder = copy.deepcopy(loaded.encoder)
    encoder.load_state_dict(merged)
    encoder.eval()
    accuracies = {}
    with torch.no_grad():
        for name, task in tasks.items():
            images, labels = task.test_set().tensors
            accuracies[name] = (loaded.heads[name](encoder(images)).argmax(-1) == labels).float().mean().item()
    return accuracies


TWO_TASKS = {"alpha": 5, "beta": 3}
"""The module tests' two synthetic tasks and their numbers of classes."""


def synthetic_tasks(sizes: Mapping[str, int] | None = None) -> dict[str, SyntheticTask]:
    """:data:`TWO_TASKS` as 32-px synthetic tasks with ``sizes`` images (default 12 and 8)."""
    sizes = sizes or {"alpha": 12, "beta": 8}
    return {
        task: SyntheticTask(num_classes=TWO_TASKS[task], num_images=n, image_size=32, seed=index + 1)
        for index, (task, n) in enumerate(sizes.items())
    }


def cpu_trainer(folder, **kwargs) -> pl.Trainer:
    """A quiet one-process CPU Trainer writing under ``folder``: no logger, no checkpoints, no validation (``kwargs``
    override)."""
    options = dict(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(folder),
    )
    options.update(kwargs)
    return pl.Trainer(**options)
