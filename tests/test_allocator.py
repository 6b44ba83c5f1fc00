import os
import platform
import subprocess
import sys

import pytest

from lit_adamerging.allocator import retain_freed_memory

# Allocates and frees 40 x 8 MB six times; prints the page faults of each round.
ROUNDS = """
import resource, sys, torch
torch.set_num_threads(1)
from lit_adamerging.allocator import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.ones(2_000_000) for _ in range(40)]
    del tensors
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults_per_round(mode: str) -> list[int]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", ROUNDS, mode], env=env, capture_output=True, text=True, check=True)
    return [int(line) for line in done.stdout.split()]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's heap settings")
def test_freed_memory_is_reused_instead_of_faulted_back_in() -> None:
    pages = 40 * 8_000_000 // 4096
    # glibc hands the 320 MB back and faults it in again in the next round
    assert page_faults_per_round("default")[1] > pages // 2
    # Retained, it is reused. The next rounds may still fault a few blocks in (in a process that
    # imported little, small allocations between and beside the blocks land in the freed heap and
    # move some blocks up, seen in any of rounds 2-4); once that settles, as in a training loop's
    # steady state, a round faults (almost) nothing.
    retained = page_faults_per_round("retain")
    assert min(retained[1:]) < pages // 20, f"page faults per round with retain_freed_memory: {retained}"


def test_rejects_a_non_positive_threshold() -> None:
    with pytest.raises(ValueError, match="mmap_threshold_bytes must be positive"):
        retain_freed_memory(0)
