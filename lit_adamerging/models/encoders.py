"""One factory for the encoders that get merged: ``"open_clip:<name>"`` or ``"timm:<name>"``.

For open_clip the encoder is the CLIP image tower (``model.visual``); for timm it is the backbone
without its classifier (``num_classes=0``), returning pooled features. ``test-vit-tiny`` is a
two-block open_clip ViT for tests, registered with open_clip the first time this module looks up
an open_clip model (:func:`register_open_clip_configs`), not on import.
:func:`encoder_preprocess` gives the eval preprocessing each such encoder expects.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import open_clip
import timm
from torch import nn

from lit_adamerging.models.preprocess import Preprocess

LIBRARIES = ("open_clip", "timm")


def split_encoder_name(name: str) -> tuple[str, str]:
    """``"timm:resnet18"`` -> ``("timm", "resnet18")``, with a clear error for anything else."""
    library, sep, model = name.partition(":")
    if not sep or library not in LIBRARIES or not model:
        raise ValueError(
            f"encoder {name!r} must be written '<library>:<model>' with library in {LIBRARIES}, "
            "e.g. 'open_clip:ViT-B-32' or 'timm:efficientnet_lite0'."
        )
    return library, model


class _NoRandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def untrained_open_clip(model: str, **kwargs: Any) -> nn.Module:
    """``open_clip.create_model(model)`` with random weights, meant to be replaced by a file's; without open_clip's
    notice that no pretrained weights were loaded (it logs one for every such model)."""
    notice = _NoRandomInitNotice()
    logging.getLogger().addFilter(notice)  # open_clip logs through the root logger
    try:
        return open_clip.create_model(model, **kwargs)
    finally:
        logging.getLogger().removeFilter(notice)


def create_encoder(name: str, pretrained: str | None = None, **kwargs: Any) -> nn.Module:
    """Build the encoder to merge, in eval mode.

    Args:
        name: ``"open_clip:<model>"`` or ``"timm:<model>"``.
        pretrained: an open_clip pretrained tag (``"openai"``) or weights file; for timm, ``None``
            (weights come from a state dict loaded by the zoo).
        kwargs: passed to ``open_clip.create_model`` or ``timm.create_model``.

    Example:
        >>> encoder = create_encoder("timm:test_efficientnet")
        >>> feature_dim(encoder)
        256
    """
    library, model = split_encoder_name(name)
    if library == "open_clip":
        check_open_clip_model(model)
        return untrained_open_clip(model, **kwargs).visual.eval() if pretrained is None else (
            open_clip.create_model(model, pretrained=pretrained, **kwargs).visual.eval()
        )
    if pretrained is not None:
        raise ValueError(f"timm encoder {model!r}: give pretrained weights as a state dict file to the zoo instead.")
    if not timm.is_model(model):
        raise ValueError(f"unknown timm model {model!r}; timm.list_models() lists the known names.")
    return timm.create_model(model, pretrained=False, num_classes=0, **kwargs).eval()


@functools.cache
def register_open_clip_configs() -> None:
    """Make open_clip know this package's model configs (``test-vit-tiny``); later calls do nothing."""
    open_clip.add_model_config(Path(__file__).parent / "open_clip_configs")


def check_open_clip_model(model: str) -> None:
    """Raise a clear error unless open_clip knows the model name (registering this package's configs first)."""
    register_open_clip_configs()
    if model not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model!r}; open_clip.list_models() lists the known names.")


def feature_dim(encoder: nn.Module) -> int:
    """Width of the features the encoder returns (open_clip ``output_dim``, timm ``num_features``)."""
    for attribute in ("output_dim", "num_features"):
        value = getattr(encoder, attribute, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot tell the feature width of {type(encoder).__name__}: it has no output_dim/num_features.")


def encoder_preprocess(
    name: str, pretrained: str | None = None, mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
) -> Preprocess:
    """The eval preprocessing of an encoder of :func:`create_encoder`, from its library's configuration.

    No weights are read. open_clip: the image size of the model's config; mean, std, interpolation
    and resize mode of the ``pretrained`` tag's config, or open_clip's defaults (OpenAI's mean and
    std, bicubic, shorter side resized then center-cropped) when ``pretrained`` is ``None`` or a
    file. timm: the model's default pretrained config (input size, mean, std, interpolation,
    ``crop_pct``). ``mean``/``std`` override the configuration's (weights trained with other
    normalisation).

    Example:
        >>> encoder_preprocess("open_clip:ViT-B-32", "openai").image_size
        224
        >>> encoder_preprocess("timm:efficientnet_lite0").crop_pct
        0.875
    """
    library, model = split_encoder_name(name)
    if library == "open_clip":
        check_open_clip_model(model)
        size = open_clip.get_model_config(model)["vision_cfg"].get("image_size", 224)
        tag_config = open_clip.get_pretrained_cfg(model, pretrained) if pretrained else {}
        resize_mode = tag_config.get("resize_mode", "shortest")
        config = {
            "size": size,
            "mean": open_clip.OPENAI_DATASET_MEAN,
            "std": open_clip.OPENAI_DATASET_STD,
            "interpolation": "bicubic",
            "crop_mode": "center" if resize_mode == "shortest" else resize_mode,
            "crop_pct": 1.0,
        }
        config.update({key: tag_config[key] for key in ("mean", "std", "interpolation") if key in tag_config})
    else:
        if not timm.is_model(model):
            raise ValueError(f"unknown timm model {model!r}; timm.list_models() lists the known names.")
        pretrained_cfg = timm.models.get_pretrained_cfg(model)
        defaults = pretrained_cfg.to_dict() if pretrained_cfg is not None else {}
        config = {
            "size": tuple(defaults.get("input_size", (3, 224, 224))[1:]),
            "mean": defaults.get("mean", timm.data.IMAGENET_DEFAULT_MEAN),
            "std": defaults.get("std", timm.data.IMAGENET_DEFAULT_STD),
            "interpolation": defaults.get("interpolation", "bicubic"),
            "crop_mode": defaults.get("crop_mode", "center"),
            "crop_pct": defaults.get("crop_pct", timm.data.DEFAULT_CROP_PCT),
        }
    size = config["size"]
    sizes = set(size) if isinstance(size, (tuple, list)) else {size}
    if len(sizes) != 1 or config["crop_mode"] not in ("center", "squash") or config["interpolation"] not in (
        "bicubic",
        "bilinear",
    ):
        raise ValueError(
            f"{name}: its eval preprocessing (input size {size}, {config['crop_mode']} crop, "
            f"{config['interpolation']} interpolation) is not one Preprocess describes (square images, center "
            "crop or squash, bicubic or bilinear); give each task a `preprocess` of its own."
        )
    squash = config["crop_mode"] == "squash"
    return Preprocess(
        image_size=int(sizes.pop()),
        mean=tuple(mean if mean is not None else config["mean"]),  # type: ignore[arg-type]
        std=tuple(std if std is not None else config["std"]),  # type: ignore[arg-type]
        interpolation=config["interpolation"],
        center_crop=not squash,
        crop_pct=1.0 if squash else float(config["crop_pct"]),
    )
