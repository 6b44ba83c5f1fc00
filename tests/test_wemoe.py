"""WEMoE: the per-sample product, the mixtures against plain per-sample references, training, checkpoints,
resume, export and its loader, bad input."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn

from helpers import TINY_CLIP, cpu_trainer, synthetic_tasks
from lit_adamerging import (
    ExportMergedEncoder,
    MultiTaskDataModule,
    SyntheticZoo,
    TaskArithmeticModule,
    WEMoEModule,
)
from lit_adamerging.lightning.wemoe import ROUTERS_PREFIX
from lit_adamerging.merging import (
    Router,
    WeightEnsemblingMixture,
    WEMoEFileError,
    find_mlp_modules,
    load_wemoe,
    mixed_layers,
    per_sample_delta,
    stack_task_vectors,
)
from lit_adamerging.merging import wemoe as wemoe_core
from lit_adamerging.methods import create_method

NUM_CLASSES = {"alpha": 5, "beta": 3}
TINY_EFFICIENTNET = "timm:test_efficientnet"


# ----------------------------------------------------------------------------- the per-sample product
def naive_delta(x: Tensor, routing: Tensor, weight_tau: Tensor, bias_tau: Tensor | None) -> Tensor:
    """One sample at a time: build its weight and bias as sums over the tasks, then apply them."""
    outputs = []
    for b in range(x.shape[0]):
        weight = sum(routing[b, k] * weight_tau[k] for k in range(weight_tau.shape[0]))
        out = x[b] @ weight.T
        if bias_tau is not None:
            out = out + sum(routing[b, k] * bias_tau[k] for k in range(bias_tau.shape[0]))
        outputs.append(out)
    return torch.stack(outputs)


@pytest.mark.parametrize("chunk_entries", [1, 50, 1 << 24])  # one sample per chunk, a few, all at once
def test_per_sample_delta_and_its_gradients_match_a_plain_loop(monkeypatch, chunk_entries):
    monkeypatch.setattr(wemoe_core, "_CHUNK_ENTRIES", chunk_entries)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    routing = torch.rand(5, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    weight_tau = torch.randn(3, 6, 4, generator=generator, dtype=torch.float64)
    bias_tau = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    upstream = torch.randn(5, 7, 6, generator=generator, dtype=torch.float64)

    fused = per_sample_delta(x, routing, weight_tau, bias_tau)
    grads = torch.autograd.grad((fused * upstream).sum(), (x, routing))
    reference = naive_delta(x, routing, weight_tau, bias_tau)
    expected = torch.autograd.grad((reference * upstream).sum(), (x, routing))
    torch.testing.assert_close(fused, reference)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)
    torch.autograd.gradcheck(lambda a, r: per_sample_delta(a, r, weight_tau), (x, routing))


def test_router_starts_at_init_and_averages_over_positions():
    router = Router(width=6, num_tasks=3, depth=2, init=0.3)
    hidden = torch.randn(4, 9, 6)
    routing = router(hidden)
    assert routing.shape == (4, 3)
    torch.testing.assert_close(routing, torch.full((4, 3), 0.3), atol=5e-3, rtol=0)
    per_position = router.layers(hidden)
    torch.testing.assert_close(routing, per_position.mean(dim=1))
    assert [type(layer) for layer in router.layers] == [nn.Linear, nn.ReLU, nn.Linear]
    constant = Router(width=6, num_tasks=3, depth=0, init=0.2)
    torch.testing.assert_close(constant(hidden), torch.full((4, 3), 0.2))


# ----------------------------------------------------------------------------- the mixture, plainly
def load_plain(zoo: SyntheticZoo):
    loaded = zoo.load(NUM_CLASSES)
    theta0 = {k: v.detach().clone() for k, v in loaded.encoder.state_dict().items()}
    parameters = {name for name, _ in loaded.encoder.named_parameters()}
    task_vectors = stack_task_vectors(
        {k: v for k, v in theta0.items() if k in parameters},
        {task: {k: v for k, v in loaded.finetuned[task].items() if k in parameters} for task in NUM_CLASSES},
    )
    return loaded.encoder.eval(), theta0, task_vectors


def plain_state(theta0, task_vectors, mixed_by_mlp, routing_by_mlp, scale, sample):
    """The encoder's state dict for one sample: theta_0 + scale * sum tau outside the MLPs, theta_0 + sum_k r_k tau_k
    inside each MLP with that MLP's routing weights for the sample."""
    state = dict(theta0)
    for name, stacked in task_vectors.items():
        owner = next((mlp for mlp, names in mixed_by_mlp.items() if name in names), None)
        weights = [scale] * stacked.shape[0] if owner is None else routing_by_mlp[owner][sample].tolist()
        state[name] = theta0[name] + sum(w * stacked[k] for k, w in enumerate(weights))
    return state


@pytest.mark.parametrize("encoder_name", [TINY_CLIP, "timm:test_vit", TINY_EFFICIENTNET])
def test_the_mixture_equals_a_plain_per_sample_loop(encoder_name):
    """Each sample runs with theta_0 + sum_k r_k(x) tau_k in every MLP, its routing weights the routers' output on
    that MLP's input: the batched module against the plain encoder loaded with each sample's weights, one sample at a
    time, whose MLP inputs give the routers back the same weights."""
    zoo = SyntheticZoo(encoder_name, seed=0, perturbation=0.5)
    module = WEMoEModule(zoo, NUM_CLASSES)
    module.configure_model()
    generator = torch.Generator().manual_seed(3)
    for router in module.mixture.routers.values():  # routers far from their near-constant start
        for parameter in router.parameters():
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.5
    images = torch.randn(3, 3, 32, 32, generator=generator)
    with torch.no_grad():
        module.on_test_start()
        features = module.merger(images, module.task_evaluation_tensors("alpha"))
        routing = module.routing(images)
    assert set(routing) == set(module.mixture.mlp_modules)
    assert all(value.shape == (3, 2) for value in routing.values())

    plain, theta0, task_vectors = load_plain(zoo)
    mixed = {
        mlp: {f"{layer}.{kind}" for layer in mixed_layers(plain, mlp) for kind in ("weight", "bias")}
        for mlp in module.mixture.mlp_modules
    }
    for sample in range(3):
        plain.load_state_dict(plain_state(theta0, task_vectors, mixed, routing, 0.3, sample))
        inputs = {}
        hooks = [plain.get_submodule(mlp).register_forward_pre_hook(
            lambda m, args, mlp=mlp: inputs.__setitem__(mlp, args[0])) for mlp in mixed]
        with torch.no_grad():
            expected = plain(images[sample : sample + 1])
        for hook in hooks:
            hook.remove()
        torch.testing.assert_close(features[sample : sample + 1], expected, rtol=1e-4, atol=1e-5)
        for mlp, hidden in inputs.items():
            with torch.no_grad():
                again = module.mixture.route(mlp, hidden)
            torch.testing.assert_close(again[0], routing[mlp][sample], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("coefficients", [(0.3, 0.3), (0.1, 0.7)])
def test_constant_routers_are_task_arithmetic_at_those_coefficients(coefficients):
    zoo = SyntheticZoo(TINY_CLIP, seed=0, perturbation=0.5)
    module = WEMoEModule(zoo, NUM_CLASSES)
    module.configure_model()
    for router in module.mixture.routers.values():  # the last layer's weights 0: the output is its bias
        last = router.layers[-1]
        last.weight.data.zero_()
        last.bias.data = torch.tensor(coefficients)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        module.on_test_start()
        logits = module(images, "beta")
    plain, theta0, task_vectors = load_plain(zoo)
    mixed = {mlp: {f"{layer}.{kind}" for layer in mixed_layers(plain, mlp) for kind in ("weight", "bias")}
             for mlp in module.mixture.mlp_modules}
    routing = {mlp: torch.tensor([coefficients]) for mlp in mixed}
    plain.load_state_dict(plain_state(theta0, task_vectors, mixed, routing, 0.3, 0))
    with torch.no_grad():
        torch.testing.assert_close(logits, module.heads["beta"](plain(images)), rtol=1e-4, atol=1e-5)
    if coefficients == (0.3, 0.3):  # every tensor at 0.3: the task arithmetic method itself
        arithmetic = TaskArithmeticModule(zoo, NUM_CLASSES)
        arithmetic.configure_model()
        with torch.no_grad():
            arithmetic.on_test_start()
            torch.testing.assert_close(logits, arithmetic(images, "beta"), rtol=1e-4, atol=1e-5)


def test_mlp_modules_found_by_structure():
    torch.manual_seed(0)
    plain, _, _ = load_plain(SyntheticZoo(TINY_CLIP, seed=0))
    blocks = len(plain.transformer.resblocks)
    assert find_mlp_modules(plain) == [f"transformer.resblocks.{i}.mlp" for i in range(blocks)]
    assert mixed_layers(plain, "transformer.resblocks.0.mlp") == [
        "transformer.resblocks.0.mlp.c_fc", "transformer.resblocks.0.mlp.c_proj",
    ]
    efficientnet, _, _ = load_plain(SyntheticZoo(TINY_EFFICIENTNET, seed=0))
    found = find_mlp_modules(efficientnet)
    assert found and all(type(efficientnet.get_submodule(name)).__name__ == "InvertedResidual" for name in found)
    # every pointwise convolution of the block: the expansion, the squeeze-and-excitation's pair, the projection
    assert mixed_layers(efficientnet, found[0]) == [
        f"{found[0]}.{name}" for name in ("conv_pw", "se.conv_reduce", "se.conv_expand", "conv_pwl")
    ]


# ----------------------------------------------------------------------------- training, checkpoints, export




def test_loss_falls_only_routers_train_and_checkpoint_holds_routers(tmp_path):
    zoo = SyntheticZoo(TINY_CLIP, seed=0, perturbation=0.5)
    data = MultiTaskDataModule(synthetic_tasks(), batch_size=4)
    module = WEMoEModule(zoo, NUM_CLASSES, lr=1e-2)
    module.configure_model()
    trainable = {name for name, parameter in module.named_parameters() if parameter.requires_grad}
    assert trainable and all(name.startswith(ROUTERS_PREFIX) for name in trainable)
    assert trainable == {ROUTERS_PREFIX + name for name, _ in module.mixture.routers.named_parameters()}
    frozen = {name: value.detach().clone() for name, value in module.merger.encoder.state_dict().items()}
    task_vectors = {name: module.mixture.stacked(name).clone() for name in module.mixture.tensor_names}
    data.setup("fit")
    images = {task: torch.cat([batch for _, batch in data.unlabeled_batches(task)]) for task in NUM_CLASSES}

    def loss() -> float:  # the summed mean entropy of the heads, computed plainly
        with torch.no_grad():
            total = 0.0
            for task, batch in images.items():
                probabilities = module.heads[task](module.merger(batch, module.static_tensors())).softmax(-1)
                total += float(-(probabilities * probabilities.log()).sum(-1).mean())
            return total

    start = loss()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    cpu_trainer(tmp_path, max_steps=8, enable_checkpointing=True, callbacks=[checkpoint]).fit(module, datamodule=data)
    assert loss() < start
    for name, value in module.merger.encoder.state_dict().items():
        torch.testing.assert_close(value, frozen[name], rtol=0, atol=0)
    for name, value in task_vectors.items():
        torch.testing.assert_close(module.mixture.stacked(name), value, rtol=0, atol=0)

    path = tmp_path / "ckpt" / "last.ckpt"
    state = torch.load(path, weights_only=True, map_location="cpu")
    assert set(state["state_dict"]) == trainable
    loaded = WEMoEModule.load_from_checkpoint(path, zoo=zoo, weights_only=True)
    probe = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loaded.on_test_start()
        module.on_test_start()
        torch.testing.assert_close(loaded(probe, "beta"), module(probe, "beta"), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"(?s)other settings.*model.router_depth: checkpoint 2, yours 1"):
        WEMoEModule.load_from_checkpoint(path, zoo=zoo, router_depth=1, weights_only=True)
    smaller = WEMoEModule(zoo, {"alpha": 5})
    smaller.configure_model()
    with pytest.raises(ValueError, match="router tensor .* has shape"):
        smaller.load_state_dict(state["state_dict"])
    with pytest.raises(KeyError, match=ROUTERS_PREFIX):
        smaller.load_state_dict({"merger.coefficients.raw": torch.zeros(1)})


def test_resume_is_exact_and_the_export_rebuilds_the_model(tmp_path):
    zoo = SyntheticZoo(TINY_EFFICIENTNET, seed=0, perturbation=0.5)

    def fit(steps: int, folder, ckpt_path=None, callbacks=()) -> WEMoEModule:
        module = WEMoEModule(zoo, NUM_CLASSES, lr=1e-2)
        checkpoint = ModelCheckpoint(dirpath=folder, save_last=True)
        trainer = cpu_trainer(folder, max_steps=steps, enable_checkpointing=True, callbacks=[checkpoint, *callbacks])
        trainer.fit(module, datamodule=MultiTaskDataModule(synthetic_tasks(), batch_size=4), ckpt_path=ckpt_path)
        return module

    path = tmp_path / "wemoe.safetensors"
    straight = fit(4, tmp_path / "straight", callbacks=[ExportMergedEncoder(str(path))])
    fit(2, tmp_path / "first")
    resumed = fit(4, tmp_path / "second", ckpt_path=str(tmp_path / "first" / "last.ckpt"))
    for (name, value), (_, other) in zip(straight.mixture.routers.state_dict().items(),
                                         resumed.mixture.routers.state_dict().items()):
        torch.testing.assert_close(other, value, rtol=0, atol=0, msg=name)
    start = WEMoEModule(zoo, NUM_CLASSES)
    start.configure_model()
    assert not torch.equal(start.mixture.routers.state_dict()[next(iter(start.mixture.routers.state_dict()))],
                           straight.mixture.routers.state_dict()[next(iter(start.mixture.routers.state_dict()))])

    # the export, loaded onto a fresh pretrained encoder, gives the module's features to the bit
    fresh = zoo.load(NUM_CLASSES).encoder.eval()
    rebuilt = load_wemoe(path, fresh)
    assert rebuilt.tasks == list(NUM_CLASSES)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        straight.on_test_start()
        torch.testing.assert_close(rebuilt(images), straight.merger(images, straight.task_evaluation_tensors("alpha")),
                                   rtol=0, atol=0)
        with rebuilt.mixture.recording() as routing:
            rebuilt(images)
    expected = straight.routing(images)
    for mlp, value in expected.items():
        torch.testing.assert_close(routing[mlp], value, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no single merged encoder"):
        straight.merged_state_dict()


# ----------------------------------------------------------------------------- bad input
def rewrite_metadata(source, target, **changes) -> None:
    data = source.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"].update(changes)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    target.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length :])


def test_bad_export_files_are_named(tmp_path):
    zoo = SyntheticZoo(TINY_CLIP, seed=0)
    module = WEMoEModule(zoo, NUM_CLASSES)
    path = module.save_wemoe(tmp_path / "good.safetensors")
    encoder = zoo.load(NUM_CLASSES).encoder
    load_wemoe(path, encoder)
    for name, changes, message in [
        ("format", {"format": "other"}, "not a WEMoE export"),
        ("version", {"version": "7"}, "version '7'"),
        ("tasks", {"tasks": "[]"}, "'tasks' must be a non-empty list"),
        ("modules", {"mlp_modules": '["transformer.resblocks.0.nothing"]'}, "no module 'transformer.resblocks.0"),
    ]:
        target = tmp_path / f"{name}.safetensors"
        rewrite_metadata(path, target, **changes)
        with pytest.raises(WEMoEFileError, match=f"{target}.*{message}"):
            load_wemoe(target, zoo.load(NUM_CLASSES).encoder)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WEMoEFileError, match="truncated"):
        load_wemoe(truncated, zoo.load(NUM_CLASSES).encoder)
    other = SyntheticZoo(TINY_EFFICIENTNET, seed=0).load(NUM_CLASSES).encoder
    with pytest.raises(WEMoEFileError, match="does not match the given encoder"):
        load_wemoe(path, other)
    with pytest.raises(ValueError, match="ending in .safetensors"):
        module.save_wemoe(tmp_path / "model.pt")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"scale": float("nan")}, "scale must be a finite number"),
    ({"init": "high"}, "init must be a finite number"),
    ({"router_depth": -1}, "router_depth must be a whole number"),
    ({"router_depth": 1.5}, "router_depth must be a whole number"),
    ({"mlp_modules": []}, "mlp_modules must be a non-empty list"),
    ({"lr": 0.0}, "lr must be positive"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WEMoEModule(SyntheticZoo(TINY_CLIP, seed=0), NUM_CLASSES, **kwargs)


def test_modules_that_are_not_mlps_are_named():
    zoo = SyntheticZoo(TINY_CLIP, seed=0)
    with pytest.raises(ValueError, match="has no module 'transformer.resblocks.9.mlp'"):
        WEMoEModule(zoo, NUM_CLASSES, mlp_modules=["transformer.resblocks.9.mlp"]).configure_model()
    with pytest.raises(ValueError, match=r"module 'transformer.resblocks.0.ln_1' \(LayerNorm\).*no linear layer"):
        WEMoEModule(zoo, NUM_CLASSES, mlp_modules=["transformer.resblocks.0.ln_1"]).configure_model()
    with pytest.raises(ValueError, match="has no module WEMoE recognises as an MLP.*mlp_modules"):
        WEMoEModule(SyntheticZoo("timm:test_resnet", seed=0), NUM_CLASSES).configure_model()
    encoder = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="no task vector for 0.weight"):
        WeightEnsemblingMixture(encoder, {}, mlp_modules=[""])


def test_the_method_by_name_and_the_command(tmp_path):
    module = create_method("wemoe", SyntheticZoo(TINY_CLIP, seed=0), NUM_CLASSES)
    assert isinstance(module, WEMoEModule)
    assert (module.hparams.scale, module.hparams.init, module.hparams.router_depth, module.hparams.lr) == (
        0.3, 0.3, 2, 1e-4)


def test_a_convolutional_blocks_router_reads_each_positions_channels_normalised():
    module = WEMoEModule(SyntheticZoo(TINY_EFFICIENTNET, seed=0), NUM_CLASSES)
    module.configure_model()
    mlp = module.mixture.mlp_modules[0]
    x = 5.0 + 3.0 * torch.randn(2, module.merger.encoder.get_submodule(mlp).conv_pw.in_channels, 4, 4)
    positions = x.permute(0, 2, 3, 1).reshape(2, 16, -1)  # [batch, positions, channels]
    normalised = (positions - positions.mean(-1, keepdim=True)) / (positions.var(-1, unbiased=False, keepdim=True)
                                                                   + 1e-5).sqrt()
    router = module.mixture.routers[mlp.replace(".", "__")]
    with torch.no_grad():
        torch.testing.assert_close(module.mixture.route(mlp, x), router(normalised), rtol=1e-5, atol=1e-6)
