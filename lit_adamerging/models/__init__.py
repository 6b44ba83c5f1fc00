"""Models: the encoder factory, the task heads and the zoos that load pretrained and fine-tuned weights.

The names below are imported on first use (open_clip and timm only with the encoder factory and the zoos).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lit_adamerging._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "lit_adamerging.models.encoders": ["create_encoder", "encoder_preprocess", "feature_dim"],
    "lit_adamerging.models.heads": ["ClassificationHead"],
    "lit_adamerging.models.preprocess": ["Preprocess"],
    "lit_adamerging.models.zoo": [
        "LazyStateDicts", "LoadedZoo", "ModelZoo", "OpenCLIPZoo", "StateDictZoo", "SyntheticZoo", "TimmZoo",
    ],
})

if TYPE_CHECKING:
    from lit_adamerging.models.encoders import create_encoder as create_encoder
    from lit_adamerging.models.encoders import encoder_preprocess as encoder_preprocess
    from lit_adamerging.models.encoders import feature_dim as feature_dim
    from lit_adamerging.models.heads import ClassificationHead as ClassificationHead
    from lit_adamerging.models.preprocess import Preprocess as Preprocess
    from lit_adamerging.models.zoo import LazyStateDicts as LazyStateDicts
    from lit_adamerging.models.zoo import LoadedZoo as LoadedZoo
    from lit_adamerging.models.zoo import ModelZoo as ModelZoo
    from lit_adamerging.models.zoo import OpenCLIPZoo as OpenCLIPZoo
    from lit_adamerging.models.zoo import StateDictZoo as StateDictZoo
    from lit_adamerging.models.zoo import SyntheticZoo as SyntheticZoo
    from lit_adamerging.models.zoo import TimmZoo as TimmZoo
