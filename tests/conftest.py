"""Fixtures: tiny encoders with synthetic, seeded "fine-tuned" copies; lazy state dicts that check they are
loaded one at a time; the offline datasets. Hooks: open_clip learns the tiny model's config; the checkout
is checked for files the run left behind.

The plain helpers and constants are in helpers.py (``from helpers import run_cli``).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from torch import Tensor

from helpers import REPOSITORY, ZooBuilder, build_tiny_zoo, loaded_one_at_a_time, offline_root
from lit_adamerging.data.offline import DATA_ENV, DOWNLOADABLE, has_dataset
from lit_adamerging.models import LazyStateDicts
from lit_adamerging.models.encoders import register_open_clip_configs


def pytest_configure(config: pytest.Config) -> None:
    register_open_clip_configs()  # some tests build test-vit-tiny with open_clip itself


_UNTRACKED_AT_START = pytest.StashKey[set[str] | None]()


def _untracked_files() -> set[str] | None:
    """The checkout's untracked files that .gitignore does not ignore; None outside a git checkout."""
    git = shutil.which("git")
    if git is None or not (REPOSITORY / ".git").exists():
        return None
    status = subprocess.run([git, "status", "--porcelain", "--untracked-files=all"], cwd=REPOSITORY,
                            capture_output=True, text=True)
    if status.returncode != 0:
        return None
    return {line[3:] for line in status.stdout.splitlines() if line.startswith("?? ")}


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_UNTRACKED_AT_START] = _untracked_files()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if it left a file in the checkout (tests write under tmp_path)."""
    before = session.config.stash.get(_UNTRACKED_AT_START, None)
    after = _untracked_files()
    if before is None or after is None:
        return
    left = sorted(after - before)
    if left:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = f"the tests left files in the checkout {REPOSITORY}: {', '.join(left)}"
        if reporter is not None:
            reporter.write_sep("=", message, red=True)
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def make_tiny_zoo() -> ZooBuilder:
    """Factory ``(name, tasks, seed, noise, perturb_buffers) -> (encoder, {task: state dict})``
    (:func:`helpers.build_tiny_zoo`).

    ``name`` defaults to :data:`helpers.TINY_CLIP`; :data:`helpers.TINY_TIMM` has batch norm.
    """
    return build_tiny_zoo


@pytest.fixture
def one_at_a_time() -> Callable[[Callable[[str], dict[str, Tensor]], Iterable[str]], tuple[LazyStateDicts, list[str]]]:
    """Factory ``(load, tasks) -> (LazyStateDicts, loads)``: ``load(task)`` behind a lazy mapping that
    records each load in ``loads`` and fails if a state dict it handed out earlier is still alive
    (:func:`helpers.loaded_one_at_a_time`)."""
    return loaded_one_at_a_time


@pytest.fixture(scope="session")
def offline_datasets() -> Callable[..., Path]:
    """``require(*names) -> root``: the folder holding the offline ImageFolder trees ``names``; else the test is
    skipped, saying what is missing and how to provide it.

    The folder is ``$LIT_ADAMERGING_DATA``, else ``../shared/datasets`` beside the checkout
    (:func:`~lit_adamerging.data.offline.checkout_datasets_dir`); a root has a dataset when
    ``<root>/<name>/train`` and ``<root>/<name>/test`` are folders. Nothing is downloaded.
    """
    root, where = offline_root()

    def require(*names: str) -> Path:
        missing = [name for name in names if root is None or not has_dataset(root, name)]
        if missing:
            pytest.skip(
                f"offline datasets not found: {where} has no {', '.join(missing)}; set {DATA_ENV} to a folder "
                f"with {', '.join(f'{name}/' for name in DOWNLOADABLE)} (each with train/ and test/; "
                "see lit_adamerging.data.offline)"
            )
        return root

    return require
