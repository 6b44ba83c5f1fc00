"""Models: the encoder factory, the task heads and the zoos that load pretrained and fine-tuned weights."""

from lit_adamerging.models.encoders import create_encoder, encoder_preprocess, feature_dim
from lit_adamerging.models.heads import ClassificationHead
from lit_adamerging.models.preprocess import Preprocess
from lit_adamerging.models.zoo import LazyStateDicts, LoadedZoo, ModelZoo, OpenCLIPZoo, StateDictZoo, SyntheticZoo, TimmZoo

__all__ = [
    "ClassificationHead",
    "LazyStateDicts",
    "LoadedZoo",
    "ModelZoo",
    "OpenCLIPZoo",
    "Preprocess",
    "StateDictZoo",
    "SyntheticZoo",
    "TimmZoo",
    "create_encoder",
    "encoder_preprocess",
    "feature_dim",
]
