"""One factory for the encoders that get merged: ``"open_clip:<name>"`` or ``"timm:<name>"``.

For open_clip the encoder is the CLIP image tower (``model.visual``); for timm it is the backbone
without its classifier (``num_classes=0``), returning pooled features. ``test-vit-tiny`` is a
two-block open_clip ViT for tests, registered with open_clip when this module is imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import open_clip
import timm
from torch import nn

open_clip.add_model_config(Path(__file__).parent / "open_clip_configs")

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
        return open_clip.create_model(model, pretrained=pretrained, **kwargs).visual.eval()
    if pretrained is not None:
        raise ValueError(f"timm encoder {model!r}: give pretrained weights as a state dict file to the zoo instead.")
    if not timm.is_model(model):
        raise ValueError(f"unknown timm model {model!r}; timm.list_models() lists the known names.")
    return timm.create_model(model, pretrained=False, num_classes=0, **kwargs).eval()


def check_open_clip_model(model: str) -> None:
    """Raise a clear error unless open_clip knows the model name."""
    if model not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model!r}; open_clip.list_models() lists the known names.")


def feature_dim(encoder: nn.Module) -> int:
    """Width of the features the encoder returns (open_clip ``output_dim``, timm ``num_features``)."""
    for attribute in ("output_dim", "num_features"):
        value = getattr(encoder, attribute, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot tell the feature width of {type(encoder).__name__}: it has no output_dim/num_features.")
