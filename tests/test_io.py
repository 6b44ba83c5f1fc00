"""Atomic writes: what an interrupted writer leaves behind is removed by the next write, never a live writer's file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_adamerging.io import save_state_dict, write_atomic

# Imports lit_adamerging.io alone (not the package's heavy imports) and stalls halfway through a write.
STALLING_WRITER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("io_under_test", sys.argv[1])
io = importlib.util.module_from_spec(spec)
spec.loader.exec_module(io)

def write(temporary):
    with open(temporary, "wb") as out:
        out.write(b"half" * 262144)
        out.flush()
        print(temporary, flush=True)
        time.sleep(600)

io.write_atomic(sys.argv[2], write)
"""


def start_stalling_writer(destination: Path) -> tuple[subprocess.Popen, Path]:
    import lit_adamerging.io

    process = subprocess.Popen(
        [sys.executable, "-c", STALLING_WRITER, lit_adamerging.io.__file__, str(destination)],
        stdout=subprocess.PIPE,
        text=True,
    )
    return process, Path(process.stdout.readline().strip())


def stop(process: subprocess.Popen) -> None:
    process.kill()
    process.wait()


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    destination = tmp_path / "out" / "merged.pt"
    killed, killed_temporary = start_stalling_writer(destination)
    live, live_temporary = start_stalling_writer(destination)
    try:
        assert killed_temporary.parent == destination.parent and killed_temporary.name.startswith(".merged.pt.")
        assert killed_temporary.stat().st_size == 4 * 262144 and f".{killed.pid}." in killed_temporary.name
        stop(killed)  # SIGKILL mid-write
        assert killed_temporary.exists() and not destination.exists()

        state = {"w": torch.arange(6.0).reshape(2, 3)}
        save_state_dict(state, destination)
        assert not killed_temporary.exists()
        assert live_temporary.exists() and live_temporary.stat().st_size == 4 * 262144  # still being written
        assert torch.equal(torch.load(destination, weights_only=True)["w"], state["w"])
    finally:
        stop(live)
    write_atomic(destination, lambda temporary: Path(temporary).write_bytes(b"complete"))
    assert sorted(path.name for path in destination.parent.iterdir()) == ["merged.pt"]
    assert destination.read_bytes() == b"complete"


def test_only_this_destinations_temporary_files_of_dead_writers_on_this_host_are_removed(tmp_path):
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(ended.stdout)
    names: list[str] = []

    def write(temporary: str) -> None:
        names.append(Path(temporary).name)
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_atomic(tmp_path / "a.json", write)
    assert not any(tmp_path.iterdir())  # an error removes the temporary file at once
    host, pid = names[0][len(".a.json."):].split(".")[:2]  # .<name>.<host>.<pid>.<random>.tmp
    assert int(pid) == os.getpid()
    stale = tmp_path / f".a.json.{host}.{dead}.0123456789abcdef.tmp"
    kept = [
        tmp_path / f".a.json.other-host.{dead}.0123456789abcdef.tmp",  # another machine's writer may be alive
        tmp_path / f".a.json.x.{host}.{dead}.0123456789abcdef.tmp",  # a temporary file of "a.json.x"
        tmp_path / f".a.json.{host}.{os.getpid()}.0123456789abcdef.tmp",  # a running process's
        tmp_path / f".a.json.{host}.{dead}.notes",  # not a temporary file
    ]
    for path in (stale, *kept):
        path.write_bytes(b"x")
    write_atomic(tmp_path / "a.json", lambda temporary: Path(temporary).write_text("[]"))
    assert not stale.exists() and all(path.exists() for path in kept)
    assert (tmp_path / "a.json").read_text() == "[]"


def test_written_files_get_the_usual_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        write_atomic(tmp_path / "f.txt", lambda temporary: Path(temporary).write_text("x"))
    finally:
        os.umask(mask)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644  # as open() gives, not mkstemp's 0o600
