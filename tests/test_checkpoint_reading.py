"""A checkpoint is read once, as plain data, within limits, by every path that loads one.

Through the command (in this process, as ``lit-adamerging`` runs it), a Trainer of one's own and
``load_from_checkpoint``: a remote checkpoint is downloaded once (a loopback server that changes its
answer after the first request), a local file swapped after the check is not what the Trainer
loads, the ``last`` alias is read weights-only even with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``,
non-finite coefficients and oversized or deeply nested files are refused with errors naming the
file and the limit, and methods are refused where running them would report something else.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import os
import shutil
import sys
import threading
import zipfile
from pathlib import Path
from unittest import mock

import lightning.pytorch as pl
import pytest
import torch

from helpers import MARKER, TINY_CLIP, TINY_CONFIG, Payload, run_cli
from lit_adamerging import AdaMergingModule, MultiTaskDataModule, SyntheticTask, SyntheticZoo
from lit_adamerging.cli import AdaMergingCLI
from lit_adamerging.lightning import checkpoint_io
from lit_adamerging.lightning.checkpoint_io import COEFFICIENTS_KEY, read_adamerging_checkpoint
from lit_adamerging.lightning.checks import checkpoint_settings_differences
from lit_adamerging.limits import CHECKPOINT_BYTES, NESTING_DEPTH, LimitExceeded

QUIET = ["--trainer.logger=false", "--trainer.enable_model_summary=false"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    """configs/tiny.yaml fitted for 4 steps with lr 0.05 (coefficients far from the init) in a folder of its own.

    It runs the command in another process (about 6 s): the tests that use it are marked slow.
    """
    workdir = tmp_path_factory.mktemp("fitted")
    shutil.copy(TINY_CONFIG, workdir / "tiny.yaml")
    result = run_cli(workdir, "fit", "--config", "tiny.yaml", "--model.lr=0.05", "--trainer.max_steps=4", *QUIET)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def last_checkpoint(workdir: Path) -> Path:
    return workdir / "runs" / "tiny" / "checkpoints" / "last.ckpt"


def in_process(workdir: Path, *args: str) -> AdaMergingCLI:
    """The command run in this process, in ``workdir``, writing nothing there (no logger, no callbacks)."""
    args = (*args, *QUIET, "--trainer.callbacks=null")
    with mock.patch.object(sys, "argv", ["lit-adamerging"]), contextlib.chdir(workdir):
        return AdaMergingCLI(args=list(args), save_config_kwargs={"overwrite": True})


def accuracies(cli: AdaMergingCLI) -> dict[str, float]:
    return {key: value.item() for key, value in cli.trainer.callback_metrics.items() if key.startswith("test/acc/")}


def with_payload(clean: Path, target: Path, marker: Path) -> Path:
    """``clean``'s checkpoint with an object in its hyperparameters whose unpickling writes ``marker``."""
    state = torch.load(clean, weights_only=True)
    state["hyper_parameters"]["note"] = Payload(marker)
    torch.save(state, target)
    return target


def edited(clean: Path, target: Path, coefficient: float) -> Path:
    state = torch.load(clean, weights_only=True)
    state["state_dict"][COEFFICIENTS_KEY][0, 0] = coefficient
    torch.save(state, target)
    return target


# ------------------------------------------------------------------------------------------ one read
class ChangingServer(http.server.BaseHTTPRequestHandler):
    """Answers the first GET with a clean checkpoint and every later one with a payload."""

    answers: list[bytes] = []
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = self.answers[min(len(self.requests), len(self.answers) - 1)]
        self.requests.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serving(*answers: bytes):
    handler = type("Handler", (ChangingServer,), {"answers": list(answers), "requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/run.ckpt", handler.requests
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_a_remote_checkpoint_is_downloaded_once_and_those_bytes_are_loaded(fitted, tmp_path):
    clean = last_checkpoint(fitted)
    payload = with_payload(clean, tmp_path / "payload.ckpt", tmp_path / MARKER)
    local = accuracies(in_process(fitted, "test", "--config", "tiny.yaml", "--ckpt_path", str(clean)))
    with serving(clean.read_bytes(), payload.read_bytes()) as (url, requests):
        remote = accuracies(in_process(fitted, "test", "--config", "tiny.yaml", "--ckpt_path", url))
    assert requests == ["/run.ckpt"]  # one download, checked and handed to the Trainer
    assert remote == local and len(local) == 4  # three tasks and their mean
    assert not (tmp_path / MARKER).exists()
    # The payload as the first answer is refused without being unpickled.
    with serving(payload.read_bytes()) as (url, requests), pytest.raises(ValueError, match="pickled Python objects"):
        in_process(fitted, "test", "--config", "tiny.yaml", "--ckpt_path", url)
    assert not (tmp_path / MARKER).exists()


@pytest.mark.slow
def test_a_remote_checkpoint_over_the_size_limit_is_refused_naming_the_limit(fitted, monkeypatch):
    monkeypatch.setenv(CHECKPOINT_BYTES.variable, "1000")
    with serving(last_checkpoint(fitted).read_bytes()) as (url, _):
        expected = rf"{url}: 1001 bytes \(at least.*limit of 1000.*{CHECKPOINT_BYTES.variable}"
        with pytest.raises(LimitExceeded, match=expected):
            read_adamerging_checkpoint(url)


@pytest.mark.slow
def test_a_local_file_swapped_after_the_check_is_not_what_the_trainer_loads(fitted, tmp_path):
    clean = last_checkpoint(fitted)
    target = tmp_path / "run.ckpt"
    shutil.copy(clean, target)
    payload = with_payload(clean, tmp_path / "payload.ckpt", tmp_path / MARKER).read_bytes()
    checked = checkpoint_io.load_checkpoint

    def check_then_swap(data: bytes, name: str) -> dict:
        result = checked(data, name)
        if name == str(target):
            target.write_bytes(payload)  # the attacker swaps the file right after the check
        return result

    expected = accuracies(in_process(fitted, "test", "--config", "tiny.yaml", "--ckpt_path", str(clean)))
    with mock.patch("lit_adamerging.cli.load_checkpoint", check_then_swap):
        cli = in_process(fitted, "test", "--config", "tiny.yaml", "--ckpt_path", str(target))
    assert target.read_bytes() == payload  # the swap happened
    assert accuracies(cli) == expected
    assert cli.trainer.ckpt_path != str(target) and Path(cli.trainer.ckpt_path).read_bytes() == clean.read_bytes()
    assert not (tmp_path / MARKER).exists()


@pytest.mark.slow
def test_an_alias_is_read_weights_only_whatever_the_environment_says(fitted, tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    shutil.copytree(fitted, workdir)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with_payload(last_checkpoint(fitted), last_checkpoint(workdir), tmp_path / MARKER)
    with pytest.raises(ValueError) as refused:
        in_process(workdir, "test", "--config", "tiny.yaml", "--ckpt_path", "last")
    message = str(refused.value)
    assert f"{last_checkpoint(workdir)} is not an AdaMerging checkpoint: it holds pickled Python objects" in message
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in message and "weights_only=False" not in message
    assert not (tmp_path / MARKER).exists()
    # The clean last.ckpt through the alias: its coefficients are used, its settings checked.
    shutil.copy(last_checkpoint(fitted), last_checkpoint(workdir))
    cli = in_process(workdir, "test", "--config", "tiny.yaml", "--ckpt_path", "last")
    raw = torch.load(last_checkpoint(fitted), weights_only=True)["state_dict"][COEFFICIENTS_KEY]
    torch.testing.assert_close(cli.model.merger.coefficients.raw.detach(), raw, rtol=0, atol=0)
    with pytest.raises(ValueError, match=rf"the checkpoint {last_checkpoint(workdir)} was made with other settings"):
        in_process(workdir, "test", "--config", "tiny.yaml", "--model.zoo.init_args.seed=3", "--ckpt_path", "last")


@pytest.mark.slow
def test_a_trainer_of_ones_own_and_load_from_checkpoint_read_weights_only(fitted, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    payload = with_payload(last_checkpoint(fitted), tmp_path / "payload.ckpt", tmp_path / MARKER)
    zoo = SyntheticZoo(TINY_CLIP, seed=0)
    tasks = {"alpha": SyntheticTask(5, 64, 32, seed=1), "beta": SyntheticTask(10, 48, 32, seed=2),
             "gamma": SyntheticTask(3, 32, 32, seed=3)}
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    module = AdaMergingModule(zoo, {task: data.num_classes for task, data in tasks.items()})
    with pytest.raises(ValueError, match="pickled Python objects"):
        trainer.test(module, datamodule=MultiTaskDataModule(tasks), ckpt_path=str(payload), weights_only=False)
    with pytest.raises(ValueError, match="pickled Python objects"):
        AdaMergingModule.load_from_checkpoint(payload, zoo=zoo)
    with pytest.raises(ValueError, match="weights_only=False is refused"):
        AdaMergingModule.load_from_checkpoint(last_checkpoint(fitted), zoo=zoo, weights_only=False)
    assert not (tmp_path / MARKER).exists()


# ----------------------------------------------------------------------------------- what is loaded
@pytest.mark.slow
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_coefficients_are_refused_everywhere(fitted, tmp_path, value):
    bad = edited(last_checkpoint(fitted), tmp_path / "bad.ckpt", value)
    expected = rf"bad.ckpt: '{COEFFICIENTS_KEY}' holds 1 NaN or infinite value\(s\) of 96"
    with pytest.raises(ValueError, match=expected):
        in_process(fitted, "test", "--config", "tiny.yaml", "--ckpt_path", str(bad))
    with pytest.raises(ValueError, match=expected):
        AdaMergingModule.load_from_checkpoint(bad, zoo=SyntheticZoo(TINY_CLIP, seed=0))
    # As the coefficients of a surgery, named as that setting.
    with pytest.raises(ValueError, match=rf"model.coefficients_from: .*{expected}"):
        in_process(fitted, "fit", "--config", "tiny.yaml", "--method", "layer_wise_adamerging_surgery",
                   f"--model.coefficients_from={bad}", "--trainer.max_steps=1")
    # A state dict handed over directly.
    module = AdaMergingModule(SyntheticZoo(TINY_CLIP, seed=0), {"a": 3, "b": 5})
    module.configure_model()
    raw = module.merger.coefficients.raw.detach().clone()
    raw[1, 2] = value
    with pytest.raises(ValueError, match="coefficients being loaded hold NaN or infinite values"):
        module.load_state_dict({COEFFICIENTS_KEY: raw})


@pytest.mark.slow
def test_a_checkpoint_over_the_size_limit_is_refused_naming_the_limit(fitted, tmp_path, monkeypatch):
    monkeypatch.setenv(CHECKPOINT_BYTES.variable, "2000")
    with pytest.raises(LimitExceeded, match=rf"last.ckpt: 2001 bytes \(at least.*{CHECKPOINT_BYTES.variable}=4000"):
        in_process(fitted, "test", "--config", "tiny.yaml", "--ckpt_path", str(last_checkpoint(fitted)))


@pytest.mark.slow
def test_a_checkpoint_that_inflates_past_the_limit_is_refused_before_inflating(fitted, tmp_path, monkeypatch):
    state = torch.load(last_checkpoint(fitted), weights_only=True)
    state["state_dict"]["ballast"] = torch.zeros(4 * 2**20)  # 16 MiB of zeros, deflated to kilobytes below
    buffer = io.BytesIO()
    torch.save(state, buffer)
    deflated = tmp_path / "deflated.ckpt"
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as source, zipfile.ZipFile(deflated, "w") as target:
        for entry in source.infolist():
            target.writestr(entry.filename, source.read(entry), compress_type=zipfile.ZIP_DEFLATED)
    assert deflated.stat().st_size < 2**20
    monkeypatch.setenv(CHECKPOINT_BYTES.variable, str(2**20))
    with pytest.raises(LimitExceeded, match=r"deflated.ckpt: \d+ bytes once its zip entries are inflated is more "
                                            rf"than the limit of {2**20}"):
        read_adamerging_checkpoint(deflated)


@pytest.mark.slow
def test_tensors_declaring_more_than_the_limit_are_refused(fitted, tmp_path):
    state = torch.load(last_checkpoint(fitted), weights_only=True)
    state["hyper_parameters"]["huge"] = torch.zeros(1).expand(40000, 40000)  # stored as one float
    torch.save(state, tmp_path / "strided.ckpt")
    assert (tmp_path / "strided.ckpt").stat().st_size < 100_000
    with pytest.raises(LimitExceeded, match=r"strided.ckpt: 640\d+ bytes of tensors \(as their shapes declare them\)"):
        read_adamerging_checkpoint(tmp_path / "strided.ckpt")


@pytest.mark.slow
def test_deep_nesting_is_refused_naming_the_limit_not_a_recursion_error(fitted, tmp_path):
    state = torch.load(last_checkpoint(fitted), weights_only=True)
    chain: list = []
    for _ in range(5000):
        chain = [chain]
    state["hyper_parameters"]["chain"] = chain
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(50_000)  # torch.save pickles the chain recursively; the reader must not
    try:
        torch.save(state, tmp_path / "deep.ckpt")
    finally:
        sys.setrecursionlimit(limit)
    with pytest.raises(LimitExceeded, match=rf"deep.ckpt: {NESTING_DEPTH.default + 1} levels of nested containers is "
                                            rf"more than the limit.*{NESTING_DEPTH.variable}"):
        read_adamerging_checkpoint(tmp_path / "deep.ckpt")


@pytest.mark.slow
def test_a_fifo_or_folder_as_checkpoint_is_refused_without_blocking(fitted, tmp_path):
    fifo = tmp_path / "run.ckpt"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=r"run.ckpt: the checkpoint is a FIFO \(named pipe\), not a regular file"):
        in_process(fitted, "test", "--config", "tiny.yaml", "--ckpt_path", str(fifo))
    with pytest.raises(ValueError, match=r"is not an AdaMerging checkpoint: a folder"):
        read_adamerging_checkpoint(tmp_path)


@pytest.mark.slow
def test_a_local_file_named_like_a_url_is_a_local_file(fitted, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(fitted, workdir)
    shutil.copy(last_checkpoint(fitted), workdir / "https_backup.ckpt")
    cli = in_process(workdir, "test", "--config", "tiny.yaml", "--ckpt_path", "https_backup.ckpt")
    raw = torch.load(last_checkpoint(fitted), weights_only=True)["state_dict"][COEFFICIENTS_KEY]
    torch.testing.assert_close(cli.model.merger.coefficients.raw.detach(), raw, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"registry:my-model: lit-adamerging does not fetch checkpoints from"):
        in_process(workdir, "test", "--config", "tiny.yaml", "--ckpt_path", "registry:my-model")


# ---------------------------------------------------------------------------- what is asked for
@pytest.mark.slow
@pytest.mark.parametrize("method", ["task_arithmetic", "weight_averaging", "ties_merging", "regmean"])
def test_fitting_a_method_with_nothing_to_learn_is_refused(fitted, method):
    with pytest.raises(ValueError, match=rf"--method {method} has nothing to learn: it runs with `lit-adamerging "):
        in_process(fitted, "fit", "--config", "tiny.yaml", "--method", method)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["layer_wise_adamerging", "task_wise_adamerging_pp", "task_arithmetic_surgery"])
@pytest.mark.parametrize("subcommand", ["test", "validate"])
def test_evaluating_a_learned_method_without_its_checkpoint_is_refused(fitted, method, subcommand):
    with pytest.raises(ValueError, match=rf"--method {method} is learned by `lit-adamerging fit`; `{subcommand}` "
                                         "needs that fit's checkpoint: add --ckpt_path"):
        in_process(fitted, subcommand, "--config", "tiny.yaml", "--method", method)


@pytest.mark.slow
def test_evaluating_the_default_model_without_a_checkpoint_is_refused(fitted):
    with pytest.raises(ValueError, match=r"AdaMergingModule is learned by `lit-adamerging fit`; `test` needs"):
        in_process(fitted, "test", "--config", "tiny.yaml")


@pytest.mark.slow
def test_a_checkpoint_of_another_class_is_refused_naming_both(fitted, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(fitted, workdir)
    surgery = run_cli(workdir, "fit", "--config", "tiny.yaml", "--method", "task_arithmetic_surgery",
                      "--trainer.max_steps=2", *QUIET)
    assert surgery.returncode == 0, surgery.stderr[-2000:]
    with pytest.raises(ValueError, match=r"last.ckpt was written by '.*SurgeryModule', not by '.*AdaMergingModule'"):
        in_process(workdir, "test", "--config", "tiny.yaml", "--method", "layer_wise_adamerging",
                   "--ckpt_path", str(last_checkpoint(workdir)))
    # Asked for, the checkpoint's class and settings are taken.
    cli = in_process(workdir, "test", "--config", "tiny.yaml", "--method", "layer_wise_adamerging",
                     "--ckpt_path", str(last_checkpoint(workdir)), "--settings_from_checkpoint=true")
    assert type(cli.model).__name__ == "SurgeryModule" and cli.model.hparams.merge == "task_arithmetic"


@pytest.mark.slow
def test_weights_only_false_is_refused_on_the_command_line(fitted):
    with pytest.raises(ValueError, match="--weights_only=false is refused"):
        in_process(fitted, "test", "--config", "tiny.yaml", "--ckpt_path", str(last_checkpoint(fitted)),
                   "--weights_only=false")


@pytest.mark.slow
def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    (tmp_path / "broken.yaml").write_text("model:\n  init: [0.3, 0.4\n  clamp: true\n")
    result = run_cli(tmp_path, "fit", "--config", str(TINY_CONFIG), "--config", "broken.yaml")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "broken.yaml is not valid YAML: while parsing a flow sequence" in result.stderr
    assert 'in "broken.yaml", line 2, column 9' in result.stderr


@pytest.mark.slow
def test_a_stored_file_path_that_is_a_fifo_fails_the_run_instead_of_hanging(fitted, tmp_path):
    fifo = tmp_path / "pretrained.pt"
    os.mkfifo(fifo)
    state = torch.load(last_checkpoint(fitted), weights_only=True)
    tasks = list(state["hyper_parameters"]["num_classes"])
    state["hyper_parameters"]["zoo"] = {
        "class_path": "lit_adamerging.StateDictZoo",
        "init_args": {"encoder": TINY_CLIP, "pretrained": str(fifo),
                      "finetuned": {task: str(fifo) for task in tasks}, "heads": {task: str(fifo) for task in tasks},
                      "normalize_features": False},
    }
    torch.save(state, tmp_path / "fifo.ckpt")
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            in_process(fitted, "test", "--config", "tiny.yaml", "--ckpt_path", str(tmp_path / "fifo.ckpt"),
                       "--settings_from_checkpoint=true")
        except BaseException as error:  # noqa: BLE001 (handed to the test thread)
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=120)
    if thread.is_alive():  # unblock the reader before failing
        with open(fifo, "wb"):
            pass
        pytest.fail("the run waited on the FIFO named in the checkpoint")
    assert len(outcome) == 1 and f"{fifo}: the " in str(outcome[0]) and "FIFO (named pipe)" in str(outcome[0])


def test_zoo_paths_compare_as_files_and_class_paths_as_classes(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "a.pt").touch()
    stored = {"zoo": {"class_path": "lit_adamerging.StateDictZoo", "init_args": {"pretrained": "models/a.pt"}}}

    def differences(class_path: str, pretrained: str) -> list[str]:
        current = {"zoo": {"class_path": class_path, "init_args": {"pretrained": pretrained}}}
        return checkpoint_settings_differences(stored, current, ("zoo",))

    full = "lit_adamerging.models.zoo.StateDictZoo"
    assert differences(full, str(tmp_path / "models" / "a.pt")) == []  # a relative path the absolute one ends with
    with contextlib.chdir(tmp_path):
        assert differences(full, "./models/../models/a.pt") == []  # the same existing file
    assert differences(full, str(tmp_path / "other" / "a.pt")) == [
        f"  model.zoo.init_args.pretrained: checkpoint 'models/a.pt', yours '{tmp_path / 'other' / 'a.pt'}'"
    ]
    assert differences("lit_adamerging.models.zoo.TimmZoo", "models/a.pt") == [
        "  model.zoo.class_path: checkpoint 'lit_adamerging.StateDictZoo', yours 'lit_adamerging.models.zoo.TimmZoo'"
    ]
