"""The splits torchvision does not define, fixed here deterministically and independent of the library versions.

Indices are ranked by the SHA-256 of ``"<seed>:<key>"``, no RNG involved:

* EuroSAT: the 27,000 images (in torchvision's sorted ImageFolder order) are split 80/10/10 into
  21,600 / 2,700 / 2,700 train/val/test images with :data:`EUROSAT_SPLIT_SEED`; see
  :func:`eurosat_split_indices`.
* SUN397, without the official ``Testing_01.txt`` partition file: 50 images per class chosen with
  :data:`SUN397_SPLIT_SEED` (fewer for classes under 100 images: half of them); see
  :func:`sun397_test_indices`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

__all__ = ["EUROSAT_SPLIT_SEED", "SUN397_SPLIT_SEED", "eurosat_split_indices", "eurosat_test_indices",
           "sun397_test_indices"]  # fmt: skip

EUROSAT_SPLIT_SEED = 0
"""Seed of the fixed EuroSAT train/val/test split (:func:`eurosat_split_indices`)."""

SUN397_SPLIT_SEED = 0
"""Seed of the fallback SUN397 test split used when no partition file is found."""


def _seeded_order(keys: Sequence[str], seed: int) -> list[int]:
    """Positions of ``keys`` ranked by SHA-256 of ``"<seed>:<key>"``: a fixed, version-proof shuffle."""
    digests = [hashlib.sha256(f"{seed}:{key}".encode()).digest() for key in keys]
    return sorted(range(len(keys)), key=lambda i: (digests[i], i))


def eurosat_split_indices(n: int, seed: int = EUROSAT_SPLIT_SEED) -> tuple[list[int], list[int], list[int]]:
    """Fixed train/val/test split of ``n`` images: ``n - 2 * (n // 10)`` / ``n // 10`` / ``n // 10``.

    Indices ``0..n-1`` are ranked by the SHA-256 of ``"<seed>:<index>"``; the first ``n // 10`` are
    the test set, the next ``n // 10`` the validation set, the rest the training set. Each list is
    sorted. For EuroSAT's 27,000 images that is 21,600 / 2,700 / 2,700.

    Example:
        >>> train, val, test = eurosat_split_indices(27_000)
        >>> len(train), len(val), len(test)
        (21600, 2700, 2700)
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"eurosat_split_indices: n must be a non-negative integer, got {n!r}.")
    order = _seeded_order([str(i) for i in range(n)], seed)
    part = n // 10
    return sorted(order[2 * part :]), sorted(order[part : 2 * part]), sorted(order[:part])


def eurosat_test_indices(n: int, seed: int = EUROSAT_SPLIT_SEED) -> list[int]:
    """The test part (``n // 10`` sorted indices) of :func:`eurosat_split_indices`."""
    return eurosat_split_indices(n, seed)[2]


def sun397_test_indices(
    keys: Sequence[str], labels: Sequence[int], per_class: int = 50, seed: int = SUN397_SPLIT_SEED
) -> list[int]:
    """Fallback SUN397 test split: ``min(per_class, count // 2)`` images of every class.

    Within each class the images are ranked by the SHA-256 of ``"<seed>:<key>"`` (``key``: the
    image's path relative to the ``SUN397`` folder), so the result does not depend on the order
    the files were listed in. Returns sorted positions into ``keys``.
    """
    if len(keys) != len(labels):
        raise ValueError(f"sun397_test_indices: {len(keys)} keys but {len(labels)} labels.")
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(index)
    chosen: list[int] = []
    for members in by_class.values():
        order = _seeded_order([keys[i] for i in members], seed)
        chosen.extend(members[i] for i in order[: min(per_class, len(members) // 2)])
    return sorted(chosen)
