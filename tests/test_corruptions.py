"""Common corruptions (Hendrycks & Dietterich 2019) and the corruption robustness table."""

from __future__ import annotations

import pytest
import torch

from advkit import corruptions as C
from advkit.corruptions import CORRUPTIONS, CorruptionTable, corrupt, corruption_table


@pytest.fixture(scope="module")
def digits(mnist_test):
    x, y = mnist_test
    return x[:200], y[:200]


def distortion(x, name, severity, seed=0):
    return (corrupt(x, name, severity, seed=seed) - x).abs().mean().item()


@pytest.mark.parametrize("name", [n for n in CORRUPTIONS if n != "pixelate"])
def test_the_distortion_grows_with_the_severity(digits, name):
    x, _ = digits
    d = [distortion(x, name, s) for s in range(1, 6)]
    assert all(a < b for a, b in zip(d, d[1:], strict=False)), d
    assert d[0] > 0


def test_pixelate_is_worst_at_severity_five(digits):
    # Not monotonic on 28 pixels (see SEVERITIES' comment), but the coarsest grid is the
    # strongest distortion.
    x, _ = digits
    d = [distortion(x, "pixelate", s) for s in range(1, 6)]
    assert d[4] == max(d) and d[4] > d[0] > 0


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_outputs_are_images_in_the_unit_box_of_the_input_shape(name):
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for s in (1, 5):
        out = corrupt(x, name, s)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_the_same_seed_gives_the_same_images_and_another_seed_other_noise(digits, name):
    x = digits[0][:16]
    assert torch.equal(corrupt(x, name, 3, seed=4), corrupt(x, name, 3, seed=4))
    gen = torch.Generator().manual_seed(9)
    again = torch.Generator().manual_seed(9)
    assert torch.equal(corrupt(x, name, 3, generator=gen), corrupt(x, name, 3, generator=again))
    random = {"gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise",
              "elastic_transform", "rotate", "shear", "translate"}
    if name in random:
        assert not torch.equal(corrupt(x, name, 3, seed=4), corrupt(x, name, 3, seed=5))


def test_the_building_blocks_are_the_identity_at_their_neutral_parameter(digits):
    x = digits[0][:16]
    g = torch.Generator().manual_seed(0)
    assert torch.equal(C.gaussian_noise(x, 0.0, g), x)
    assert torch.equal(C.speckle_noise(x, 0.0, g), x)
    assert torch.equal(C.impulse_noise(x, 0.0, g), x)
    assert torch.equal(C.gaussian_blur(x, 0.0), x)
    assert torch.allclose(C.contrast(x, 1.0), x, atol=1e-6)
    assert torch.equal(C.brightness(x, 0.0), x)
    assert torch.equal(C.pixelate(x, 1.0), x)
    # Bilinear resampling at the pixel centres themselves returns the pixels.
    for out in (C.rotate(x, 0.0, g), C.shear(x, 0.0, g), C.scale(x, 1.0),
                C.translate(x, 0.0, g), C.elastic(x, 0.0, 2.0, g)):
        assert torch.allclose(out, x, atol=1e-5)
    # A disk of radius below one pixel without smoothing is one pixel: the identity.
    assert torch.allclose(C.defocus_blur(x, 0.5, 0.0), x, atol=1e-6)


def test_constants_follow_the_paper_and_transforms_do_what_they_say():
    # CIFAR-10-C's Gaussian noise (make_cifar_c.py): sigma 0.04 .. 0.10.
    assert C.SEVERITIES["gaussian_noise"] == (0.04, 0.06, 0.08, 0.09, 0.10)
    x = torch.full((2, 1, 64, 64), 0.5)
    noisy = corrupt(x, "gaussian_noise", 5)
    assert abs((noisy - x).std().item() - 0.10) < 0.005
    # Contrast keeps the mean and scales the deviation; brightness adds to V.
    img = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 0.5
    low = corrupt(img, "contrast", 2)
    assert torch.allclose(low.mean(dim=(1, 2, 3)), img.mean(dim=(1, 2, 3)), atol=1e-6)
    assert torch.allclose(low - low.mean(dim=(1, 2, 3), keepdim=True),
                          0.5 * (img - img.mean(dim=(1, 2, 3), keepdim=True)), atol=1e-6)
    bright = corrupt(img, "brightness", 1)
    assert torch.allclose(bright.amax(1), img.amax(1) + 0.05, atol=1e-6)
    # Hue kept: the channels keep their ratios.
    assert torch.allclose(bright[:, 0] * img[:, 1], bright[:, 1] * img[:, 0], atol=1e-6)
    # Rotating a centred square by 90 degrees maps it to itself.
    sq = torch.zeros(1, 1, 9, 9)
    sq[..., 3:6, 3:6] = 1
    assert torch.allclose(C.rotate(sq, 90.0), sq, atol=1e-5)


def test_the_table_on_the_mnist_cnn_loses_accuracy_as_noise_grows(mnist_model, digits):
    x, y = digits
    names = ["gaussian_noise", "impulse_noise", "contrast", "rotate"]
    table = corruption_table(mnist_model, x, y, corruptions=names, benchmark="imagenet-c")
    assert table.clean_accuracy >= 0.95 and table.benchmark == "imagenet-c"
    for name in ("gaussian_noise", "impulse_noise", "rotate"):
        acc = table.accuracy[name]
        # Severity 5 is the worst and costs accuracy against severity 1: on the cached CNN
        # (seeds 0 and 1 of the noise) 100% -> 88% (Gaussian), 99-100% -> 69-77% (impulse),
        # 100% -> 78% (rotate); 5 points is a floor well inside those drops.
        assert acc[4] == min(acc) and acc[4] <= acc[0] - 0.05, (name, acc)
    assert table.mean_error() == pytest.approx(
        sum(1 - a for n in names for a in table.accuracy[n]) / (5 * len(names)))
    rows = table.rows()
    assert [r["corruption"] for r in rows] == names and set(rows[0]) >= {"s1", "s5"}
    # The same seed, the same table; the mCE against itself is 1.
    again = corruption_table(mnist_model, x, y, corruptions=names, benchmark="imagenet-c")
    assert again.accuracy == table.accuracy and table.mce(again) == pytest.approx(1.0)
    # CIFAR-10-C's milder constants (the default) on the same images: no worse accuracy.
    mild = corruption_table(mnist_model, x, y, corruptions=["impulse_noise"])
    assert mild.accuracy["impulse_noise"][4] > acc_of(table, "impulse_noise", 5)
    with pytest.raises(ValueError, match="benchmark 'imagenet-c'"):
        mild.mce(CorruptionTable(1.0, {"impulse_noise": [0.5] * 5}, n=1,
                                 benchmark="imagenet-c"))


def acc_of(table, name, severity):
    return table.accuracy[name][table.severities.index(severity)]


def test_mce_normalises_by_the_baseline_errors_as_the_paper_defines():
    me = CorruptionTable(0.9, {"a": [0.8] * 5, "b": [0.6] * 5}, n=10)
    base = CorruptionTable(0.8, {"a": [0.6] * 5, "b": [0.2] * 5}, n=10)
    # CE_a = 5 * 0.2 / (5 * 0.4) = 0.5; CE_b = 5 * 0.4 / (5 * 0.8) = 0.5.
    assert me.corruption_errors(base) == pytest.approx({"a": 0.5, "b": 0.5})
    assert me.mce(base) == pytest.approx(0.5)
    assert me.mce(me) == pytest.approx(1.0)
    # Relative: (0.2 - 0.1) / (0.4 - 0.2) = 0.5 and (0.4 - 0.1) / (0.8 - 0.2) = 0.5.
    assert me.relative_mce(base) == pytest.approx(0.5)
    assert me.mean_error() == pytest.approx(0.3)
    assert me.summary(base)["mce"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="lacks"):
        me.mce(CorruptionTable(0.8, {"a": [0.6] * 5}, n=10))
    with pytest.raises(ValueError, match="no error under a"):
        me.mce(CorruptionTable(1.0, {"a": [1.0] * 5, "b": [0.5] * 5}, n=10))
    with pytest.raises(TypeError, match="CorruptionTable"):
        me.mce(0.5)


def test_bad_input_gets_a_clear_error(mnist_model, digits):
    x, y = digits[0][:4], digits[1][:4]
    for bad in (0, 6, 2.5, True):
        with pytest.raises(ValueError, match="severity must be an integer from 1 to 5"):
            corrupt(x, "contrast", bad)
    with pytest.raises(ValueError, match="did you mean 'gaussian_noise'"):
        corrupt(x, "gausian_noise", 1)
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        corrupt(x, "fog", 1)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        corrupt(x * 255, "contrast", 1)
    with pytest.raises(ValueError, match="N, C, H, W"):
        corrupt(x[0], "contrast", 1)
    with pytest.raises(TypeError, match="floating point"):
        corrupt((x * 255).to(torch.uint8), "contrast", 1)
    with pytest.raises(ValueError, match="severity"):
        corruption_table(mnist_model, x, y, corruptions=["contrast"], severities=(0, 1))
    with pytest.raises(ValueError, match="did you mean 'rotate'"):
        corruption_table(mnist_model, x, y, corruptions=["rotat"])
    with pytest.raises(ValueError, match="unknown benchmark 'mnist-c'"):
        corrupt(x, "contrast", 1, benchmark="mnist-c")
    with pytest.raises(ValueError, match="4 labels"):
        corruption_table(mnist_model, x, y[:3], corruptions=["contrast"])
