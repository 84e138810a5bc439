"""Specification of advkit.models: the zoo, the Normalize layer, checkpoints (safetensors +
metadata, fingerprint-checked) and ``advkit.models.load`` for every way a model arrives,
unpickling nothing unless trusted."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from advkit import models
from advkit.models import ARCHITECTURES, Normalize, fingerprint
from advkit.models.zoo import AUTOENCODERS, CLASSIFIERS

#: Batch sizes for the forward check: the two CIFAR ResNets are slow on a CPU.
BATCH = {"preact_resnet18": 2, "wrn_28_10": 1}


@pytest.fixture(autouse=True)
def _model_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Trained zoo models are looked up in a fresh folder, never in the user's cache."""
    folder = tmp_path / "model-dir"
    monkeypatch.setenv("ADVKIT_MODEL_DIR", str(folder))
    return folder


def images(shape: tuple[int, ...] = (1, 28, 28), n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


def seeded(name: str, seed: int = 0, **kwargs: object) -> nn.Module:
    torch.manual_seed(seed)
    return models.create(name, **kwargs)


class TinyNet(nn.Module):
    """A model class importable from this module, for whole-module pickles."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(28 * 28, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class WritesMarker:
    """Unpickling this runs code: it creates the file ``marker`` (a harmless stand-in)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


# ---------------------------------------------------------------- the zoo and Normalize


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_every_zoo_classifier_maps_images_of_its_input_shape_to_logits(name):
    shape = ARCHITECTURES[name].input_shape
    n = BATCH.get(name, 3)
    model = models.create(name)
    with torch.no_grad():
        logits = model(images(shape, n))
    assert logits.shape == (n, 10)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_every_zoo_classifier_applies_normalize_first_to_the_raw_input(name):
    kwargs = {"depth": 10, "widen": 1} if name == "wrn_28_10" else {}
    model = models.create(name, **kwargs)
    calls: list[tuple[nn.Module, torch.Tensor]] = []
    for module in model.modules():
        if not list(module.children()):
            module.register_forward_pre_hook(lambda m, args: calls.append((m, args[0])))
    x = images(ARCHITECTURES[name].input_shape, 1)
    with torch.no_grad():
        model(x)
    first, seen = calls[0]
    assert isinstance(first, Normalize)
    assert seen is x


@pytest.mark.parametrize("name", AUTOENCODERS)
def test_every_zoo_autoencoder_maps_images_to_images_of_the_same_shape_in_unit_range(name):
    shape = ARCHITECTURES[name].input_shape
    model = models.create(name)
    with torch.no_grad():
        out = model(images(shape, 3))
    assert out.shape == (3, *shape)
    assert out.min() >= 0 and out.max() <= 1


def test_the_zoo_is_classifiers_and_autoencoders():
    assert sorted(CLASSIFIERS + AUTOENCODERS) == sorted(ARCHITECTURES)
    assert "magnet_ae" in AUTOENCODERS and "small_cnn" in CLASSIFIERS


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_create_returns_a_model_in_eval_mode(name):
    kwargs = {"depth": 10, "widen": 1} if name == "wrn_28_10" else {}
    assert not any(m.training for m in models.create(name, **kwargs).modules())


def test_create_takes_the_number_of_classes_and_channels():
    model = models.create("small_cnn", num_classes=5, channels=3)
    assert model(images((3, 28, 28), 2)).shape == (2, 5)


def test_create_refuses_an_unknown_architecture_by_name():
    with pytest.raises(ValueError, match="resnet9000"):
        models.create("resnet9000")


@pytest.mark.parametrize("std", [0.0, -0.5])
def test_normalize_refuses_a_non_positive_std(std):
    with pytest.raises(ValueError, match="std must be > 0"):
        Normalize((0.5, 0.5), (0.2, std))


def test_normalize_subtracts_the_mean_and_divides_by_the_std_per_channel():
    layer = Normalize((0.1, 0.5), (0.2, 0.25))
    x = torch.tensor([0.1, 0.75]).view(1, 2, 1, 1).expand(1, 2, 3, 3)
    torch.testing.assert_close(layer(x), torch.tensor([0.0, 1.0]).view(1, 2, 1, 1).expand_as(x))


# ---------------------------------------------------------------- fingerprints and checkpoints


def test_fingerprint_is_the_same_for_an_identical_copy():
    model = seeded("small_cnn")
    assert fingerprint(copy.deepcopy(model)) == fingerprint(model)


def test_fingerprint_changes_when_one_weight_changes():
    model = seeded("small_cnn")
    before = fingerprint(model)
    with torch.no_grad():
        model[-1].bias[3] += 1e-6
    assert fingerprint(model) != before


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    model = seeded("small_cnn", seed=1)
    path = models.save(model, tmp_path / "m.safetensors", architecture="small_cnn")
    x = images()
    loaded = models.load_checkpoint(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_checkpoint_round_trip_keeps_architecture_arguments_and_batchnorm_statistics(tmp_path):
    model = seeded("wrn_28_10", depth=10, widen=1)
    model.train()
    with torch.no_grad():  # move the running statistics away from their initial values
        model(images((3, 32, 32), 8))
    model.eval()
    path = models.save(model, tmp_path / "wrn.safetensors", architecture="wrn_28_10",
                       arch_kwargs={"depth": 10, "widen": 1})
    loaded = models.load(path)
    x = images((3, 32, 32), 2, seed=1)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert fingerprint(loaded) == fingerprint(model)


def test_checkpoint_metadata_holds_architecture_dataset_fingerprint_and_extras(tmp_path):
    model = seeded("lenet5")
    path = models.save(model, tmp_path / "m.safetensors", architecture="lenet5",
                       dataset="fashion-mnist", metrics={"clean_accuracy": 0.9})
    meta = models.read_metadata(path)
    assert meta["architecture"] == "lenet5"
    assert meta["dataset"] == "fashion-mnist"
    assert meta["fingerprint"] == fingerprint(model)
    assert meta["metrics"] == {"clean_accuracy": 0.9}
    assert models.load(path).advkit_metadata == meta


def test_save_refuses_an_architecture_outside_the_zoo(tmp_path):
    with pytest.raises(ValueError, match="my_net"):
        models.save(TinyNet(), tmp_path / "m.safetensors", architecture="my_net")


def test_a_checkpoint_whose_weights_were_altered_after_saving_is_refused(tmp_path):
    path = models.save(seeded("small_cnn"), tmp_path / "m.safetensors", architecture="small_cnn")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    tensors["8.bias"] = tensors["8.bias"] + 0.01  # a real weight; the old metadata is kept
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ValueError, match="fingerprint"):
        models.load(path)


@pytest.mark.parametrize("keep", ["half", "header", "3 bytes", "nothing"])
def test_a_truncated_checkpoint_gives_a_clear_error(tmp_path, keep):
    path = models.save(seeded("small_cnn"), tmp_path / "m.safetensors", architecture="small_cnn")
    raw = path.read_bytes()
    header = 8 + int.from_bytes(raw[:8], "little")
    cut = {"half": len(raw) // 2, "header": header, "3 bytes": 3, "nothing": 0}[keep]
    path.write_bytes(raw[:cut])
    with pytest.raises(ValueError, match="m.safetensors is not a readable safetensors file"):
        models.load(path)


def test_a_file_of_garbage_named_safetensors_gives_a_clear_error(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"this is not a model " * 50)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        models.load(path)


def test_a_plain_safetensors_state_dict_is_pointed_to_the_factory_loader(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file(seeded("small_cnn").state_dict(), str(path))
    with pytest.raises(ValueError, match="module:factory"):
        models.load(path)


# ---------------------------------------------------------------- load: zoo names


def test_a_zoo_name_loads_the_trained_checkpoint_from_the_model_dir(_model_dir):
    model = seeded("small_cnn", seed=3)
    models.save(model, _model_dir / "small_cnn-mnist.safetensors", architecture="small_cnn")
    x = images()
    for name in ("small_cnn", "small_cnn-mnist"):
        loaded = models.load(name)
        assert not loaded.training
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))


def test_a_zoo_name_with_a_dataset_loads_that_datasets_checkpoint(_model_dir):
    model = seeded("lenet5", seed=4)
    models.save(model, _model_dir / "lenet5-fashion-mnist.safetensors", architecture="lenet5")
    assert fingerprint(models.load("lenet5-fashion-mnist")) == fingerprint(model)


def test_an_autoencoder_is_refused_where_a_classifier_is_loaded(_model_dir, tmp_path):
    # MagNet's autoencoder is a zoo model too, but it maps images to images: evaluating it
    # as a classifier would fail later and obscurely.
    ae = models.create("magnet_ae")
    models.save(ae, _model_dir / "magnet_ae-mnist.safetensors", architecture="magnet_ae")
    models.save(ae, tmp_path / "ae.safetensors", architecture="magnet_ae")
    for spec in ("magnet_ae", "magnet_ae-mnist", tmp_path / "ae.safetensors"):
        with pytest.raises(ValueError, match="autoencoder, not a classifier.*reformer"):
            models.load(spec)


def test_an_untrained_zoo_name_says_how_to_train_it(_model_dir):
    with pytest.raises(FileNotFoundError, match="advkit train --arch lenet5") as err:
        models.load("lenet5")
    assert str(_model_dir / "lenet5-mnist.safetensors") in str(err.value)


def test_a_spec_that_is_nothing_known_is_refused_by_name():
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        models.load("no_such_model")


# ---------------------------------------------------------------- load: package.module:factory


@pytest.fixture
def factory_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``<package>.nets:build`` in a fresh package on sys.path; build() has dropout, so only an
    eval-mode model gives deterministic outputs."""
    package = f"advkit_factory_{uuid.uuid4().hex[:8]}"
    root = tmp_path / "site" / package
    root.mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "nets.py").write_text(
        "from torch import nn\n\n\n"
        "def build():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(),\n"
        "                         nn.Dropout(0.5), nn.Linear(32, 10))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield f"{package}.nets:build"
    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        del sys.modules[name]


def reference_from(spec: str, seed: int = 5) -> nn.Module:
    module, _, factory = spec.partition(":")
    torch.manual_seed(seed)
    return getattr(__import__(module, fromlist=[factory]), factory)().eval()


def test_a_factory_with_safetensors_weights_loads_those_weights_in_eval_mode(factory_spec,
                                                                              tmp_path):
    reference = reference_from(factory_spec)
    weights = tmp_path / "w.safetensors"
    save_file(reference.state_dict(), str(weights))
    loaded = models.load(factory_spec, weights=weights)
    assert not loaded.training
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))


def test_a_factory_with_a_state_dict_pt_file_loads_those_weights(factory_spec, tmp_path):
    reference = reference_from(factory_spec)
    weights = tmp_path / "w.pt"
    torch.save(reference.state_dict(), weights)
    loaded = models.load(factory_spec, weights=weights)
    assert not loaded.training
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))


def test_a_factory_refuses_weights_that_do_not_fit(factory_spec, tmp_path):
    weights = tmp_path / "w.safetensors"
    save_file(seeded("small_cnn").state_dict(), str(weights))
    with pytest.raises(ValueError, match="does not fit the model"):
        models.load(factory_spec, weights=weights)


def test_a_missing_factory_module_is_reported_by_name():
    with pytest.raises(ImportError, match="advkit_no_such_package"):
        models.load("advkit_no_such_package.nets:build")


# ---------------------------------------------------------------- load: TorchScript and ONNX


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_torchscript_archive_loads_with_identical_outputs(tmp_path):
    model = seeded("small_cnn")
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    loaded = models.load(path)
    assert not loaded.training
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.fixture
def onnx_pair(tmp_path: Path) -> tuple[nn.Module, nn.Module]:
    """A zoo model and its ONNX export loaded back through advkit.models.load."""
    pytest.importorskip("onnx")
    if importlib.util.find_spec("onnx2torch") is None:
        pytest.skip("onnx2torch is not installed")
    model = seeded("lenet5")
    path = tmp_path / "lenet5.onnx"
    torch.onnx.export(model, (images(n=1),), str(path), dynamo=False, input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})
    return model, models.load(path)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_an_onnx_model_gives_the_outputs_of_the_torch_model(onnx_pair):
    model, converted = onnx_pair
    assert not converted.training
    x = images(n=8)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_an_onnx_model_has_the_input_gradients_of_the_torch_model(onnx_pair):
    model, converted = onnx_pair
    x, y = images(n=8), torch.arange(8)

    def input_gradient(net: nn.Module) -> torch.Tensor:
        xg = x.clone().requires_grad_(True)
        nn.functional.cross_entropy(net(xg), y).backward()
        return xg.grad

    grad = input_gradient(converted)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, input_gradient(model), rtol=1e-3, atol=1e-6)


# ---------------------------------------------------------------- load: pickles


@pytest.fixture
def malicious(tmp_path: Path) -> tuple[Path, Path]:
    """A torch file whose unpickling would create ``marker``."""
    marker = tmp_path / "marker"
    path = tmp_path / "model.pt"
    torch.save({"state_dict": WritesMarker(marker)}, path)
    return path, marker


def test_the_malicious_files_payload_runs_when_unpickled(malicious):
    path, marker = malicious  # the control: refusing this file below is not vacuous
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_a_malicious_pickle_is_refused_without_trust_and_runs_nothing(malicious):
    path, marker = malicious
    with pytest.raises(ValueError, match="trust=True"):
        models.load(path)
    assert not marker.exists()


def test_malicious_factory_weights_are_refused_without_trust_and_run_nothing(malicious,
                                                                               factory_spec):
    path, marker = malicious
    with pytest.raises(ValueError, match="trust=True"):
        models.load(factory_spec, weights=path)
    assert not marker.exists()


@pytest.mark.parametrize("trust", [False, True])
def test_a_truncated_torch_file_is_called_damaged_not_untrusted(factory_spec, tmp_path, trust):
    path = tmp_path / "weights.pt"
    torch.save(models.load(factory_spec).state_dict(), path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError, match="truncated or damaged") as info:
        models.load(factory_spec, weights=path, trust=trust)
    assert "--trust" not in str(info.value)  # trusting a broken file would not help


def test_a_damaged_safetensors_file_is_named(tmp_path):
    path = models.save(seeded("small_cnn"), tmp_path / "m.safetensors", architecture="small_cnn")
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="m.safetensors"):
        models.load_checkpoint(path)


def test_bad_json_metadata_names_the_file(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"advkit": "{not json"})
    with pytest.raises(ValueError, match=r"bad.safetensors: its advkit metadata is not valid"):
        models.read_metadata(path)


def test_a_checkpoint_without_a_fingerprint_warns_that_its_weights_are_unchecked(tmp_path):
    model = seeded("small_cnn")
    path = tmp_path / "old.safetensors"
    meta = {"format": "advkit-checkpoint/1", "architecture": "small_cnn", "arch_kwargs": {}}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"advkit": json.dumps(meta)})
    with pytest.warns(UserWarning, match="records no fingerprint"):
        models.load_checkpoint(path)


def test_a_pickled_whole_module_is_refused_without_trust(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(TinyNet(), path)
    with pytest.raises(ValueError, match="trust"):
        models.load(path)


def test_a_pickled_whole_module_loads_with_trust_in_eval_mode(tmp_path):
    torch.manual_seed(0)
    model = TinyNet().train()
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    loaded = models.load(path, trust=True)
    assert isinstance(loaded, TinyNet)
    assert not loaded.training
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_a_plain_state_dict_file_without_a_factory_asks_for_one(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(seeded("small_cnn").state_dict(), path)
    with pytest.raises(ValueError, match="module:factory"):
        models.load(path)


def test_checkpoint_metadata_is_plain_json_in_the_safetensors_header(tmp_path):
    path = models.save(seeded("mlp"), tmp_path / "m.safetensors", architecture="mlp",
                       recipe="standard")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["advkit"])
    assert meta["format"] == "advkit-checkpoint/1"
    assert meta["recipe"] == "standard"
