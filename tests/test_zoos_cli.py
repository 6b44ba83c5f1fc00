"""fit + test through the console script on real-format checkpoints, and the exported encoder."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file

from helpers import TINY_CLIP, TINY_CLIP_MODEL, TINY_TIMM_MODEL, run_cli
from lit_adamerging import AdaMergingModule, OpenCLIPZoo, TimmZoo
from lit_adamerging.models import create_encoder

# every test runs the command in other processes (about 14 s each)
pytestmark = pytest.mark.slow

DATA = {
    "batch_size": 4,
    "eval_batch_size": 16,
    "tasks": {
        "alpha": {
            "class_path": "lit_adamerging.SyntheticTask",
            "init_args": {"num_classes": 3, "num_images": 12, "image_size": 32, "seed": 1},
        },
        "beta": {
            "class_path": "lit_adamerging.SyntheticTask",
            "init_args": {"num_classes": 2, "num_images": 8, "image_size": 32, "seed": 2},
        },
    },
}


def write_config(path: Path, zoo: dict) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 4,
            "enable_progress_bar": False,
            "logger": False,
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": "ckpt", "save_last": True},
                },
                {"class_path": "lit_adamerging.ExportMergedEncoder", "init_args": {"path": "merged.safetensors"}},
            ],
        },
        "model": {"zoo": zoo, "granularity": "layer"},
        "data": DATA,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def perturbed(state: dict, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        k: v + 0.02 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
        for k, v in state.items()
    }


def write_timm_checkpoints(tmp_path: Path, save) -> None:
    """base.pth (backbone) and, per task, a fine-tuned whole model written by ``save(model, task)``."""
    torch.manual_seed(0)
    base = timm.create_model(TINY_TIMM_MODEL, num_classes=0)
    torch.save(base.state_dict(), tmp_path / "base.pth")
    for seed, (task, classes) in enumerate((("alpha", 3), ("beta", 2)), start=1):
        model = timm.create_model(TINY_TIMM_MODEL, num_classes=classes)
        model.load_state_dict({**model.state_dict(), **perturbed(base.state_dict(), seed)})
        save(model, task)


def check_export(tmp_path: Path, module: AdaMergingModule, plain: torch.nn.Module) -> None:
    """The exported file loads strictly into the plain model and gives the module's logits."""
    plain.load_state_dict(load_file(str(tmp_path / "merged.safetensors")))
    plain.eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        module.on_test_start()
        for task in ("alpha", "beta"):
            torch.testing.assert_close(module.heads[task](plain(images)), module(images, task), rtol=1e-5, atol=1e-5)
        module.on_test_end()


def test_open_clip_checkpoints_fit_test_and_export(tmp_path):
    create_encoder(TINY_CLIP)
    torch.manual_seed(0)
    clip = open_clip.create_model(TINY_CLIP_MODEL)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    torch.save({f"module.{k}": v for k, v in perturbed(clip.state_dict(), 1).items()}, tmp_path / "alpha.pt")
    visual = perturbed(clip.visual.state_dict(), 2)
    torch.save({"state_dict": {f"model.{k}": v for k, v in visual.items()}, "epoch": 3}, tmp_path / "beta.ckpt")
    zoo = {
        "class_path": "lit_adamerging.OpenCLIPZoo",
        "init_args": {
            "model": TINY_CLIP_MODEL,
            "pretrained": "clip.safetensors",
            "finetuned": {"alpha": "alpha.pt", "beta": "beta.ckpt"},
            "class_names": {"alpha": ["cat", "dog", "bird"], "beta": ["day", "night"]},
            "head_cache_dir": "heads",
        },
    }
    config = write_config(tmp_path / "config.yaml", zoo)
    fit = run_cli(tmp_path, "fit", "--config", str(config))
    assert fit.returncode == 0, fit.stderr[-3000:]
    result = run_cli(tmp_path, "test", "--config", str(config), "--ckpt_path", "ckpt/last.ckpt")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test/acc/avg" in result.stdout
    assert len(list((tmp_path / "heads").glob("*.safetensors"))) == 2

    files = {"alpha": str(tmp_path / "alpha.pt"), "beta": str(tmp_path / "beta.ckpt")}
    names = zoo["init_args"]["class_names"]
    module = AdaMergingModule.load_from_checkpoint(
        tmp_path / "ckpt" / "last.ckpt",
        zoo=OpenCLIPZoo(TINY_CLIP_MODEL, files, pretrained=str(tmp_path / "clip.safetensors"),
                        class_names=names, head_cache_dir=str(tmp_path / "heads")),
    )
    check_export(tmp_path, module, open_clip.create_model(TINY_CLIP_MODEL).visual)


def test_timm_checkpoints_fit_test_and_export(tmp_path):
    write_timm_checkpoints(
        tmp_path,
        lambda model, task: save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / f"{task}.safetensors")
        ),
    )
    zoo = {
        "class_path": "lit_adamerging.TimmZoo",
        "init_args": {
            "model": TINY_TIMM_MODEL,
            "pretrained": "base.pth",
            "finetuned": {"alpha": "alpha.safetensors", "beta": "beta.safetensors"},
        },
    }
    config = write_config(tmp_path / "config.yaml", zoo)
    fit = run_cli(tmp_path, "fit", "--config", str(config))
    assert fit.returncode == 0, fit.stderr[-3000:]
    result = run_cli(tmp_path, "test", "--config", str(config), "--ckpt_path", "ckpt/last.ckpt")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test/acc/avg" in result.stdout

    files = {task: str(tmp_path / f"{task}.safetensors") for task in ("alpha", "beta")}
    module = AdaMergingModule.load_from_checkpoint(
        tmp_path / "ckpt" / "last.ckpt", zoo=TimmZoo(TINY_TIMM_MODEL, files, pretrained=str(tmp_path / "base.pth"))
    )
    check_export(tmp_path, module, timm.create_model(TINY_TIMM_MODEL, num_classes=0))


def test_pickled_checkpoint_refused_then_accepted_through_the_cli(tmp_path):
    write_timm_checkpoints(tmp_path, lambda model, task: torch.save(model, tmp_path / f"{task}.pt"))  # pickled modules
    zoo = {
        "class_path": "lit_adamerging.TimmZoo",
        "init_args": {"model": TINY_TIMM_MODEL, "pretrained": "base.pth",
                      "finetuned": {"alpha": "alpha.pt", "beta": "beta.pt"}},
    }
    config = write_config(tmp_path / "config.yaml", zoo)
    refused = run_cli(tmp_path, "fit", "--config", str(config))
    assert refused.returncode != 0
    assert "alpha.pt: the file holds pickled Python objects" in refused.stderr
    assert "allow_pickle" in refused.stderr
    accepted = run_cli(tmp_path, "fit", "--config", str(config), "--model.zoo.init_args.allow_pickle", "true")
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    assert (tmp_path / "merged.safetensors").is_file()
