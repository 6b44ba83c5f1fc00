"""Checkpoints are data, not configuration: what a checkpoint stores never configures a run.

Through the real command (``python -m lit_adamerging.cli``, configs/tiny.yaml in a temporary
directory) and through ``AdaMergingModule.load_from_checkpoint``: a checkpoint edited to switch on
pickle loading and point the zoo at a malicious pickle runs nothing; a checkpoint made with
another zoo, method or task order is refused, listing every difference; the checkpoint's settings
are used only when asked for, and even then ``allow_pickle`` stays the user's.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from helpers import MARKER, TINY_CLIP, TINY_CONFIG, Payload, load_config, naive_accuracies, printed_metric, run_cli
from lit_adamerging import AdaMergingModule, SyntheticZoo
from lit_adamerging.cli import AdaMergingCLI
from lit_adamerging.lightning.checkpoint_io import COEFFICIENTS_KEY, read_adamerging_checkpoint
from lit_adamerging.models.checkpoints import CheckpointError

# every test reads what the command wrote in other processes (the fitted fixture: two fits, 16 s)
pytestmark = pytest.mark.slow

QUIET = ["--trainer.logger=false", "--trainer.enable_model_summary=false"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[Path, list[dict]]:
    """configs/tiny.yaml (layer-wise, SyntheticZoo seed 0) fitted twice in one folder, 4 steps each.

    The README's `fit` run twice: the first with lr 0.02, the second with the config's 0.001, so
    their coefficients differ. Returns the folder and the encoder each fit exported.
    """
    workdir = tmp_path_factory.mktemp("fitted")
    shutil.copy(TINY_CONFIG, workdir / "tiny.yaml")
    exports = []
    for lr in ("0.02", "0.001"):
        result = run_cli(workdir, "fit", "--config", "tiny.yaml", f"--model.lr={lr}", "--trainer.max_steps=4", *QUIET)
        assert result.returncode == 0, result.stderr[-3000:]
        exports.append(load_file(str(workdir / "runs" / "tiny" / "merged_encoder.safetensors")))
    return workdir, exports


@pytest.fixture(scope="module")
def layer_wise(fitted) -> Path:
    return fitted[0]


def in_process(workdir: Path, *args: str) -> AdaMergingCLI:
    """The CLI run in this process, in ``workdir`` (no logger, no callbacks: it writes nothing there)."""
    args = (*args, *QUIET, "--trainer.callbacks=null")
    with mock.patch.object(sys, "argv", ["lit-adamerging"]), contextlib.chdir(workdir):
        return AdaMergingCLI(args=list(args), save_config_kwargs={"overwrite": True}
        )


def checkpoint_of(workdir: Path) -> Path:
    return workdir / "runs" / "tiny" / "checkpoints" / "last.ckpt"


def craft(workdir: Path, target: Path) -> Path:
    """The fitted checkpoint, edited as an attacker would: a StateDictZoo allowing pickles, reading a payload."""
    payload = target.parent / "finetuned.pt"
    torch.save({"state_dict": Payload(target.parent / MARKER)}, payload)
    state = torch.load(checkpoint_of(workdir), weights_only=True)
    tasks = list(state["hyper_parameters"]["num_classes"])
    state["hyper_parameters"]["zoo"] = {
        "class_path": "lit_adamerging.StateDictZoo",
        "init_args": {"encoder": TINY_CLIP, "pretrained": str(payload),
                      "finetuned": {task: str(payload) for task in tasks},
                      "heads": {task: str(payload) for task in tasks}, "normalize_features": False,
                      "allow_pickle": True},
    }
    torch.save(state, target)
    read_adamerging_checkpoint(target)  # still a valid AdaMerging checkpoint, loadable weights-only
    return target


def test_crafted_checkpoint_runs_no_code_through_the_cli(layer_wise, tmp_path):
    crafted = craft(layer_wise, tmp_path / "crafted.ckpt")
    refused = run_cli(layer_wise, "test", "--config", "tiny.yaml", "--ckpt_path", str(crafted), *QUIET)
    assert refused.returncode != 0
    assert not (tmp_path / MARKER).exists()
    message = refused.stderr
    assert "made with other settings than the ones given now" in message
    for line in ("model.zoo.class_path: checkpoint 'lit_adamerging.StateDictZoo', yours 'lit_adamerging.SyntheticZoo'",
                 f"model.zoo.init_args.pretrained: checkpoint '{tmp_path / 'finetuned.pt'}', yours '<not set>'",
                 f"model.zoo.init_args.finetuned.alpha: checkpoint '{tmp_path / 'finetuned.pt'}', yours '<not set>'",
                 f"model.zoo.init_args.heads.gamma: checkpoint '{tmp_path / 'finetuned.pt'}', yours '<not set>'",
                 "model.zoo.init_args.seed: checkpoint '<not set>', yours 0"):
        assert line in message, message[-3000:]
    differences = message.split("these change what its coefficients mean")[1].split("Give the settings")[0]
    assert "allow_pickle" not in differences

    # Even when the checkpoint's settings are asked for, allow_pickle stays the user's (false): the
    # zoo refuses the pickled file, and nothing runs.
    with pytest.raises(CheckpointError, match=rf"(?s){re.escape(str(tmp_path / 'finetuned.pt'))}.*allow_pickle"):
        in_process(
            layer_wise, "test", "--config", "tiny.yaml", "--ckpt_path", str(crafted), "--settings_from_checkpoint=true"
        )
    assert not (tmp_path / MARKER).exists()


def test_crafted_checkpoint_runs_no_code_from_python(layer_wise, tmp_path):
    crafted = craft(layer_wise, tmp_path / "crafted.ckpt")
    with pytest.raises(TypeError, match="needs zoo=<a ModelZoo>") as refused:
        AdaMergingModule.load_from_checkpoint(crafted)
    hint = str(refused.value)
    # The stored configuration is quoted as data (JSON), without allow_pickle, never as code to paste.
    assert f'"class_path": "lit_adamerging.StateDictZoo", "init_args": {{"encoder": "{TINY_CLIP}"' in hint
    assert "allow_pickle\"" not in hint and "import" not in hint
    assert not (tmp_path / MARKER).exists()
    # A zoo other than the stored one is refused, listing the differences; the stored zoo is never built.
    with pytest.raises(ValueError, match="other settings") as refused:
        AdaMergingModule.load_from_checkpoint(crafted, zoo=SyntheticZoo(TINY_CLIP, seed=0))
    assert ("model.zoo.class_path: checkpoint 'lit_adamerging.StateDictZoo', "
            "yours 'lit_adamerging.models.zoo.SyntheticZoo'") in str(refused.value)
    assert not (tmp_path / MARKER).exists()

    # A checkpoint made through the CLI: the hint quotes the zoo it was made with.
    with pytest.raises(TypeError) as refused:
        AdaMergingModule.load_from_checkpoint(checkpoint_of(layer_wise))
    assert (f'{{"class_path": "lit_adamerging.SyntheticZoo", "init_args": {{"encoder": "{TINY_CLIP}", '
            '"seed": 0, "perturbation": 0.05}}') in str(refused.value)


def test_a_stored_zoo_is_quoted_never_turned_into_code(layer_wise, tmp_path):
    state = torch.load(checkpoint_of(layer_wise), weights_only=True)
    state["hyper_parameters"]["zoo"] = {
        "class_path": "os.system", "init_args": {"command": "x')\nfrom os import system; system('touch /tmp/pwned"},
    }
    torch.save(state, tmp_path / "crafted.ckpt")
    with pytest.raises(TypeError) as refused:
        AdaMergingModule.load_from_checkpoint(tmp_path / "crafted.ckpt")
    message = str(refused.value)
    quoted = ('{"class_path": "os.system", "init_args": '
              '{"command": "x\')\\nfrom os import system; system(\'touch /tmp/pwned"}}')
    assert quoted in message, message
    assert "\n" not in message  # the stored newline stays an escape inside a JSON string
    assert message.count("from os import") == 1  # only inside that quoted string


def test_another_method_zoo_or_task_order_is_refused_unless_asked_for(layer_wise, tmp_path):
    checkpoint = str(checkpoint_of(layer_wise))
    with pytest.raises(ValueError, match="other settings") as refused:
        in_process(layer_wise, "test", "--config", "tiny.yaml", "--method", "task_wise_adamerging",
                   "--model.zoo.init_args.seed=1", "--ckpt_path", checkpoint)
    lines = str(refused.value).splitlines()
    assert lines[1:3] == [
        "  model.zoo.init_args.seed: checkpoint 0, yours 1", "  model.granularity: checkpoint 'layer', yours 'task'"
    ]
    assert lines[3].startswith("Give the settings")  # lr (0.001 in the checkpoint, 0.001 here) is never listed

    config = load_config()
    config["data"]["tasks"] = dict(reversed(list(config["data"]["tasks"].items())))
    (tmp_path / "reordered.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    with pytest.raises(ValueError, match=re.escape(
            "model.num_classes (task order): checkpoint ['alpha', 'beta', 'gamma'], yours ['gamma', 'beta', 'alpha']")):
        in_process(layer_wise, "test", "--config", str(tmp_path / "reordered.yaml"), "--ckpt_path", checkpoint)

    # Asked for explicitly, the checkpoint's method and zoo are used: the layer-wise coefficients on
    # the seed-0 zoo, as a plain merge computes them; the optimiser's lr follows the user silently.
    cli = in_process(layer_wise, "test", "--config", "tiny.yaml", "--method", "task_wise_adamerging",
                     "--model.zoo.init_args.seed=1", "--model.lr=0.5", "--ckpt_path", checkpoint,
                     "--settings_from_checkpoint=true")
    assert (cli.model.hparams.granularity, cli.model.zoo.seed, cli.model.hparams.lr) == ("layer", 0, 0.5)
    raw = torch.load(checkpoint, weights_only=True)["state_dict"][COEFFICIENTS_KEY]
    assert raw.shape == (3, 32)
    expected = naive_accuracies(load_config(), raw.clamp(0, 1))
    for task, value in expected.items():
        assert cli.trainer.callback_metrics[f"test/acc/{task}"].item() == pytest.approx(value, abs=1e-6)


def test_a_file_that_is_not_an_adamerging_checkpoint_is_named(layer_wise, tmp_path):
    weights = {"weight": torch.randn(4, 4), "bias": torch.zeros(4)}
    torch.save(weights, tmp_path / "finetuned.pt")
    save_file(weights, str(tmp_path / "finetuned.safetensors"))
    cases = {"finetuned.pt": "it is not a Lightning checkpoint (top level: ['weight', 'bias'])",
             "finetuned.safetensors": "it is a safetensors file (tensors only)"}
    for name, what in cases.items():
        message = re.escape(f"{tmp_path / name} is not an AdaMerging checkpoint: {what}")
        with pytest.raises(ValueError, match=message) as refused:
            in_process(layer_wise, "test", "--config", "tiny.yaml", "--ckpt_path", str(tmp_path / name))
        assert "fine-tuned weights go in the zoo (model.zoo.init_args.finetuned)" in str(refused.value)
    # A pickled module (the task_vectors release's layout) is not unpickled to find out; a folder is named.
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(ValueError, match=r"module.pt is not an AdaMerging checkpoint: it holds pickled Python objects "
                                         r"\(torch.nn.modules.linear.Linear\), .* it was not unpickled"):
        read_adamerging_checkpoint(tmp_path / "module.pt")
    (tmp_path / "random.pt").write_bytes(bytes(range(7, 200)))
    with pytest.raises(ValueError, match=r"random.pt is not an AdaMerging checkpoint: torch.load cannot read it"):
        read_adamerging_checkpoint(tmp_path / "random.pt")
    with pytest.raises(ValueError, match=r"is not an AdaMerging checkpoint: a folder"):
        read_adamerging_checkpoint(tmp_path)
    state = torch.load(checkpoint_of(layer_wise), weights_only=True)
    state["state_dict"] = {"encoder.weight": torch.zeros(1)}
    torch.save(state, tmp_path / "other_module.ckpt")
    with pytest.raises(ValueError, match=r"holds no merging coefficients \('merger.coefficients.raw'"):
        read_adamerging_checkpoint(tmp_path / "other_module.ckpt")
    state = torch.load(checkpoint_of(layer_wise), weights_only=True)
    state["hyper_parameters"] = ["zoo", "allow_pickle"]
    torch.save(state, tmp_path / "edited.ckpt")
    with pytest.raises(ValueError, match=r"edited.ckpt: its 'hyper_parameters' are not a mapping"):
        AdaMergingModule.load_from_checkpoint(tmp_path / "edited.ckpt", zoo=SyntheticZoo(seed=0))


def test_repeated_fit_then_test_evaluates_the_latest_fit(fitted):
    # The README's commands: the fixture ran `fit` twice in one folder; the second replaced the
    # first's checkpoint (no last-v1.ckpt), and `test` evaluates and exports the second.
    workdir, exports = fitted
    run = workdir / "runs" / "tiny"
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    assert any(not torch.equal(exports[0][key], exports[1][key]) for key in exports[0])

    test = run_cli(workdir, "test", "--config", "tiny.yaml", "--ckpt_path", "runs/tiny/checkpoints/last.ckpt")
    assert test.returncode == 0, test.stderr[-3000:]
    evaluated = load_file(str(run / "merged_encoder.safetensors"))
    for key, value in exports[1].items():
        assert torch.equal(evaluated[key], value), key
    raw = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"][COEFFICIENTS_KEY]
    expected = naive_accuracies(load_config(), raw.clamp(0, 1))
    for task, value in expected.items():
        assert printed_metric(test.stdout, f"test/acc/{task}") == pytest.approx(value, abs=1e-4)
