"""Common corruptions at five severities, and the corruption robustness table.

Follows Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations", ICLR 2019 (https://arxiv.org/abs/1903.12261): the
severity constants of the noise, blur, contrast, brightness and pixelate corruptions are
those of its CIFAR-10-C (its images are 32x32, the closest to MNIST's 28x28), and the
table's mean corruption error (mCE) is its definition. The elastic transform and the
affine corruptions (rotate, shear, scale, translate: the geometric corruptions MNIST-C
adds, Mu & Gilmer 2019, https://arxiv.org/abs/1906.02337, at one severity there) have
advkit's own five-level constants, stated in :data:`SEVERITIES` and relative to the
image size so they mean the same on 28 and 32 pixels.

Pure torch, batched over (N, C, H, W) images in [0, 1], seeded by a
``torch.Generator`` (the same seed gives the same corrupted images, so two models are
compared on the same inputs), output clipped to [0, 1].

    >>> x_c = corrupt(x, "gaussian_noise", severity=3, seed=0)
    >>> table = corruption_table(model, x, y)           # accuracy per corruption, severity
    >>> table.mce(baseline_table)                        # Hendrycks & Dietterich's mCE
"""

from __future__ import annotations

import difflib
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# -- checks ------------------------------------------------------------------------------


def check_images(x: Tensor) -> None:
    """A clear error unless ``x`` is a float batch (N, C, H, W) with values in [0, 1]."""
    if not isinstance(x, Tensor):
        raise TypeError(f"images must be a torch.Tensor (got {type(x).__name__})")
    if x.dim() != 4:
        raise ValueError(f"images must have shape (N, C, H, W) (got {tuple(x.shape)}); "
                         "add a batch dimension with x.unsqueeze(0) for a single image")
    if not x.is_floating_point():
        raise TypeError(f"images must be floating point in [0, 1] (got {x.dtype}); "
                        "for uint8 images use x.float() / 255")
    if x.numel() == 0:
        raise ValueError("images are empty")
    lo, hi = (v.item() for v in torch.aminmax(x))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("images contain NaN or inf values")
    if lo < 0 or hi > 1:
        raise ValueError(f"images must lie in [0, 1] (min {lo:.4g}, max {hi:.4g}); scale "
                         "them to [0, 1] and put normalisation inside the model")


def check_severity(severity: int) -> int:
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
        raise ValueError(f"severity must be an integer from 1 to 5 (got {severity!r}), as "
                         "in Hendrycks & Dietterich 2019")
    return severity


def check_name(name: str) -> str:
    if name not in CORRUPTIONS:
        close = difflib.get_close_matches(str(name), CORRUPTIONS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown corruption {name!r}: {hint}use one of "
                         f"{', '.join(CORRUPTIONS)}")
    return name


# -- building blocks (each takes its raw parameter; 0 or 1 is the identity where one exists)


def _filter(x: Tensor, kernel: Tensor) -> Tensor:
    """Convolve every channel with the 2-D ``kernel`` (odd size), reflecting at the borders
    as scipy / OpenCV do, so that the borders do not darken."""
    k = kernel.shape[-1]
    c = x.shape[1]
    pad = k // 2
    # Reflection needs the padding smaller than the image; a kernel wider than the image
    # falls back to replicating the edge.
    mode = "reflect" if pad < min(x.shape[-2:]) else "replicate"
    xp = F.pad(x, (pad, pad, pad, pad), mode=mode)
    weight = kernel.to(x).expand(c, 1, k, k)
    return F.conv2d(xp, weight, groups=c)


def _gaussian_kernel(sigma: float, radius: int | None = None) -> Tensor:
    if radius is None:
        radius = max(1, math.ceil(4 * sigma))  # scipy / skimage truncate at 4 sigma
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()


def gaussian_noise(x: Tensor, sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """x + N(0, sigma^2) per pixel."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (x + sigma * noise).clamp(0, 1)


def shot_noise(x: Tensor, photons: float, generator: torch.Generator | None = None) -> Tensor:
    """Poisson(x * photons) / photons: fewer photons, more noise (electronic shot noise)."""
    return (torch.poisson(x * photons, generator=generator) / photons).clamp(0, 1)


def impulse_noise(x: Tensor, amount: float, generator: torch.Generator | None = None) -> Tensor:
    """Salt and pepper: a fraction ``amount`` of the values set to 0 or 1 (half each), per
    value as skimage's ``random_noise(mode="s&p")`` that the paper uses."""
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    out = torch.where(u < amount / 2, torch.zeros_like(x), x)
    return torch.where((u >= amount / 2) & (u < amount), torch.ones_like(x), out)


def speckle_noise(x: Tensor, sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """x + x * N(0, sigma^2): noise proportional to the intensity."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (x + x * sigma * noise).clamp(0, 1)


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    if sigma <= 0:
        return x.clone()
    return _filter(x, _gaussian_kernel(sigma)).clamp(0, 1)


def defocus_blur(x: Tensor, radius: float, alias_sigma: float) -> Tensor:
    """A disk kernel of ``radius`` pixels, its aliasing smoothed by a 3x3 Gaussian of
    ``alias_sigma`` (the paper's construction, as OpenCV's filter2D would apply it)."""
    r = max(1, math.ceil(radius))
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    disk = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius ** 2).double()
    disk = disk / disk.sum()
    if alias_sigma > 0:
        # Pad so the 3x3 smoothing of the disk keeps its whole mass.
        smooth = _gaussian_kernel(alias_sigma, radius=1).double()
        disk = F.conv2d(F.pad(disk[None, None], (1, 1, 1, 1)), smooth[None, None])[0, 0]
        disk = disk / disk.sum()
    return _filter(x, disk.float()).clamp(0, 1)


def contrast(x: Tensor, factor: float) -> Tensor:
    """Pull every pixel toward the image's mean: factor 1 is the identity, 0 a flat image."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * factor + mean).clamp(0, 1)


def brightness(x: Tensor, delta: float) -> Tensor:
    """Add ``delta`` to the value channel of HSV, clipped at 1 (the paper's brightness).

    Hue and saturation fixed, RGB is proportional to V, so the new image is x scaled by
    V'/V with V = the largest channel: exact HSV without converting. Grayscale: x + delta.
    """
    v = x.amax(dim=1, keepdim=True)
    v_new = (v + delta).clamp(0, 1)
    scaled = x * (v_new / v.clamp_min(1e-12))
    # A black pixel has no hue and no saturation: it turns gray at V'.
    return torch.where(v > 0, scaled, v_new.expand_as(x)).clamp(0, 1)


def pixelate(x: Tensor, factor: float) -> Tensor:
    """Average-pool down to ``factor`` of the size, then back up by nearest neighbour (PIL's
    BOX resize both ways, as the paper)."""
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, int(h * factor)), max(1, int(w * factor))),
                          mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest").clamp(0, 1)


def _warp(x: Tensor, grid: Tensor) -> Tensor:
    """Sample x at ``grid`` (normalised coordinates), zeros outside: the background of
    MNIST-like images, and what the paper's affine corruptions fill in."""
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False).clamp(0, 1)


def affine(x: Tensor, matrix: Tensor) -> Tensor:
    """Apply per-image 2x3 affine matrices (N, 2, 3) in normalised coordinates (output
    pixel -> input pixel, as ``torch.nn.functional.affine_grid``). Differentiable."""
    grid = F.affine_grid(matrix.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _random_signs(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.randint(0, 2, (n,), generator=generator, device=device).float() * 2 - 1


def _matrices(x: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor,
              tx: Tensor | None = None, ty: Tensor | None = None) -> Tensor:
    zero = torch.zeros_like(a)
    tx = zero if tx is None else tx
    ty = zero if ty is None else ty
    return torch.stack([torch.stack([a, b, tx], 1), torch.stack([c, d, ty], 1)], 1).to(x)


def rotate(x: Tensor, degrees: float, generator: torch.Generator | None = None) -> Tensor:
    """Rotate each image by ``degrees`` about its centre, clockwise or anticlockwise at
    random (seeded)."""
    angle = math.radians(degrees) * _random_signs(x.shape[0], generator, x.device)
    cos, sin = torch.cos(angle), torch.sin(angle)
    return affine(x, _matrices(x, cos, -sin, sin, cos)).clamp(0, 1)


def shear(x: Tensor, amount: float, generator: torch.Generator | None = None) -> Tensor:
    """Horizontal shear x' = x + amount * y, its sign at random per image."""
    s = amount * _random_signs(x.shape[0], generator, x.device)
    one, zero = torch.ones_like(s), torch.zeros_like(s)
    return affine(x, _matrices(x, one, s, zero, one)).clamp(0, 1)


def scale(x: Tensor, factor: float) -> Tensor:
    """Zoom about the centre: ``factor`` < 1 shrinks the object (the digit gets smaller)."""
    inv = torch.full((x.shape[0],), 1.0 / factor, device=x.device)
    zero = torch.zeros_like(inv)
    return affine(x, _matrices(x, inv, zero, zero, inv)).clamp(0, 1)


def translate(x: Tensor, fraction: float, generator: torch.Generator | None = None) -> Tensor:
    """Shift each image by ``fraction`` of its width and height, in a random diagonal
    direction (seeded)."""
    n = x.shape[0]
    # Normalised coordinates span 2 across the image.
    tx = 2 * fraction * _random_signs(n, generator, x.device)
    ty = 2 * fraction * _random_signs(n, generator, x.device)
    one, zero = torch.ones_like(tx), torch.zeros_like(tx)
    return affine(x, _matrices(x, one, zero, zero, one, -tx, -ty)).clamp(0, 1)


def elastic(x: Tensor, alpha: float, sigma: float,
            generator: torch.Generator | None = None) -> Tensor:
    """Simard et al. 2003's elastic deformation: a random displacement field, uniform in
    [-1, 1] per pixel, smoothed by a Gaussian of ``sigma`` pixels and scaled to ``alpha``
    pixels, then bilinear resampling. Alpha 0 is the identity."""
    n, _, h, w = x.shape
    field_ = torch.rand((n, 2, h, w), generator=generator, device=x.device) * 2 - 1
    field_ = _filter(field_, _gaussian_kernel(sigma)) * alpha
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device, dtype=x.dtype),
                            torch.arange(w, device=x.device, dtype=x.dtype), indexing="ij")
    px = xs + field_[:, 0].to(x)
    py = ys + field_[:, 1].to(x)
    # Pixel centres to normalised coordinates (align_corners=False).
    grid = torch.stack([(2 * px + 1) / w - 1, (2 * py + 1) / h - 1], dim=-1)
    return _warp(x, grid)


# -- the benchmark's corruptions ---------------------------------------------------------

#: Per corruption, the parameter at severities 1..5. Noise, blur, contrast, brightness and
#: pixelate: Hendrycks & Dietterich 2019's CIFAR-10-C constants (make_cifar_c.py). Elastic
#: (alpha, sigma as fractions of the image side), rotate (degrees), shear, scale (zoom) and
#: translate (fraction of the side): advkit's own, growing to a still-recognisable digit.
#: Every corruption's mean pixel change grows with the severity, except pixelate's on
#: small images: at 28 pixels its sizes 26, 25, 23, 21, 18 resample onto grids that align
#: differently, so severity 4 can change fewer pixels than 3 (severity 5 is the worst).
SEVERITIES: dict[str, tuple] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "speckle_noise": (0.06, 0.10, 0.12, 0.16, 0.20),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1)),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
    # A displacement field of 0.3 to 1.7 pixels (standard deviation) on 28 pixels, smooth
    # over 2.8 pixels: at severity 5 the test CNN keeps ~80%, as under a 30-degree rotation.
    "elastic_transform": ((0.01, 0.10), (0.02, 0.10), (0.03, 0.10), (0.045, 0.10),
                          (0.06, 0.10)),
    "rotate": (6, 12, 18, 24, 30),
    "shear": (0.1, 0.2, 0.3, 0.4, 0.5),
    "scale": (0.9, 0.8, 0.7, 0.6, 0.5),
    "translate": (0.03, 0.06, 0.09, 0.12, 0.15),
}


def _elastic(x: Tensor, p: tuple[float, float], g: torch.Generator | None) -> Tensor:
    side = min(x.shape[-2:])
    # The displacement field's strength must grow with the image: alpha scaled by the
    # side, divided by the smoothing's attenuation (a sigma-smoothed uniform field has a
    # standard deviation of 1 / (sqrt(12 pi) sigma): uniform's 1/sqrt(3) times the root of
    # the Gaussian kernel's squared mass, 1 / (2 sqrt(pi) sigma)), so p[0] * side is the
    # field's standard deviation in pixels.
    sigma = p[1] * side
    return elastic(x, p[0] * side * math.sqrt(12 * math.pi) * sigma, sigma, g)


_APPLY: dict[str, Callable[[Tensor, object, torch.Generator | None], Tensor]] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "speckle_noise": speckle_noise,
    "gaussian_blur": lambda x, p, g: gaussian_blur(x, p),
    "defocus_blur": lambda x, p, g: defocus_blur(x, *p),
    "contrast": lambda x, p, g: contrast(x, p),
    "brightness": lambda x, p, g: brightness(x, p),
    "pixelate": lambda x, p, g: pixelate(x, p),
    "elastic_transform": _elastic,
    "rotate": rotate,
    "shear": shear,
    "scale": lambda x, p, g: scale(x, p),
    "translate": translate,
}

#: The corruptions by name, in the table's order.
CORRUPTIONS: tuple[str, ...] = tuple(SEVERITIES)

#: ImageNet-C's constants (make_imagenet_c.py) for the corruptions whose parameter is in
#: pixel values rather than pixels, so it means the same at any image size. CIFAR-10-C's
#: noise is mild for MNIST (a standard CNN keeps ~100% under all five severities);
#: ``benchmark="imagenet-c"`` takes these, and CIFAR-10-C's for the blurs, pixelate and
#: the geometric corruptions (ImageNet-C's blur radii are in 224-pixel units).
IMAGENET_C: dict[str, tuple] = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "shot_noise": (60, 25, 12, 5, 3),
    "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),
    "speckle_noise": (0.15, 0.2, 0.35, 0.45, 0.6),
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
}

#: The severity constants by benchmark.
BENCHMARKS: dict[str, dict[str, tuple]] = {
    "cifar10-c": SEVERITIES,
    "imagenet-c": {**SEVERITIES, **IMAGENET_C},
}


def check_benchmark(benchmark: str) -> dict[str, tuple]:
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}: use one of "
                         f"{', '.join(BENCHMARKS)}")
    return BENCHMARKS[benchmark]


def _seed_for(seed: int, name: str, severity: int) -> int:
    # A stable seed per (corruption, severity) (Python's hash() changes between runs), so
    # every corruption draws its own noise and the table is the same whatever subset of
    # corruptions is asked for.
    return (seed * 1_000_003 + zlib.crc32(name.encode()) * 7 + severity) % (2 ** 63)


def corrupt(x: Tensor, name: str, severity: int, *, seed: int | None = 0,
            generator: torch.Generator | None = None, benchmark: str = "cifar10-c") -> Tensor:
    """``x`` (N, C, H, W in [0, 1]) under corruption ``name`` at ``severity`` 1..5.

    The randomness comes from ``generator`` if given, else from ``seed`` (a fresh
    generator per corruption and severity: the same seed, the same images); ``seed=None``
    draws from torch's global generator. ``benchmark``: whose severity constants,
    ``"cifar10-c"`` (:data:`SEVERITIES`) or ``"imagenet-c"`` (:data:`IMAGENET_C` for the
    noises, contrast and brightness). The output is clipped to [0, 1].
    """
    constants = check_benchmark(benchmark)
    check_name(name)
    check_severity(severity)
    check_images(x)
    if generator is None and seed is not None:
        generator = torch.Generator(device=x.device).manual_seed(_seed_for(seed, name, severity))
    with torch.no_grad():
        return _APPLY[name](x, constants[name][severity - 1], generator).clamp(0, 1)


# -- the robustness table ----------------------------------------------------------------


@dataclass
class CorruptionTable:
    """Accuracy of one model per corruption and severity, on the same images.

    ``accuracy[name]`` holds five accuracies (severities 1..5); ``clean_accuracy`` the
    accuracy on the uncorrupted images. Errors are 1 - accuracy.
    """

    clean_accuracy: float
    accuracy: dict[str, list[float]]
    n: int
    seed: int | None = 0
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    benchmark: str = "cifar10-c"
    meta: dict = field(default_factory=dict)

    def errors(self, name: str) -> list[float]:
        return [1.0 - a for a in self.accuracy[name]]

    def mean_error(self) -> float:
        """The unnormalised mean error over every corruption and severity."""
        errs = [e for name in self.accuracy for e in self.errors(name)]
        return sum(errs) / len(errs)

    def _check_baseline(self, baseline: CorruptionTable) -> None:
        if not isinstance(baseline, CorruptionTable):
            raise TypeError("baseline must be the CorruptionTable of the baseline model "
                            f"(got {type(baseline).__name__}); build it with "
                            "corruption_table(baseline_model, x, y)")
        missing = sorted(set(self.accuracy) - set(baseline.accuracy))
        if missing or baseline.severities != self.severities:
            raise ValueError(f"the baseline table lacks {missing or 'these severities'}: "
                             "run it with the same corruptions and severities")
        if baseline.benchmark != self.benchmark or baseline.seed != self.seed:
            raise ValueError(f"the baseline table was built with benchmark "
                             f"{baseline.benchmark!r} and seed {baseline.seed}, this one with "
                             f"{self.benchmark!r} and {self.seed}: build both alike so they "
                             "see the same corrupted images")
        zero = [n for n in self.accuracy if sum(baseline.errors(n)) == 0]
        if zero:
            raise ValueError(f"the baseline makes no error under {zero[0]}: its CE would "
                             "divide by zero; pick a weaker baseline or more images")

    def corruption_errors(self, baseline: CorruptionTable) -> dict[str, float]:
        """CE per corruption: this model's errors summed over the severities, divided by
        the baseline's (Hendrycks & Dietterich 2019, eq. 1)."""
        self._check_baseline(baseline)
        return {n: sum(self.errors(n)) / sum(baseline.errors(n)) for n in self.accuracy}

    def mce(self, baseline: CorruptionTable) -> float:
        """The mean corruption error: the mean over corruptions of the CE (1.0: as robust
        as the baseline, lower is better)."""
        ce = self.corruption_errors(baseline)
        return sum(ce.values()) / len(ce)

    def relative_mce(self, baseline: CorruptionTable) -> float:
        """The paper's relative mCE: the errors' growth over the clean error, normalised by
        the baseline's growth (how much accuracy the corruptions cost)."""
        self._check_baseline(baseline)
        ces = []
        for n in self.accuracy:
            mine = sum(e - (1 - self.clean_accuracy) for e in self.errors(n))
            base = sum(e - (1 - baseline.clean_accuracy) for e in baseline.errors(n))
            if base <= 0:
                raise ValueError(f"the baseline loses no accuracy under {n}: the relative "
                                 "CE is undefined; use mce()")
            ces.append(mine / base)
        return sum(ces) / len(ces)

    def rows(self, baseline: CorruptionTable | None = None) -> list[dict]:
        """One row per corruption (accuracy at each severity, mean error, and the CE when a
        baseline is given), for tables and JSON."""
        ce = self.corruption_errors(baseline) if baseline is not None else {}
        out = []
        for n, accs in self.accuracy.items():
            per = dict(zip((f"s{s}" for s in self.severities), accs, strict=True))
            row = {"corruption": n, **per,
                   "mean_error": sum(self.errors(n)) / len(accs)}
            if n in ce:
                row["ce"] = ce[n]
            out.append(row)
        return out

    def summary(self, baseline: CorruptionTable | None = None) -> dict[str, float]:
        out = {"n": self.n, "clean_accuracy": self.clean_accuracy,
               "mean_error": self.mean_error()}
        if baseline is not None:
            out["mce"] = self.mce(baseline)
        return out


def _accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> float:
    correct = 0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            correct += int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    return correct / x.shape[0]


def corruption_table(model: nn.Module, x: Tensor, y: Tensor, *,
                     corruptions: Sequence[str] | None = None,
                     severities: Sequence[int] = (1, 2, 3, 4, 5), seed: int | None = 0,
                     benchmark: str = "cifar10-c", batch_size: int = 500) -> CorruptionTable:
    """Accuracy of ``model`` on ``x`` (labels ``y``) under each corruption and severity.

    The same ``seed`` gives the same corrupted images, so tables of two models built with
    it compare them on identical inputs (what mCE needs: pass the baseline's table to
    :meth:`CorruptionTable.mce`). ``corruptions``: names (default all of
    :data:`CORRUPTIONS`); ``benchmark``: whose severity constants (:func:`corrupt`).
    """
    check_benchmark(benchmark)
    check_images(x)
    if not isinstance(y, Tensor) or y.shape != (x.shape[0],):
        raise ValueError(f"y must be a tensor of {x.shape[0]} labels (got "
                         f"{tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__})")
    names = list(CORRUPTIONS if corruptions is None else corruptions)
    if not names:
        raise ValueError("corruptions is empty: name at least one, or leave it out for all")
    for name in names:
        check_name(name)
    severities = tuple(severities)
    for s in severities:
        check_severity(s)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    was_training = model.training
    model.eval()
    try:
        clean = _accuracy(model, x, y, batch_size)
        acc = {name: [_accuracy(model, corrupt(x, name, s, seed=seed, benchmark=benchmark),
                                 y, batch_size)
                      for s in severities] for name in names}
    finally:
        model.train(was_training)
    return CorruptionTable(clean_accuracy=clean, accuracy=acc, n=x.shape[0], seed=seed,
                           severities=severities, benchmark=benchmark)


__all__ = ["CORRUPTIONS", "SEVERITIES", "IMAGENET_C", "BENCHMARKS", "CorruptionTable", "corrupt",
           "corruption_table",
           "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "gaussian_blur",
           "defocus_blur", "contrast", "brightness", "pixelate", "elastic", "rotate", "shear",
           "scale", "translate", "affine"]
