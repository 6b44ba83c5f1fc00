"""The eval preprocessing an encoder expects, as a small frozen description.

:class:`Preprocess` turns PIL images into normalised tensors; :func:`encoder_preprocess` reads the
right one for an open_clip or timm model from the library's own configuration (no weights loaded),
so the data follow the model without the user repeating image size, mean and std.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB, 16-bit grayscale scaled to ``round(value * 255 / 65535)``.

    Pillow opens 16-bit grayscale PNGs as mode ``I;16`` (``I;16B`` from other formats, ``I`` from
    16-bit PGM) and its own conversion clips those values at 255. A mode ``I`` image with values
    outside 0..65535 is not a 16-bit image: ValueError.
    """
    if image.mode != "I" and not image.mode.startswith("I;16"):
        return image.convert("RGB")
    values = np.asarray(image)
    if image.mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
        raise ValueError(
            f"32-bit integer pixels from {values.min()} to {values.max()} are not a 16-bit image; "
            "convert the file to 8 or 16 bits per channel."
        )
    # round(v * 255 / 65535) in integers: v / 257 is never halfway between two integers.
    eight = (values.astype(np.uint32) * 255 + 32767) // 65535
    return Image.fromarray(eight.astype(np.uint8)).convert("RGB")


class _ConvertRGB:
    """PIL image -> RGB PIL image with :func:`to_rgb` (grey, 16-bit, palette, RGBA: 3 channels). Picklable."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == "RGB" else to_rgb(image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@dataclass(frozen=True)
class Preprocess:
    """Eval preprocessing of a task's images; :meth:`transform` builds the torchvision transform.

    The defaults are CLIP's eval preprocessing: convert to RGB, resize the shorter side to
    ``image_size`` (bicubic), center crop ``image_size``, ``ToTensor``, normalise with CLIP's mean
    and std. ``crop_pct`` < 1 resizes the shorter side to ``image_size / crop_pct`` before the crop
    (timm's eval preprocessing). With ``center_crop=False`` the image is resized to
    ``image_size x image_size`` instead (aspect ratio not kept; open_clip's ``"squash"``).

    Example:
        >>> from PIL import Image
        >>> Preprocess(image_size=32).transform()(Image.new("L", (28, 40))).shape
        torch.Size([3, 32, 32])
    """

    image_size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    center_crop: bool = True
    crop_pct: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"Preprocess.image_size must be a positive integer, got {self.image_size!r}.")
        object.__setattr__(self, "mean", self._three_floats("mean", self.mean, positive=False))
        object.__setattr__(self, "std", self._three_floats("std", self.std, positive=True))
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(
                f"Preprocess.interpolation must be 'bicubic' or 'bilinear', got {self.interpolation!r}."
            )
        if not isinstance(self.center_crop, bool):
            raise ValueError(f"Preprocess.center_crop must be true or false, got {self.center_crop!r}.")
        if isinstance(self.crop_pct, bool) or not isinstance(self.crop_pct, (int, float)) or not 0 < self.crop_pct <= 1:
            raise ValueError(f"Preprocess.crop_pct must be a number in (0, 1], got {self.crop_pct!r}.")
        object.__setattr__(self, "crop_pct", float(self.crop_pct))

    @staticmethod
    def _three_floats(field: str, value: Any, positive: bool) -> tuple[float, float, float]:
        what = "positive finite numbers" if positive else "finite numbers"
        message = f"Preprocess.{field} must be 3 {what} (one per RGB channel), got {value!r}."
        if isinstance(value, (str, bytes)):
            raise ValueError(message)
        try:
            numbers = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise ValueError(message) from None
        if len(numbers) != 3 or not all(math.isfinite(v) and (v > 0 or not positive) for v in numbers):
            raise ValueError(message)
        return numbers  # type: ignore[return-value]

    def resize(self) -> Callable[[Image.Image], Image.Image]:
        """PIL image -> RGB PIL image of ``image_size x image_size`` (the geometric part of the preprocessing)."""
        interpolation = {
            "bicubic": transforms.InterpolationMode.BICUBIC,
            "bilinear": transforms.InterpolationMode.BILINEAR,
        }[self.interpolation]
        if self.center_crop:
            steps = [
                transforms.Resize(
                    math.floor(self.image_size / self.crop_pct), interpolation=interpolation, antialias=True
                ),
                transforms.CenterCrop(self.image_size),
            ]
        else:
            size = (self.image_size, self.image_size)
            steps = [transforms.Resize(size, interpolation=interpolation, antialias=True)]
        return transforms.Compose([_ConvertRGB(), *steps])

    def decode(self) -> Callable[[Image.Image], Tensor]:
        """PIL image -> uint8 tensor ``[3, image_size, image_size]``: what the decoded test-set cache stores."""
        return transforms.Compose([self.resize(), transforms.PILToTensor()])

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 images ``[..., 3, H, W]`` -> float32 in the model's normalisation (on the images' device).

        The same operations as ``ToTensor`` + ``Normalize``, so decoded-then-normalised images equal
        :meth:`transform`'s output bit for bit.
        """
        mean = torch.tensor(self.mean, dtype=torch.float32, device=images.device)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32, device=images.device)[:, None, None]
        return images.to(torch.float32).div(255).sub(mean).div(std)

    def transform(self) -> Callable[[Image.Image], Tensor]:
        """PIL image -> normalised float tensor ``[3, image_size, image_size]``."""
        return transforms.Compose([self.decode(), self.normalize])
