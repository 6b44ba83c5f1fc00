"""ImageNet-C corruptions of test images, for the paper's distribution-shift experiment.

The seven corruptions of the AdaMerging paper, with the definitions and the five severity levels of
ImageNet-C (Hendrycks & Dietterich, 2019), computed by the ``imagecorruptions-imaug`` package (its
outputs match the original ``make_imagenet_c.py`` to within one grey level; motion blur is a
NumPy port of ImageMagick's, which the original called through Wand).

A corruption is applied to the uint8 image the model would see, after the geometric preprocessing
(resize and crop, :meth:`Preprocess.decode`) and before normalisation, with ImageNet-C's 224-px
parameters at whatever size that is: for CLIP's 224 px these are exactly ImageNet-C's images; at
other sizes the pixel-level corruptions (noise, JPEG, contrast, pixelate's fraction) keep their
meaning while the blur and spatter radii, in pixels, cover a larger share of a smaller image.

Every image gets its own seed, derived from the run-independent ``corruption_seed`` of its task, the
task's identity, its index, the corruption and the severity (:func:`image_seed`), so the corrupted
test set is the same in every run and process; numpy's global random state, which the package
draws from, is saved and restored around each call.

Example:
    >>> import torch
    >>> image = torch.randint(256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    >>> noisy = corrupt_image(image, "gaussian_noise", severity=3, seed=7)
    >>> noisy.shape, noisy.dtype, torch.equal(noisy, corrupt_image(image, "gaussian_noise", severity=3, seed=7))
    (torch.Size([3, 32, 32]), torch.uint8, True)
    >>> CORRUPTIONS[:3]
    ('gaussian_noise', 'impulse_noise', 'motion_blur')
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
from collections.abc import Iterator
from importlib import metadata
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "CORRUPTIONS",
    "MIN_IMAGE_SIZE",
    "SEVERITIES",
    "CorruptedImages",
    "CorruptionName",
    "check_corruption",
    "corrupt_image",
    "corruption_library",
    "image_seed",
]

CorruptionName = Literal[
    "gaussian_noise", "impulse_noise", "motion_blur", "pixelate", "spatter", "contrast", "jpeg_compression"
]

CORRUPTIONS: tuple[str, ...] = get_args(CorruptionName)
"""The corruption names, in the paper's order (its robustness table)."""

SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
"""ImageNet-C's severity levels."""

MIN_IMAGE_SIZE = 32
"""The smallest image side the corruption package accepts."""

_PACKAGE = "imagecorruptions-imaug"


def check_corruption(corruption: Any, severity: Any, owner: str) -> None:
    """Raise a ValueError naming ``owner`` unless ``corruption`` is ``None`` (then ``severity`` must be too)
    or one of :data:`CORRUPTIONS` with a ``severity`` in :data:`SEVERITIES`."""
    if corruption is None:
        if severity is not None:
            raise ValueError(f"{owner}: severity={severity!r} without a corruption; give `corruption` as well "
                             f"(one of {', '.join(CORRUPTIONS)}) or drop `severity`.")
        return
    if not isinstance(corruption, str) or corruption not in CORRUPTIONS:
        raise ValueError(f"{owner}: unknown corruption {corruption!r}; valid corruptions: {', '.join(CORRUPTIONS)}.")
    if isinstance(severity, bool) or not isinstance(severity, int) or severity not in SEVERITIES:
        raise ValueError(f"{owner}: corruption {corruption!r} needs a severity, one of "
                         f"{', '.join(map(str, SEVERITIES))} (ImageNet-C's levels); got {severity!r}.")


def image_seed(seed: int, identity: str, index: int, corruption: str, severity: int) -> int:
    """The seed of one image's corruption: a 32-bit number hashed from everything that names the image and its
    corruption (no RNG involved, so it is the same in every process and library version)."""
    key = json.dumps([seed, identity, index, corruption, severity])
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")


@functools.cache
def _package() -> Any:
    """The corruption package, imported on first use (it brings OpenCV, scikit-image and numba)."""
    try:
        import imagecorruptions
    except ImportError as error:
        raise ImportError(
            f"corrupting images needs the {_PACKAGE} package: pip install 'lit_adamerging[corruptions]' "
            f"(or pip install {_PACKAGE})"
        ) from error
    # The unmaintained `imagecorruptions` installs the same module name; its impulse noise cannot be seeded.
    if "seed" not in inspect.signature(imagecorruptions.corruption_dict["impulse_noise"]).parameters:
        raise ImportError(f"the installed `imagecorruptions` module ({imagecorruptions.__file__}) is not "
                          f"{_PACKAGE}'s: pip uninstall imagecorruptions && pip install --force-reinstall {_PACKAGE}")
    return imagecorruptions


@functools.cache
def corruption_library() -> str:
    """The versions of the corruption package and of the libraries its outputs depend on (Pillow's is in the
    decoded-cache key already), for that key."""
    _package()
    import cv2
    import scipy
    import skimage

    return (f"{_PACKAGE}=={metadata.version(_PACKAGE)},opencv=={cv2.__version__},scikit-image=={skimage.__version__},"
            f"scipy=={scipy.__version__},numpy=={np.__version__}")


@contextlib.contextmanager
def _numpy_global_seed(seed: int) -> Iterator[None]:
    """Seed numpy's global random state for the block, then put the caller's state back."""
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(saved)


def corrupt_image(image: Tensor, corruption: str, severity: int, seed: int) -> Tensor:
    """``image`` (uint8 ``[3, H, W]``, H and W at least :data:`MIN_IMAGE_SIZE`) under ImageNet-C's
    ``corruption`` at ``severity``: a new uint8 ``[3, H, W]`` tensor, a function of its arguments alone.

    numpy's global random state is left as it was.
    """
    check_corruption(corruption, severity, "corrupt_image")
    if not isinstance(image, Tensor) or image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"corrupt_image needs a uint8 tensor [3, H, W], got "
                         f"{getattr(image, 'dtype', type(image).__name__)} {tuple(getattr(image, 'shape', ()))}.")
    if min(image.shape[1:]) < MIN_IMAGE_SIZE:
        raise ValueError(f"corrupt_image: images need at least {MIN_IMAGE_SIZE} px a side for the ImageNet-C "
                         f"corruptions, got {tuple(image.shape[1:])}.")
    package = _package()
    pixels = np.ascontiguousarray(image.numpy().transpose(1, 2, 0))  # numpy's copies: torch's uint8 permute is slow
    # impulse noise draws from its own generator, seeded here; the other corruptions from numpy's global state
    extra = {"seed": seed} if corruption == "impulse_noise" else {}
    with _numpy_global_seed(seed):
        corrupted = package.corrupt(pixels, severity=severity, corruption_name=corruption, **extra)
    return torch.from_numpy(np.ascontiguousarray(np.asarray(corrupted, dtype=np.uint8).transpose(2, 0, 1)))


class CorruptedImages(Dataset):
    """``(corrupt_image(image), label)`` over a dataset of ``(uint8 [3, H, W] image, label)``.

    Image ``i`` is corrupted with :func:`image_seed` ``(seed, identity, i, corruption, severity)``.
    """

    def __init__(self, dataset: Dataset, corruption: str, severity: int, seed: int, identity: str) -> None:
        check_corruption(corruption, severity, "CorruptedImages")
        self.dataset = dataset
        self.corruption = corruption
        self.severity = severity
        self.seed = seed
        self.identity = identity

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, Any]:
        image, label = self.dataset[index]
        seed = image_seed(self.seed, self.identity, index, self.corruption, self.severity)
        return corrupt_image(image, self.corruption, self.severity, seed), label
