"""Decoding image files, and the error that names a file that cannot be decoded."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from lit_adamerging.models.preprocess import to_rgb

__all__ = ["DECODE_ERRORS", "ImageList", "ImageReadError", "read_rgb", "unreadable_image"]


class ImageReadError(OSError):
    """An image file cannot be decoded: damaged, truncated, not an image, or too many pixels (a decompression
    bomb). The message names the file and says what to do; the data module adds the task's name."""

    def in_task(self, task: str) -> ImageReadError:
        """The same error, naming the task whose image it is."""
        return ImageReadError(f"task {task!r}: {self}")


DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError, Image.DecompressionBombWarning,
)  # fmt: skip
"""What decoding a file may raise: Pillow's errors (OSError, UnidentifiedImageError, SyntaxError and EOFError
from damaged data, ValueError from odd modes) and its decompression-bomb error, or its warning when a caller's
filters turn warnings into errors."""


def read_rgb(path: str | Path) -> Image.Image:
    """The image file at ``path`` decoded (truncated files fail here) as 8-bit RGB (16-bit grayscale scaled).

    Raises:
        PIL.Image.DecompressionBombError: the file declares more pixels than ``PIL.Image.MAX_IMAGE_PIXELS``
            (read when called, never changed here). Pillow itself only warns up to twice that limit and
            decodes the image; here that is an error too: such an image costs hundreds of megabytes per
            decode in every worker only to be resized to a few hundred pixels, a merging dataset has none,
            and the warning would be lost in a DataLoader worker's log. Whoever trusts such files raises
            the limit in their own script.
    """
    with Image.open(path) as opened:
        limit = Image.MAX_IMAGE_PIXELS
        width, height = opened.size
        if limit is not None and width * height > limit:
            raise Image.DecompressionBombError(
                f"it declares {width} x {height} = {width * height} pixels, more than Pillow's limit of {limit} "
                "(PIL.Image.MAX_IMAGE_PIXELS), so it may be a decompression bomb"
            )
        return to_rgb(opened)


def unreadable_image(path: str | Path, error: BaseException, where: str = "") -> ImageReadError:
    """The :class:`ImageReadError` for ``path`` that failed to decode with ``error``: what went wrong and what to do."""
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        advice = ("replace it with a downscaled copy (the model sees a few hundred pixels a side), or remove it "
                  "from the dataset")
    else:
        advice = "the file is damaged, truncated or not an image: replace it with an intact copy, or remove it"
    return ImageReadError(f"cannot read image file {str(path)!r}{where}: {str(error).rstrip('.')}; {advice}.")


class ImageList(Dataset):
    """``(transform(image), label)`` over a list of ``(image path, label)``, each file read with :func:`read_rgb`;
    a file that cannot be read raises an :class:`ImageReadError` naming it and the item."""

    def __init__(self, samples: Sequence[tuple[Path, int]], transform: Callable[[Image.Image], Any]) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        try:
            image = read_rgb(path)
        except DECODE_ERRORS as error:
            raise unreadable_image(path, error, f" (item {index})") from error
        return self.transform(image), label
