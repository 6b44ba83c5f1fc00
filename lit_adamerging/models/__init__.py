"""Models: the encoder factory, the task heads and the zoos that load pretrained and fine-tuned weights."""

from lit_adamerging.models.encoders import create_encoder, feature_dim
from lit_adamerging.models.heads import ClassificationHead
from lit_adamerging.models.zoo import LoadedZoo, ModelZoo, StateDictZoo, SyntheticZoo, load_state_dict_file

__all__ = [
    "ClassificationHead",
    "LoadedZoo",
    "ModelZoo",
    "StateDictZoo",
    "SyntheticZoo",
    "create_encoder",
    "feature_dim",
    "load_state_dict_file",
]
