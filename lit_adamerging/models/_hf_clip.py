"""Hugging Face CLIP folders: read their weights (possibly sharded) and rename the image tower to open_clip's keys.

A folder saved by transformers' ``save_pretrained`` of a ``CLIPVisionModel``,
``CLIPVisionModelWithProjection`` or ``CLIPModel`` holds ``config.json`` and ``model.safetensors`` or
``pytorch_model.bin`` (or a shard index naming shards beside it); its image tower is returned under the keys
of open_clip's ``VisionTransformer``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lit_adamerging.limits import open_regular_file
from lit_adamerging.models._errors import CheckpointError

__all__ = ["HF_WEIGHT_FILES", "convert_hf_clip_vision", "hf_vision_prefix", "read_hf_clip_folder"]

HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
ReadFile = Callable[[Path], dict[str, Tensor]]  # one weights file into a flat dict

_HF_LAYER = {  # a layer weight's open_clip name: its Hugging Face name
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}


def read_hf_clip_folder(folder: Path, read_file: ReadFile) -> dict[str, Tensor]:
    """The image tower of the Hugging Face CLIP model saved in ``folder``, under open_clip ``VisionTransformer`` keys.

    Args:
        folder: a folder holding ``config.json``.
        read_file: reads one weights file (``.safetensors`` or ``.bin``) of the folder into a flat dict.

    Raises:
        CheckpointError: the config is not a JSON object, the folder holds no weights, a shard index is damaged
            or names a missing file or one outside the folder, or the weights are not a CLIP image tower.
    """
    config_file = folder / "config.json"
    config = _read_json(config_file, "Hugging Face config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: not a Hugging Face config (a JSON object); the folder is damaged.")
    state: dict[str, Tensor] | None = None
    for name in HF_WEIGHT_FILES:
        if (folder / name).exists():  # not is_file(): a FIFO or folder there is refused, not passed over
            state = _read_hf_weights(folder / name, read_file)
            break
    if state is None:
        raise CheckpointError(
            f"{folder}: Hugging Face model folder without weights; expected one of {list(HF_WEIGHT_FILES)}."
        )
    return convert_hf_clip_vision(state, source=str(folder), model_type=str(config.get("model_type")))


def _read_json(file: Path, what: str) -> Any:
    with open_regular_file(file, what) as handle:
        try:
            return json.loads(handle.read())
        except (OSError, ValueError, RecursionError) as error:
            raise CheckpointError(f"{file}: not a readable JSON {what} ({type(error).__name__}: {error}).") from error


def _read_hf_weights(file: Path, read_file: ReadFile) -> dict[str, Tensor]:
    if not file.name.endswith(".index.json"):
        return read_file(file)
    index = _read_json(file, "shard index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
        raise CheckpointError(
            f"{file}: not a shard index: it needs a 'weight_map' of weight names to shard file names; the folder "
            "is damaged, so download it again."
        )
    state: dict[str, Tensor] = {}
    for shard in dict.fromkeys(weight_map.values()):
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(
                f"{file}: the shard {shard!r} is not a file name in the folder; a shard index names files beside "
                "it, so the index is damaged or crafted."
            )
        if not (file.parent / shard).exists():
            raise CheckpointError(
                f"{file}: the shard {shard!r} it names is not in the folder; the download is incomplete, so "
                "download the folder again."
            )
        state.update(read_file(file.parent / shard))
    return state


def hf_vision_prefix(state: Mapping[str, Tensor]) -> str | None:
    """The prefix of a Hugging Face CLIP vision tower's keys (``"vision_model."`` or ``""``), if any."""
    marker = "embeddings.patch_embedding.weight"
    prefixes = [key[: -len(marker)] for key in state if key.endswith(marker)]
    prefixes = sorted((p for p in prefixes if p + "pre_layrnorm.weight" in state), key=len)
    return prefixes[0] if prefixes else None


def convert_hf_clip_vision(state: Mapping[str, Tensor], *, source: str, model_type: str) -> dict[str, Tensor]:
    """Rename a Hugging Face CLIP image tower to open_clip ``VisionTransformer`` keys."""
    prefix = hf_vision_prefix(state)
    if prefix is None:
        raise CheckpointError(
            f"{source}: not a Hugging Face CLIP model (model_type {model_type!r}): no "
            "'vision_model.embeddings.patch_embedding.weight' / 'vision_model.pre_layrnorm.weight'; only "
            "CLIPVisionModel, CLIPVisionModelWithProjection and CLIPModel folders are supported."
        )

    def take(key: str) -> Tensor:
        if key not in state:
            raise CheckpointError(
                f"{source}: Hugging Face CLIP weights lack {key!r}; the folder is incomplete or not a CLIP model."
            )
        return state[key]

    embeddings = f"{prefix}embeddings."
    out: dict[str, Tensor] = {
        "class_embedding": take(f"{embeddings}class_embedding"),
        "positional_embedding": take(f"{embeddings}position_embedding.weight"),
        "proj": torch.empty(0),  # placeholder keeping open_clip's key order; set or removed below
        "conv1.weight": take(f"{embeddings}patch_embedding.weight"),
        "ln_pre.weight": take(f"{prefix}pre_layrnorm.weight"),
        "ln_pre.bias": take(f"{prefix}pre_layrnorm.bias"),
    }
    pattern = re.compile(re.escape(f"{prefix}encoder.layers.") + r"(\d+)\.")
    layers = sorted({int(m.group(1)) for key in state if (m := pattern.match(key))})
    if layers != list(range(len(layers))):
        raise CheckpointError(f"{source}: Hugging Face CLIP encoder layers {layers} are not numbered 0..n-1.")
    for i in layers:
        hf = f"{prefix}encoder.layers.{i}."
        ours = f"transformer.resblocks.{i}."
        attention = f"{hf}self_attn."
        out[ours + "ln_1.weight"] = take(hf + _HF_LAYER["ln_1.weight"])
        out[ours + "ln_1.bias"] = take(hf + _HF_LAYER["ln_1.bias"])
        out[ours + "attn.in_proj_weight"] = torch.cat([take(f"{attention}{p}_proj.weight") for p in "qkv"], dim=0)
        out[ours + "attn.in_proj_bias"] = torch.cat([take(f"{attention}{p}_proj.bias") for p in "qkv"], dim=0)
        for name in list(_HF_LAYER)[2:]:
            out[ours + name] = take(hf + _HF_LAYER[name])
    out["ln_post.weight"] = take(f"{prefix}post_layernorm.weight")
    out["ln_post.bias"] = take(f"{prefix}post_layernorm.bias")
    projection = state.get("visual_projection.weight")
    if projection is None:
        del out["proj"]
    else:
        out["proj"] = projection.t().contiguous()
    return out

