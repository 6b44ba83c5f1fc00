"""Reading checkpoints in every format and picking an encoder's weights out of them."""

from __future__ import annotations

import copy
import math
import pickle
import random
import sys
from collections.abc import Mapping
from pathlib import Path

import open_clip
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from helpers import TINY_CLIP, TINY_CLIP_MODEL, TINY_TIMM_MODEL
from lit_adamerging.models.checkpoints import (
    CHECKPOINT_SUFFIXES,
    CheckpointError,
    read_checkpoint,
    select_encoder_weights,
)
from lit_adamerging.models.encoders import create_encoder


# ------------------------------------------------------------------------------------------- helpers
def tiny_clip(seed: int = 0, **kwargs) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.create_model(TINY_CLIP_MODEL, **kwargs).eval()


def tiny_effnet(seed: int = 0, num_classes: int = 0) -> nn.Module:
    """timm test_efficientnet with random batch-norm statistics and counters (so they are checked too)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(TINY_TIMM_MODEL, num_classes=num_classes).eval()
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name.endswith("running_mean"):
                    buffer.normal_()
                elif name.endswith("running_var"):
                    buffer.uniform_(0.5, 1.5)
                elif name.endswith("num_batches_tracked"):
                    buffer.fill_(seed + 3)
    return model


def save(state: Mapping[str, object], path: Path) -> Path:
    """``.safetensors`` via safetensors, anything else via ``torch.save``."""
    if path.suffix == ".safetensors":
        save_file({key: value.contiguous().clone() for key, value in state.items()}, str(path))
    else:
        torch.save(dict(state), path)
    return path


def assert_same(selected: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> None:
    """Same keys in the same order, and tensor by tensor the same dtype, shape and values."""
    assert list(selected) == list(reference)
    for key, value in reference.items():
        assert selected[key].dtype == value.dtype, key
        assert torch.equal(selected[key], value), key


def prefixed(prefix: str, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {prefix + key: value for key, value in state.items()}


@pytest.fixture(scope="module")
def clip() -> nn.Module:
    return tiny_clip(seed=1)


@pytest.fixture(scope="module")
def expected_visual() -> dict[str, Tensor]:
    """The state dict of a *differently* seeded encoder: selections must not echo it back."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        return create_encoder(TINY_CLIP).state_dict()


# ------------------------------------------------------------------------------- formats and layouts
LAYOUTS = {
    "whole-clip": lambda clip: clip.state_dict(),
    "image-tower": lambda clip: clip.visual.state_dict(),
    "module.whole-clip": lambda clip: prefixed("module.", clip.state_dict()),
    "model.image-tower": lambda clip: prefixed("model.", clip.visual.state_dict()),
}


@pytest.mark.parametrize("suffix", CHECKPOINT_SUFFIXES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_format_and_layout(tmp_path, clip, expected_visual, suffix, layout):
    state = LAYOUTS[layout](clip)
    path = save(state, tmp_path / f"weights{suffix}")
    loaded = read_checkpoint(path)
    assert set(loaded) == set(state)
    selected = select_encoder_weights(loaded, expected_visual, source=str(path))
    assert_same(selected, clip.visual.state_dict())


def test_whole_clip_against_whole_clip(tmp_path, clip):
    """A zoo loading a whole pretrained CLIP expects all of it, text tower and logit_scale included."""
    path = save(prefixed("module.", clip.state_dict()), tmp_path / "clip.safetensors")
    selected = select_encoder_weights(read_checkpoint(path), tiny_clip(seed=9).state_dict(), source=str(path))
    assert_same(selected, clip.state_dict())


@pytest.mark.parametrize("container", ["state_dict", "model_state_dict", "model", "module", "ema"])
def test_containers_are_unwrapped(tmp_path, clip, expected_visual, container):
    inner = prefixed("model.", clip.visual.state_dict()) if container == "state_dict" else clip.visual.state_dict()
    path = tmp_path / "run.ckpt"
    torch.save({container: inner, "epoch": 1, "global_step": 10, "optimizer_states": [], "lr": 0.1}, path)
    loaded = read_checkpoint(path)
    assert set(loaded) == set(inner)
    assert_same(select_encoder_weights(loaded, expected_visual, source=str(path)), clip.visual.state_dict())


def test_float16_checkpoint_is_cast_to_the_encoder_dtype(tmp_path, clip, expected_visual):
    half = {key: value.half() for key, value in clip.visual.state_dict().items()}
    path = save(half, tmp_path / "half.safetensors")
    selected = select_encoder_weights(read_checkpoint(path), expected_visual, source=str(path))
    assert_same(selected, {key: value.float() for key, value in half.items()})


def test_timm_whole_model_with_classifier_and_batch_norm(tmp_path):
    model = tiny_effnet(seed=1, num_classes=7)
    expected = tiny_effnet(seed=5).state_dict()  # the backbone: no classifier
    path = save(prefixed("module.", model.state_dict()), tmp_path / "effnet.pth")
    selected = select_encoder_weights(read_checkpoint(path), expected, source=str(path))
    reference = {key: value for key, value in model.state_dict().items() if key in expected}
    assert_same(selected, reference)
    assert all(selected[key].item() == 4 for key in selected if key.endswith("num_batches_tracked"))


def test_absent_num_batches_tracked_is_taken_from_the_encoder(tmp_path):
    model = tiny_effnet(seed=1)
    expected = tiny_effnet(seed=5).state_dict()
    state = {key: value for key, value in model.state_dict().items() if not key.endswith("num_batches_tracked")}
    path = save(state, tmp_path / "no_counters.safetensors")
    selected = select_encoder_weights(read_checkpoint(path), expected, source=str(path))
    reference = {key: expected[key] if key.endswith("num_batches_tracked") else value
                 for key, value in model.state_dict().items()}
    assert_same(selected, reference)


def test_missing_ok_keys_are_taken_from_the_encoder(clip, expected_visual):
    state = {key: value for key, value in clip.visual.state_dict().items() if key != "proj"}
    selected = select_encoder_weights(state, expected_visual, source="no_proj", missing_ok={"proj"})
    assert_same(selected, {**clip.visual.state_dict(), "proj": expected_visual["proj"]})


# ----------------------------------------------------------------------------------- pickled objects
SAVE_FORMATS = {  # torch.save's default; pickle protocol 4, which torch's weights-only reader cannot parse; pre-1.6
    "zip": ({}, r"the file holds pickled Python objects \(it references open_clip\.model\.CLIP\)"),
    "zip-protocol-4": ({"pickle_protocol": 4}, r"torch's weights-only reader cannot read the file"),
    "legacy": ({"_use_new_zipfile_serialization": False}, r"the file holds pickled Python objects"),
}


@pytest.mark.parametrize("save_format", list(SAVE_FORMATS))
def test_pickled_module_needs_allow_pickle(tmp_path, clip, expected_visual, save_format):
    save_kwargs, refusal = SAVE_FORMATS[save_format]
    path = tmp_path / "whole_module.pt"
    torch.save(clip, path, **save_kwargs)
    with pytest.raises(CheckpointError, match=rf"whole_module\.pt: {refusal}.*allow_pickle: true"):
        read_checkpoint(path)
    loaded = read_checkpoint(path, allow_pickle=True)
    assert_same(loaded, clip.state_dict())
    assert_same(select_encoder_weights(loaded, expected_visual, source=str(path)), clip.visual.state_dict())


MODELING_SOURCE = '''
"""Laid out like the task_vectors release's src/modeling.py when it saved finetuned.pt and the heads."""
import torch
from torchvision import transforms


def to_rgb(image):
    """A plain function in the preprocessing, as open_clip's transforms of that time had."""
    return image.convert("RGB")


def preprocess(is_train):
    crop = transforms.RandomResizedCrop(32, scale=(0.9, 1.0)) if is_train else transforms.CenterCrop(32)
    return transforms.Compose([
        transforms.Resize(32, interpolation=transforms.InterpolationMode.BICUBIC),
        crop,
        to_rgb,
        transforms.ToTensor(),
        transforms.Normalize((0.48, 0.46, 0.41), (0.27, 0.26, 0.28)),
    ])


class Vocabulary:
    """A tokenizer-like object: tables of strings, ids and bytes."""

    def __init__(self):
        self.encoder = {"a</w>": 0, "b</w>": 1, "ab</w>": 2}
        self.decoder = {index: token for token, index in self.encoder.items()}
        self.ranks = {("a", "b</w>"): 0}
        self.byte_table = bytes(range(32))


class ImageEncoder(torch.nn.Module):
    """A whole open_clip CLIP under .model, its text transformer deleted, with the preprocessing."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.train_preprocess = preprocess(True)
        self.val_preprocess = preprocess(False)
        self.tokenizer = Vocabulary()
        self.cache_dir = "/somewhere/else"
        del self.model.transformer

    def forward(self, images):
        return self.model.encode_image(images)


class ClassificationHead(torch.nn.Linear):
    """A zero-shot head: a Linear layer that may normalise its input."""

    def __init__(self, normalize, weights, biases):
        super().__init__(weights.shape[1], weights.shape[0])
        self.normalize = normalize
        with torch.no_grad():
            self.weight.copy_(weights)
            self.bias.copy_(biases)

    def forward(self, features):
        if self.normalize:
            features = features / features.norm(dim=-1, keepdim=True)
        return super().forward(features)


class Holder:
    """A plain object (not a module) holding the model, as some training scripts save."""

    def __init__(self, model):
        self.model = model
        self.epoch = 3
'''


def test_task_vectors_release_layout(tmp_path, clip, expected_visual):
    """finetuned.pt and head files as the release wrote them: torch.save of module trees whose classes are gone."""
    package = tmp_path / "code" / "src"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "modeling.py").write_text(MODELING_SOURCE)
    assert "src" not in sys.modules
    sys.path.insert(0, str(package.parent))
    try:
        from src.modeling import ClassificationHead, Holder, ImageEncoder  # type: ignore[import-not-found]

        image_encoder = ImageEncoder(copy.deepcopy(clip))
        head = ClassificationHead(True, torch.randn(5, 16), torch.randn(5))
        torch.save(image_encoder, tmp_path / "finetuned.pt")
        torch.save(head, tmp_path / "head_Cars.pt")
        torch.save(Holder(image_encoder), tmp_path / "holder.pt")
    finally:
        sys.path.remove(str(package.parent))
        for name in ("src.modeling", "src"):
            sys.modules.pop(name, None)
    with pytest.raises(ModuleNotFoundError):
        __import__("src.modeling")

    path = tmp_path / "finetuned.pt"
    with pytest.raises(CheckpointError, match=r"finetuned\.pt.*src\.modeling\.ImageEncoder.*allow_pickle"):
        read_checkpoint(path)
    loaded = read_checkpoint(path, allow_pickle=True)
    assert "src" not in sys.modules
    assert_same(loaded, image_encoder.state_dict())  # every weight, in order; the text transformer is gone
    assert not any(key.startswith("model.transformer.") for key in loaded)
    assert_same(select_encoder_weights(loaded, expected_visual, source=str(path)), clip.visual.state_dict())
    assert_same(read_checkpoint(tmp_path / "head_Cars.pt", allow_pickle=True), head.state_dict())
    held = read_checkpoint(tmp_path / "holder.pt", allow_pickle=True)  # .model of a plain object
    assert_same(held, image_encoder.state_dict())


# -------------------------------------------------------------------------------- Hugging Face folders
HF_CLASSES = ["CLIPVisionModelWithProjection", "CLIPVisionModel", "CLIPModel"]


def _hf_model(transformers, kind: str) -> nn.Module:
    vision = dict(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,  # open_clip: mlp_ratio 4
        image_size=32, patch_size=8, projection_dim=32, hidden_act="quick_gelu",
    )
    torch.manual_seed(0)
    if kind == "CLIPModel":
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
        config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
        return transformers.CLIPModel(config).eval()
    return getattr(transformers, kind)(transformers.CLIPVisionConfig(**vision)).eval()


@pytest.mark.parametrize("kind", HF_CLASSES)
def test_hugging_face_clip_folder(tmp_path, kind):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install '.[hf]')")
    model = _hf_model(transformers, kind)
    folder = tmp_path / kind
    model.save_pretrained(folder)
    if kind == "CLIPVisionModel":  # also transformers 4's layout: pytorch_model.bin, keys under vision_model.
        weights = folder / "model.safetensors"
        state = load_file(str(weights))
        torch.save({k if k.startswith("vision_model.") else f"vision_model.{k}": v for k, v in state.items()},
                   folder / "pytorch_model.bin")
        weights.unlink()

    encoder = create_encoder(TINY_CLIP, force_quick_gelu=True)
    expected = encoder.state_dict()
    state = read_checkpoint(folder)
    has_projection = kind != "CLIPVisionModel"
    assert set(state) == set(expected) - (set() if has_projection else {"proj"})
    selected = select_encoder_weights(state, expected, source=str(folder), missing_ok={"proj"})
    assert list(selected) == list(expected)
    encoder.load_state_dict(selected)

    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        vision_model = getattr(model, "vision_model", model)  # transformers 5's CLIPVisionModel is the tower
        pooled = vision_model(pixel_values=images).pooler_output
        if has_projection:
            theirs = model.visual_projection(pooled)
        else:
            theirs = pooled
            encoder.proj = None  # open_clip's pooled output before the projection
        ours = encoder(images)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    if kind == "CLIPVisionModelWithProjection":
        with torch.no_grad():
            torch.testing.assert_close(ours, model(pixel_values=images).image_embeds, atol=1e-5, rtol=1e-5)


def test_hugging_face_vision_model_without_projection_needs_missing_ok(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install '.[hf]')")
    folder = tmp_path / "hf_vision"
    _hf_model(transformers, "CLIPVisionModel").save_pretrained(folder)
    expected = create_encoder(TINY_CLIP).state_dict()
    with pytest.raises(CheckpointError, match=r"hf_vision.*1 of the encoder's \d+ keys are missing.*'proj'"):
        select_encoder_weights(read_checkpoint(folder), expected, source=str(folder))
    # the weights file on its own keeps Hugging Face's names: a hint says to give the folder
    weights = folder / "model.safetensors"
    hint = r"model\.safetensors: .*keys.*Hugging Face CLIP weights: give the model folder"
    with pytest.raises(CheckpointError, match=hint):
        select_encoder_weights(read_checkpoint(weights), expected, source=str(weights))


# --------------------------------------------------------------------------------------------- errors
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.safetensors does not exist"):
        read_checkpoint(tmp_path / "nowhere.safetensors")


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"\x00" * 8)
    with pytest.raises(CheckpointError, match=r"weights\.npz: unsupported checkpoint file type '\.npz'"):
        read_checkpoint(path)


def test_file_without_tensors(tmp_path):
    path = tmp_path / "metadata.pt"
    torch.save({"epoch": 1, "lr": 0.1, "state_dict": {}}, path)
    with pytest.raises(CheckpointError, match=r"metadata\.pt: found no tensors.*\['epoch', 'lr', 'state_dict'\]"):
        read_checkpoint(path)
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    with pytest.raises(CheckpointError, match=r"empty\.safetensors: the safetensors file holds no tensors"):
        read_checkpoint(empty)


@pytest.mark.parametrize("suffix", CHECKPOINT_SUFFIXES)
def test_corrupt_file(tmp_path, suffix):
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(b"definitely not a checkpoint" * 3)
    for allow_pickle in (False, True):
        with pytest.raises(CheckpointError, match=rf"corrupt\{suffix}: not a readable") as error:
            read_checkpoint(path, allow_pickle=allow_pickle)
        assert "allow_pickle" not in str(error.value)


def _truncated(path: Path, keep: float) -> bytes:
    torch.save({"weight": torch.ones(1000)}, path)
    data = path.read_bytes()
    return data[: int(len(data) * keep)]


def _torchscript(path: Path) -> bytes:
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(path))
    return path.read_bytes()


NOT_CHECKPOINTS = {  # file contents -> what the error says about them
    **{
        f"random-{seed}": (lambda path, seed=seed: random.Random(seed).randbytes(4096), r"\(\w+Error: ")
        for seed in range(4)
    },
    "truncated-zip": (lambda path: _truncated(path, 0.5), r"failed finding central directory"),
    "zip-without-its-end": (lambda path: _truncated(path, 0.99), r"\(\w+Error: "),
    "empty": (lambda path: b"", r"the file is empty"),
    "raw-pickle": (lambda path: pickle.dumps({"weight": [1.0, 2.0]}), r"\(\w+Error: "),
    "torchscript": (lambda path: _torchscript(path), r"TorchScript archives"),  # never handed to torch.jit.load
}


@pytest.mark.parametrize("allow_pickle", [False, True])
@pytest.mark.parametrize("kind", list(NOT_CHECKPOINTS))
def test_not_a_checkpoint_is_not_told_to_allow_pickle(tmp_path, kind, allow_pickle):
    contents, reason = NOT_CHECKPOINTS[kind]
    path = tmp_path / "model.pt"
    path.write_bytes(contents(path))
    with pytest.raises(CheckpointError, match=rf"model\.pt: not a readable PyTorch checkpoint .*{reason}") as error:
        read_checkpoint(path, allow_pickle=allow_pickle)
    assert "allow_pickle" not in str(error.value)


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(CheckpointError, match=r"stuff: a folder, but not a Hugging Face model folder"):
        read_checkpoint(tmp_path / "stuff")
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text('{"model_type": "clip"}')
    with pytest.raises(CheckpointError, match=r"no_weights: Hugging Face model folder without weights"):
        read_checkpoint(tmp_path / "no_weights")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    save_file({"embeddings.word_embeddings.weight": torch.zeros(3, 2)}, str(tmp_path / "bert" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"bert: not a Hugging Face CLIP model \(model_type 'bert'\)"):
        read_checkpoint(tmp_path / "bert")


def test_missing_key(clip, expected_visual):
    state = prefixed("visual.", clip.visual.state_dict())
    del state["visual.ln_post.bias"]
    message = r"ft\.pt: 1 of the encoder's 32 keys are missing.*'visual\.'.*ln_post\.bias"
    with pytest.raises(CheckpointError, match=message):
        select_encoder_weights(state, expected_visual, source="ft.pt")


def test_missing_keys_of_a_different_architecture():
    state = tiny_effnet().state_dict()
    expected = timm.create_model("test_efficientnet_evos", num_classes=0).state_dict()
    with pytest.raises(CheckpointError, match=r"evos\.pt: \d+ of the encoder's 56 keys are missing.*\(and \d+ more\)"):
        select_encoder_weights(state, expected, source="evos.pt")


def test_nonsense_prefix_finds_nothing(clip, expected_visual):
    state = {f"visual/{key}": value for key, value in clip.visual.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"slashes\.pt: none of the encoder's 32 keys.*'visual/class_embedding'"):
        select_encoder_weights(state, expected_visual, source="slashes.pt")


def test_unrelated_architecture_finds_nothing():
    state = timm.create_model("test_vit", num_classes=0).state_dict()
    with pytest.raises(CheckpointError, match=r"vit\.pt: none of the encoder's 86 keys"):
        select_encoder_weights(state, tiny_effnet().state_dict(), source="vit.pt")


def test_shape_mismatch():
    state = timm.create_model("test_vit", num_classes=0).state_dict()  # 160 px: 101 positions
    expected = timm.create_model("test_vit", num_classes=0, img_size=64).state_dict()  # 17 positions
    with pytest.raises(CheckpointError, match=r"vit160\.pt: shape mismatch for 'pos_embed': checkpoint \[1, 101, 64\] "
                                              r"vs encoder \[1, 17, 64\]"):
        select_encoder_weights(state, expected, source="vit160.pt")


def test_deeper_checkpoint(clip, expected_visual):
    state = prefixed("visual.", clip.visual.state_dict())
    for key, value in clip.visual.state_dict().items():
        if key.startswith("transformer.resblocks.1."):
            state["visual." + key.replace(".1.", ".2.", 1)] = value
    with pytest.raises(CheckpointError, match=r"deep\.pt: the checkpoint has layers the encoder lacks.*resblocks\.2\."):
        select_encoder_weights(state, expected_visual, source="deep.pt")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_values(clip, expected_visual, dtype, bad):
    state = {key: value.to(dtype) for key, value in clip.visual.state_dict().items()}
    state["ln_pre.weight"] = state["ln_pre.weight"].clone()
    state["ln_pre.weight"][3] = bad
    with pytest.raises(CheckpointError, match=r"nan\.pt: 'ln_pre\.weight' has NaN or infinite values"):
        select_encoder_weights(state, expected_visual, source="nan.pt")


def test_overflow_when_casting(expected_visual):
    state = {key: value.double() for key, value in expected_visual.items()}
    state["proj"] = state["proj"] * 1e300
    with pytest.raises(CheckpointError, match=r"big\.pt: 'proj' overflows to infinity when cast from torch\.float64"):
        select_encoder_weights(state, expected_visual, source="big.pt")


def test_integer_and_float_do_not_mix():
    model = tiny_effnet()
    state = model.state_dict()
    key = next(key for key in state if key.endswith("num_batches_tracked"))
    state[key] = state[key].float()
    message = rf"int\.pt: '{key}' has dtype torch\.float32 but the encoder's is torch\.int64"
    with pytest.raises(CheckpointError, match=message):
        select_encoder_weights(state, model.state_dict(), source="int.pt")
