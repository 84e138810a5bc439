"""MagNet: the autoencoder trained by the one trainer (and its checkpoint), the reformer that
keeps a real model's clean accuracy, the reconstruction-error and JSD detectors that separate
a non-adaptive PGD from clean images, gradients through both, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from detection import auroc, one_thread
from torch import nn
from typer.testing import CliRunner

from advkit import models
from advkit.cli import app
from advkit.defenses import REJECT, Adaptive, MagNetDetector, Protected, Reformer, bpda
from advkit.defenses.magnet import train_autoencoder
from advkit.training import DenoisingAutoencoder, Recipe, TrainConfig, train

#: The three detectors: reconstruction error in L1 and L2 (the paper's detector I, both used
#: on MNIST) and the JSD of the model's softmax at T = 10 on x and ae(x) (detector II).
KINDS = {"l1": {"norm": "l1"}, "l2": {"norm": "l2"}, "jsd": {"kind": "jsd"}}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny networks: one thread (see detection.one_thread)."""
    with one_thread():
        yield


class _Doubles(nn.Module):
    """An "autoencoder" whose output leaves [0, 1]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


# ---------------------------------------------------------------- the autoencoder, trained


def test_the_trained_autoencoder_checkpoint_reloads_bit_identically(mnist_autoencoder_run):
    run = mnist_autoencoder_run
    loaded = models.load_checkpoint(run.checkpoint)
    assert models.fingerprint(loaded) == models.fingerprint(run.model)
    state, saved = run.model.state_dict(), loaded.state_dict()
    assert set(state) == set(saved) and all(torch.equal(state[k], saved[k]) for k in state)
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), run.model(x))
    meta = loaded.advkit_metadata
    assert meta["architecture"] == "magnet_ae" and meta["recipe"] == "denoising"
    assert meta["config"]["recipe_params"] == {"noise": 0.1}
    assert "num_classes" not in meta["arch_kwargs"]


def test_the_trainer_reports_held_out_reconstruction_mse_for_an_autoencoder(
        mnist_autoencoder_run):
    run = mnist_autoencoder_run
    assert [set(row) for row in run.history] == [{"epoch", "loss", "val_mse", "seconds"}] * 3
    metrics = models.read_metadata(run.checkpoint)["metrics"]
    assert "clean_accuracy" not in metrics
    assert metrics["reconstruction_mse"] == run.history[-1]["val_mse"]
    # Measured over seeds 0-3 (one thread): 0.0023-0.0028 after 3 epochs, from a first epoch
    # at 0.0037-0.0060; an autoencoder stuck on its initial plateau stays near 0.09.
    assert run.history[-1]["val_mse"] < 0.01
    assert run.history[-1]["val_mse"] < run.history[0]["val_mse"]


def test_a_fresh_training_logs_the_test_mse_and_resumes_to_the_same_weights(tmp_path):
    lines: list[str] = []
    config = TrainConfig(arch="magnet_ae", epochs=1, batch_size=50, train_limit=300,
                         val_limit=100, recipe="denoising")
    first = train(config, tmp_path, progress=False, recipe=DenoisingAutoencoder(),
                  log=lines.append)
    assert "test mse" in lines[-1] and "acc" not in lines[-1]
    again = train(config, tmp_path, progress=False, recipe=DenoisingAutoencoder(),
                  log=lambda _: None)
    assert models.fingerprint(again.model) == models.fingerprint(first.model)


def test_the_trainer_refuses_an_architecture_of_the_other_kind(tmp_path):
    with pytest.raises(ValueError, match="trains an autoencoder but small_cnn .*magnet_ae"):
        train(TrainConfig(arch="small_cnn", recipe="denoising"), tmp_path,
              recipe=DenoisingAutoencoder(), progress=False)
    with pytest.raises(ValueError, match="trains a classifier but magnet_ae .*small_cnn"):
        train(TrainConfig(arch="magnet_ae"), tmp_path, recipe=Recipe(), progress=False)


@pytest.mark.parametrize("noise", [-0.1, float("nan"), "0.1", True])
def test_the_denoising_recipe_refuses_a_bad_noise(noise):
    with pytest.raises(ValueError, match="noise must be"):
        DenoisingAutoencoder(noise=noise)


def test_advkit_train_trains_the_autoencoder_and_skips_the_model_card(tmp_path, monkeypatch):
    monkeypatch.setenv("ADVKIT_MODEL_DIR", str(tmp_path / "models"))
    result = CliRunner().invoke(app, ["train", "--defense", "denoising", "--noise", "0.2",
                                      "--epochs", "1", "--train-limit", "256", "--out",
                                      str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["installed"].endswith("magnet_ae-mnist-denoising.safetensors")
    assert "card" not in summary and "val_mse" in summary["history"][0]
    meta = models.read_metadata(summary["installed"])
    assert meta["architecture"] == "magnet_ae"  # the default architecture for denoising
    assert meta["config"]["lr"] == 0.03 and meta["config"]["recipe_params"]["noise"] == 0.2


# ---------------------------------------------------------------- the reformer


def test_the_reformer_keeps_clean_accuracy_on_the_mnist_model(mnist_model, mnist_test,
                                                              mnist_autoencoder):
    # First 500 test images; accuracy with the reformer minus clean accuracy, measured with
    # the autoencoder trained with seeds 0-3 on the cached test model (98.8% clean) and on
    # the test model retrained with seeds 1-3 (98.8-99.6% clean): +0.4 to +0.6 points on
    # the cached model, -0.6 to +0.6 over all sixteen pairs. Bound: 1.5 points lost.
    x, y = mnist_test[0][:500], mnist_test[1][:500]
    with torch.no_grad():
        clean = (mnist_model(x).argmax(1) == y).float().mean().item()
        kept = (mnist_model(Reformer(mnist_autoencoder)(x)).argmax(1) == y).float().mean().item()
    assert kept >= clean - 0.015


def test_the_reformer_is_the_autoencoder_and_differentiable(mnist_model, mnist_autoencoder):
    reformer = Reformer(mnist_autoencoder)
    assert reformer.adaptive == Adaptive("differentiable")
    assert bpda(reformer) is reformer  # nothing to approximate
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = reformer(x)
    assert torch.equal(out, mnist_autoencoder(x))
    (grad,) = torch.autograd.grad(mnist_model(out).logsumexp(1).sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_the_reformer_loads_a_checkpoint_path(mnist_autoencoder_run):
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(Reformer(mnist_autoencoder_run.checkpoint)(x),
                           mnist_autoencoder_run.model(x))


# ---------------------------------------------------------------- the detectors


@pytest.mark.parametrize("kind", list(KINDS))
def test_magnet_detects_non_adaptive_pgd(kind, mnist_model, mnist_detection_split,
                                         mnist_autoencoder):
    # Measured on 300 clean vs 300 PGD test images (as tests/test_detectors.py), with the
    # autoencoder trained with seeds 0-3, on the cached test model and on the test model
    # retrained with seeds 1-3 (sixteen pairs): L1 and L2 errors 1.00 on every pair, JSD
    # (T = 10) 0.990-0.999 (0.990-0.996 on the cached model).
    x_fit, _, _, clean_test, adv_test = mnist_detection_split
    detector = MagNetDetector(mnist_autoencoder, **KINDS[kind]).fit(mnist_model, x_fit)
    assert auroc(detector, clean_test, adv_test) >= 0.9


def test_the_threshold_is_set_on_every_clean_image(mnist_model, mnist_detection_split,
                                                   mnist_autoencoder):
    x_fit = mnist_detection_split[0]
    detector = MagNetDetector(mnist_autoencoder).fit(mnist_model, x_fit, fpr=0.1)
    assert not detector.learns
    assert abs(int(detector.flag(x_fit).sum()) - 0.1 * len(x_fit)) <= 1


@pytest.mark.parametrize("kind", list(KINDS))
def test_attack_score_is_the_score_with_gradients_to_x(kind, mnist_model, mnist_detection_split,
                                                       mnist_autoencoder):
    x_fit, _, _, clean_test, adv_test = mnist_detection_split
    detector = MagNetDetector(mnist_autoencoder, **KINDS[kind]).fit(mnist_model, x_fit[:200])
    x = torch.cat([clean_test[:4], adv_test[:4]]).requires_grad_(True)
    scores = detector.attack_score(x)
    torch.testing.assert_close(scores.detach(), detector.score(x.detach()))
    (grad,) = torch.autograd.grad(scores.sum(), x)
    assert torch.isfinite(grad).all() and (grad.flatten(1).abs().sum(1) > 0).all()


def test_the_reconstruction_error_is_the_norm_of_x_minus_ae_x(mnist_model, mnist_detection_split,
                                                             mnist_autoencoder):
    x_fit = mnist_detection_split[0][:100]
    with torch.no_grad():
        diff = (x_fit - mnist_autoencoder(x_fit)).flatten(1)
    for norm, p in (("l1", 1), ("l2", 2)):
        detector = MagNetDetector(mnist_autoencoder, norm=norm).fit(mnist_model, x_fit)
        torch.testing.assert_close(detector.score(x_fit), diff.norm(p=p, dim=1))


def test_reformer_and_detector_make_a_protected_pipeline(mnist_model, mnist_detection_split,
                                                         mnist_autoencoder):
    """MagNet as deployed: reform, classify, reject what the detector flags."""
    x_fit, y_fit, _, clean_test, adv_test = mnist_detection_split
    detector = MagNetDetector(mnist_autoencoder)
    pipeline = Protected(mnist_model, transforms=[Reformer(mnist_autoencoder)],
                         detectors=[detector]).fit(x_fit, y_fit)
    x = torch.cat([clean_test, adv_test])
    predicted = pipeline.predict(x)
    assert torch.equal(predicted == REJECT, detector.flag(x))
    with torch.no_grad():
        reformed = mnist_model(mnist_autoencoder(x)).argmax(1)
    kept = predicted != REJECT
    assert torch.equal(predicted[kept], reformed[kept])


# ---------------------------------------------------------------- bad input


def test_an_unfitted_detector_says_fit_first(mnist_autoencoder):
    with pytest.raises(RuntimeError, match="fit the detector first"):
        MagNetDetector(mnist_autoencoder).score(torch.rand(2, 1, 28, 28))


@pytest.mark.parametrize("build", [Reformer, MagNetDetector])
def test_an_autoencoder_that_is_not_a_module_is_refused(build):
    with pytest.raises(TypeError, match="autoencoder must be an nn.Module"):
        build(lambda x: x)


def test_an_autoencoder_that_changes_the_shape_is_refused(mnist_model):
    x = torch.rand(40, 1, 28, 28)
    with pytest.raises(ValueError, match=r"same shape \(got \(40, 1, 14, 14\)\)"):
        Reformer(nn.AvgPool2d(2).eval())(x)
    with pytest.raises(ValueError, match="same shape"):
        MagNetDetector(nn.AvgPool2d(2).eval()).fit(mnist_model, x)
    with pytest.raises(ValueError, match="even height and width"):
        Reformer(models.create("magnet_ae"))(torch.rand(2, 1, 27, 27))


def test_an_autoencoder_whose_output_leaves_the_unit_range_is_refused(mnist_model):
    with pytest.raises(ValueError, match=r"outside \[0, 1\].*sigmoid"):
        Reformer(_Doubles().eval())(torch.full((1, 1, 28, 28), 0.75))
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        MagNetDetector(_Doubles().eval()).fit(mnist_model, torch.full((20, 1, 28, 28), 0.75))


def test_a_classifier_checkpoint_is_not_an_autoencoder(tmp_path):
    path = models.save(models.create("small_cnn"), tmp_path / "cnn.safetensors",
                       architecture="small_cnn")
    with pytest.raises(ValueError, match="not an autoencoder"):
        Reformer(path)


def test_input_of_another_shape_than_fitted_is_refused(mnist_model, mnist_autoencoder):
    detector = MagNetDetector(mnist_autoencoder).fit(mnist_model, torch.rand(40, 1, 28, 28))
    with pytest.raises(ValueError, match=r"\(1, 28, 28\).*\(1, 32, 32\)"):
        detector.score(torch.rand(2, 1, 32, 32))


@pytest.mark.parametrize(("options", "message"), [
    ({"kind": "mse"}, "kind must be 'error'"),
    ({"norm": "linf"}, "norm must be 'l1' or 'l2'"),
    ({"kind": "jsd", "temperature": 0}, "temperature must be a number > 0"),
    ({"temperature": float("inf")}, "temperature must be"),
])
def test_bad_settings_are_refused(options, message, mnist_autoencoder):
    with pytest.raises(ValueError, match=message):
        MagNetDetector(mnist_autoencoder, **options)


def test_train_autoencoder_names_the_recipe_and_the_architecture(tmp_path):
    run = train_autoencoder("mnist", tmp_path, epochs=1, train_limit=200, progress=False,
                            log=lambda _: None)
    meta = models.read_metadata(run.checkpoint)
    assert meta["architecture"] == "magnet_ae" and meta["recipe"] == "denoising"
    assert meta["config"]["lr"] == 0.03 and meta["config"]["batch_size"] == 32
