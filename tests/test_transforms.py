"""Input reconstruction transforms: what each computes, that each keeps a real model's clean
accuracy, and that BPDA differentiates them through their declared approximation."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from advkit.defenses import (
    JPEG,
    Adaptive,
    BitDepth,
    MedianSmoothing,
    TotalVariation,
    Transform,
    bpda,
    total_variation,
)

TRANSFORMS = [BitDepth(bits=4), MedianSmoothing(size=3), JPEG(quality=75), TotalVariation()]
IDS = [type(t).__name__ for t in TRANSFORMS]
#: With the random one, for what holds of every draw.
ALL, ALL_IDS = [*TRANSFORMS, TotalVariation(keep=0.5)], [*IDS, "TotalVariation-dropout"]
#: The transforms attacked through BPDA with the identity.
BPDA, BPDA_IDS = TRANSFORMS[:2], IDS[:2]


def _images(channels: int = 1, n: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("transform", ALL, ids=ALL_IDS)
@pytest.mark.parametrize("channels", [1, 3])
def test_output_is_an_image_in_unit_range_of_the_same_shape(transform: Transform,
                                                             channels: int) -> None:
    x = _images(channels)
    out = transform(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("transform", TRANSFORMS, ids=IDS)
def test_every_transform_declares_its_adaptive_attack(transform: Transform) -> None:
    assert isinstance(transform.adaptive, Adaptive)
    # TotalVariation's solver is unrolled torch operations: differentiated exactly; JPEG
    # through its torch approximation.
    expected = {TotalVariation: "differentiable", JPEG: "bpda:differentiable-jpeg"}.get(
        type(transform), "bpda:identity")
    assert str(transform.adaptive) == expected


def _pillow_distance(x: torch.Tensor, quality: int) -> tuple[float, float]:
    """Mean |approximation - Pillow| (hard rounding) and mean |x - Pillow| (the identity)."""
    from advkit.defenses.transforms import _jpeg_approximation

    real = JPEG(quality)(x)
    return (float((_jpeg_approximation(x, quality, hard=True) - real).abs().mean()),
            float((x - real).abs().mean()))


@pytest.mark.parametrize("quality", [30, 75, 95])
def test_jpeg_approximation_is_close_to_pillows_round_trip(mnist_test, quality: int) -> None:
    # Measured (mean absolute error, pixel units): grayscale MNIST 0.0007-0.0012 against the
    # identity's 0.002-0.019; smooth RGB images (29 x 27, odd sizes: padding and chroma
    # subsampling at the edges) 0.004-0.006 against 0.025-0.067.
    x = mnist_test[0][:100]
    approx, identity = _pillow_distance(x, quality)
    assert approx < 0.002 and approx < identity / 1.5
    g = torch.Generator().manual_seed(0)
    rgb = F.interpolate(torch.rand(8, 3, 8, 8, generator=g), size=(29, 27), mode="bilinear")
    approx, identity = _pillow_distance(rgb, quality)
    assert approx < 0.01 and approx < identity / 3


def test_jpeg_is_attacked_through_its_approximation() -> None:
    transform = JPEG(75)
    x = _images(3).requires_grad_(True)
    attacked = transform.for_attack()
    out = attacked(x)
    assert torch.equal(out, transform(x))  # the forward pass is Pillow's
    (grad,) = torch.autograd.grad(out.sum(), x)
    xa = x.detach().requires_grad_(True)
    (expected,) = torch.autograd.grad(transform.approximation(xa).sum(), xa)
    assert torch.isfinite(grad).all() and torch.equal(grad, expected)
    assert not torch.allclose(grad, torch.ones_like(grad))


def test_total_variation_is_attacked_through_its_own_gradients() -> None:
    # for_attack differentiates the unrolled solver: its gradient is not the identity's, and
    # it matches a finite difference of the transform.
    transform = TotalVariation(weight=0.1, steps=20)
    assert transform.for_attack() is transform
    x = _images(1).double().clamp(0.2, 0.8).requires_grad_(True)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    (grad,) = torch.autograd.grad((w * transform(x)).sum(), x)
    assert not torch.allclose(grad, w)
    d = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    h = 1e-5
    with torch.no_grad():
        numeric = ((w * transform(x + h * d)).sum() - (w * transform(x - h * d)).sum()) / (2 * h)
    assert torch.isclose((grad * d).sum(), numeric, rtol=1e-4)


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_bit_depth_rounds_to_multiples_of_one_level_and_is_idempotent(bits: int) -> None:
    levels = 2 ** bits - 1
    out = BitDepth(bits)(_images())
    assert torch.allclose(out * levels, (out * levels).round(), atol=1e-5)
    assert torch.equal(BitDepth(bits)(out), out)


def test_bit_depth_rounds_to_the_nearest_level() -> None:
    x = torch.tensor([0.0, 0.2, 0.49, 0.51, 0.8, 1.0]).view(1, 1, 1, 6)
    assert BitDepth(1)(x).flatten().tolist() == [0, 0, 0, 1, 1, 1]


def test_median_smoothing_removes_isolated_salt_and_pepper_pixels_exactly() -> None:
    clean = torch.full((2, 3, 12, 12), 0.5)
    noisy = clean.clone()
    noisy[0, 0, 3, 4] = 1.0  # salt
    noisy[1, 2, 7, 9] = 0.0  # pepper
    noisy[0, 1, 0, 0] = 1.0  # in a corner, where reflect padding matters
    assert torch.equal(MedianSmoothing(3)(noisy), clean)


def test_median_smoothing_of_size_one_is_the_identity() -> None:
    x = _images()
    assert torch.equal(MedianSmoothing(1)(x), x)


def test_jpeg_changes_the_image() -> None:
    x = _images(3)
    assert (JPEG(75)(x) - x).abs().max() > 0.05


def test_jpeg_at_quality_100_is_close_to_the_input() -> None:
    # A smooth image (noise loses more). Measured: grayscale within 1.5/255 everywhere; RGB
    # within 0.71/255 on average but 8/255 at worst, as Pillow halves the chroma resolution.
    ramp = torch.linspace(0, 1, 32)
    x = torch.stack([ramp.view(1, -1) * ramp.view(-1, 1), ramp.view(1, -1).expand(32, 32),
                     ramp.view(-1, 1).expand(32, 32)]).unsqueeze(0)
    gray, rgb = (JPEG(100)(image) - image for image in (x[:, :1], x))
    assert gray.abs().max() <= 2 / 255
    assert rgb.abs().mean() <= 1 / 255 and rgb.abs().max() <= 10 / 255


@pytest.mark.parametrize("channels,mode", [(1, "L"), (3, "RGB")])
def test_jpeg_is_pillows_round_trip(channels: int, mode: str) -> None:
    x = (_images(channels, n=2) * 255).round() / 255
    pixels = (x[1] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(
        buffer, format="JPEG", quality=60)
    expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue()))).reshape(pixels.shape)
    expected = torch.from_numpy(expected.copy()).permute(2, 0, 1).float() / 255
    assert torch.equal(JPEG(60)(x)[1], expected)


def test_total_variation_minimisation_reduces_total_variation() -> None:
    x = _images(3)
    assert (total_variation(TotalVariation(weight=0.1)(x)) < 0.7 * total_variation(x)).all()


def test_total_variation_minimisation_lowers_its_objective_with_more_steps() -> None:
    x = _images(3)

    def objective(z: torch.Tensor) -> torch.Tensor:
        return ((z - x) ** 2).flatten(1).sum(1) / 2 + 0.1 * total_variation(z)

    few, many = (objective(TotalVariation(0.1, steps=s)(x)) for s in (2, 50))
    assert (many <= few).all() and (few < objective(x)).all()


def test_total_variation_with_pixel_dropout_is_random_and_declares_eot() -> None:
    x = _images(3)
    transform = TotalVariation(keep=0.5)
    torch.manual_seed(0)
    first, second = transform(x), transform(x)
    torch.manual_seed(0)
    assert torch.equal(transform(x), first)
    assert not torch.equal(first, second)
    assert str(transform.adaptive) == "eot"
    assert transform.for_attack() is transform  # each EOT draw differentiates the solver
    assert first.min() >= 0 and first.max() <= 1


def test_total_variation_fills_dropped_pixels_from_their_neighbours() -> None:
    # A constant image: whatever is dropped, the minimiser is the constant, so the dropped
    # pixels (which the solver starts at 0, unseen) must end at the constant too.
    x = torch.full((2, 1, 12, 12), 0.5)
    torch.manual_seed(0)
    out = TotalVariation(weight=0.1, steps=100, keep=0.5)(x)
    assert torch.allclose(out, x, atol=1e-3)


@pytest.mark.parametrize("transform", TRANSFORMS, ids=IDS)
def test_bpda_forward_is_the_transform(transform: Transform) -> None:
    x = _images()
    assert torch.equal(bpda(transform)(x), transform(x))
    assert torch.equal(transform.for_attack()(x), transform(x))


@pytest.mark.parametrize("transform", BPDA, ids=BPDA_IDS)
def test_bpda_gradient_is_the_identitys(transform: Transform) -> None:
    x = _images().requires_grad_(True)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad((w * bpda(transform)(x)).sum(), x)
    assert torch.equal(grad, w)


def test_bpda_differentiates_a_declared_approximation() -> None:
    class Squash(Transform):
        adaptive = Adaptive("bpda", "halve")

        def _transform(self, x: torch.Tensor) -> torch.Tensor:
            return (x * 2).round() / 2

        def approximation(self, x: torch.Tensor) -> torch.Tensor:
            return x / 2

    x = _images().requires_grad_(True)
    (grad,) = torch.autograd.grad(bpda(Squash())(x).sum(), x)
    assert torch.equal(grad, torch.full_like(x, 0.5))


def test_bpda_refuses_what_is_not_a_transform() -> None:
    with pytest.raises(TypeError, match="got Identity"):
        bpda(torch.nn.Identity())


@pytest.mark.parametrize("transform", TRANSFORMS, ids=IDS)
def test_each_transform_keeps_clean_accuracy_on_the_mnist_model(
        transform: Transform, mnist_model: torch.nn.Module,
        mnist_test: tuple[torch.Tensor, torch.Tensor]) -> None:
    # First 500 test images; accuracy after the transform minus clean accuracy, measured on
    # the test model retrained with seeds 0-3 (clean 98.8-99.6%): BitDepth(4) 0 on all four,
    # MedianSmoothing(3) -0.8 to -2.0 points, JPEG(75) 0 to +0.4, TotalVariation() -0.4 to
    # +0.2 (TotalVariation(keep=0.5), not tested here, -2.2 to -4.2). Bound: 3 points.
    x, y = mnist_test[0][:500], mnist_test[1][:500]
    with torch.no_grad():
        clean = (mnist_model(x).argmax(1) == y).float().mean().item()
        kept = (mnist_model(transform(x)).argmax(1) == y).float().mean().item()
    assert kept >= clean - 0.03


@pytest.mark.parametrize("transform", ALL, ids=ALL_IDS)
def test_images_outside_the_unit_range_are_refused_with_the_fix(transform: Transform) -> None:
    x = _images()
    x[0, 0, 0, 0] = -0.25
    with pytest.raises(ValueError, match=r"in \[0, 1\] \(got min -0.25, .*Normalize"):
        transform(x)


@pytest.mark.parametrize("transform", ALL, ids=ALL_IDS)
def test_images_of_the_wrong_shape_are_refused_with_the_fix(transform: Transform) -> None:
    with pytest.raises(ValueError, match=r"\(N, C, H, W\) \(got \(1, 16, 16\)\).*unsqueeze"):
        transform(_images()[0])


def test_non_finite_and_integer_images_are_refused() -> None:
    x = _images()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="1 NaN or inf"):
        BitDepth()(x)
    with pytest.raises(TypeError, match=r"x.float\(\) / 255"):
        BitDepth()(torch.zeros(1, 1, 4, 4, dtype=torch.uint8))


def test_jpeg_refuses_images_that_are_neither_grayscale_nor_rgb() -> None:
    with pytest.raises(ValueError, match=r"C = 2"):
        JPEG()(_images(2))


@pytest.mark.parametrize("build,message", [
    (lambda: BitDepth(0), r"bits must be an integer in \[1, 8\] \(got 0\)"),
    (lambda: MedianSmoothing(4), r"size must be odd \(got 4\)"),
    (lambda: JPEG(101), r"quality must be an integer in \[1, 100\] \(got 101\)"),
    (lambda: TotalVariation(weight=-1), r"weight must be a finite number >= 0 \(got -1\)"),
    (lambda: TotalVariation(keep=0), r"keep must be a probability in \(0, 1\] \(got 0\)"),
    (lambda: Adaptive("bpda"), r"needs the approximation's name"),
    (lambda: Adaptive("magic"), r"got 'magic'"),
])
def test_bad_settings_are_refused_with_the_fix(build: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_median_smoothing_refuses_images_too_small_for_reflect_padding() -> None:
    with pytest.raises(ValueError, match="use a smaller size"):
        MedianSmoothing(5)(_images(size=2))


def test_bpda_breaks_bit_depth_where_attacking_the_transform_itself_does_not(
        mnist_model: torch.nn.Module, mnist_test: tuple[torch.Tensor, torch.Tensor]) -> None:
    # Rounding has a zero gradient almost everywhere, so PGD through BitDepth itself stays
    # where it started; through BPDA it is PGD against the bare model. Measured on the first
    # 100 test images (one model, 3 attack seeds): 99% left by the former, 0% by the latter.
    from advkit import ThreatModel
    from advkit.attacks import PGD

    x, y = mnist_test[0][:100], mnist_test[1][:100]
    squeeze = BitDepth(4)
    defended = torch.nn.Sequential(squeeze, mnist_model).eval()
    attacked = torch.nn.Sequential(bpda(squeeze), mnist_model).eval()
    pgd = PGD(ThreatModel(norm="linf", eps=0.3), steps=20, step_size=0.03)

    def accuracy(target: torch.nn.Module) -> float:
        with torch.no_grad():
            return (defended(pgd(target, x, y).x_adv).argmax(1) == y).float().mean().item()

    assert accuracy(defended) >= 0.9
    assert accuracy(attacked) <= 0.1
