"""Common corruptions at five severities, and the corruption robustness table.

Follows Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations", ICLR 2019 (https://arxiv.org/abs/1903.12261), checked
line by line against its code, github.com/hendrycks/robustness at 8190fe32 (the files
below last changed in ca360085, 2019-01-08), and MNIST-C (Mu & Gilmer 2019,
https://arxiv.org/abs/1906.02337), github.com/google-research/mnist-c at bba57e4c
(corruptions.py from aa075693, 2019-05-29). Three sets of severity constants
(``benchmark=``):

- ``"cifar10-c"`` (the default, :data:`SEVERITIES`): ImageNet-C/create_c/make_cifar_c.py
  for the noises, blurs, contrast, brightness, pixelate and elastic (32-pixel images, the
  closest to MNIST's 28);
- ``"imagenet-c"``: make_imagenet_c.py's for the corruptions whose parameter is a pixel
  value (the noises, contrast, brightness: :data:`IMAGENET_C`), CIFAR-10-C's for the rest;
- ``"mnist-c"`` (:data:`MNIST_C`): MNIST-C's corruptions.py for every corruption here.

Rotate, shear, scale and translate are MNIST-C's in all three (the others have none).
The formulas are the sources': skimage's Gaussian (edge pixels repeated), the OpenCV disk
of defocus blur, per-channel contrast, HSV brightness, PIL's BOX resize for pixelate,
skimage's affine warps about the centre (MNIST-C), the affine-plus-displacement elastic
transform. Where this module departs from them it says so at the function (8-bit
rounding, elastic's reflected border).

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


# -- building blocks (each takes its raw parameter, in the source's units; 0 or 1 is the
#    identity where one exists)


def _pad_index(n: int, pad: int, mode: str, device: torch.device) -> Tensor:
    """The indices of an axis of ``n`` pixels extended by ``pad`` on both sides, in
    scipy.ndimage's modes: "nearest" repeats the edge pixel (skimage's ``gaussian``
    default), "reflect" mirrors about the edge (d c b a | a b c d), "mirror" about the
    edge pixel's centre (d c b | a b c d: OpenCV's BORDER_REFLECT_101, filter2D's
    default). Any ``pad``, even wider than the axis (reflected periodically, as scipy)."""
    i = torch.arange(-pad, n + pad, device=device)
    if mode == "nearest" or n == 1:
        return i.clamp(0, n - 1)
    period = 2 * n if mode == "reflect" else 2 * n - 2
    j = i.remainder(period)
    return torch.where(j >= n, period - (mode == "reflect") - j, j)


def _correlate1d(x: Tensor, weights: Tensor, dim: int, mode: str) -> Tensor:
    """Correlate every channel of (N, C, H, W) ``x`` along ``dim`` (-2 rows, -1 columns)
    with the odd-length ``weights``, the borders extended by ``mode`` (:func:`_pad_index`)."""
    r = (weights.numel() - 1) // 2
    xp = x.index_select(dim, _pad_index(x.shape[dim], r, mode, x.device))
    shape = (1, 1, 1, -1) if dim == -1 else (1, 1, -1, 1)
    c = x.shape[1]
    kernel = weights.to(x).view(shape).expand(c, 1, *weights.view(shape).shape[2:])
    return F.conv2d(xp, kernel, groups=c)


def _correlate2d(x: Tensor, kernel: Tensor, mode: str) -> Tensor:
    """Correlate every channel with the odd-sized 2-D ``kernel``, borders by ``mode``."""
    r = (kernel.shape[-1] - 1) // 2
    h, w = x.shape[-2:]
    xp = x.index_select(-2, _pad_index(h, r, mode, x.device))
    xp = xp.index_select(-1, _pad_index(w, r, mode, x.device))
    c = x.shape[1]
    return F.conv2d(xp, kernel.to(x).expand(c, 1, *kernel.shape), groups=c)


def _gaussian_weights(sigma: float, truncate: float) -> Tensor:
    """scipy.ndimage's 1-D Gaussian: radius int(truncate * sigma + 0.5), normalised."""
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    return g / g.sum()


def _smooth(x: Tensor, sigma: float, mode: str, truncate: float) -> Tensor:
    """skimage.filters.gaussian: separable, rows then columns; sigma 0 is the identity (as
    scipy skips an axis of sigma ~0)."""
    if sigma <= 1e-15:
        return x.clone()
    g = _gaussian_weights(sigma, truncate)
    return _correlate1d(_correlate1d(x, g, -2, mode), g, -1, mode)


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
    """The source's ``skimage.filters.gaussian(x, sigma)``: a Gaussian of ``sigma`` pixels
    truncated at 4 sigma, the borders extended by repeating the edge pixel (its default
    mode "nearest")."""
    return _smooth(x, sigma, "nearest", 4.0).clamp(0, 1)


def _gaussian_kernel_cv2(ksize: int, sigma: float) -> Tensor:
    # cv2.getGaussianKernel for sigma > 0: exp(-(i - (ksize - 1) / 2)^2 / (2 sigma^2)),
    # summing to 1.
    t = torch.arange(ksize, dtype=torch.float64) - (ksize - 1) / 2
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def defocus_blur(x: Tensor, radius: float, alias_sigma: float) -> Tensor:
    """The source's ``disk(radius, alias_blur)`` kernel applied by OpenCV's filter2D: a
    disk of ``radius`` pixels (normalised) on a 17x17 grid (2 radius + 1 above radius 8),
    its aliasing smoothed by cv2.GaussianBlur (3x3, 5x5 above radius 8) of ``alias_sigma``,
    then correlated with every channel, the borders mirrored (BORDER_REFLECT_101).
    ``alias_sigma`` 0 skips the smoothing."""
    half = 8 if radius <= 8 else radius
    t = torch.arange(-half, half + 1, dtype=torch.float64)
    disk = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius ** 2).double()
    disk = (disk / disk.sum())[None, None]
    if alias_sigma > 0:
        g = _gaussian_kernel_cv2(3 if radius <= 8 else 5, alias_sigma)
        disk = _correlate1d(_correlate1d(disk, g, -2, "mirror"), g, -1, "mirror")
    return _correlate2d(x, disk[0, 0].float(), "mirror").clamp(0, 1)


def contrast(x: Tensor, factor: float) -> Tensor:
    """Pull every pixel toward its channel's mean over the image (the source's
    ``np.mean(x, axis=(0, 1))`` of an H x W x C array): factor 1 is the identity, 0 a flat
    image of the mean colour."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    return ((x - mean) * factor + mean).clamp(0, 1)


def brightness(x: Tensor, delta: float) -> Tensor:
    """Add ``delta`` to the value channel of HSV, clipped at 1 (the paper's brightness).

    Hue and saturation fixed, RGB is proportional to V, so the new image is x scaled by
    V'/V with V = the largest channel: exact HSV without converting. Grayscale: x + delta
    (MNIST-C's gray -> RGB -> HSV -> RGB -> gray is the same, its gray weights summing to 1).
    """
    v = x.amax(dim=1, keepdim=True)
    v_new = (v + delta).clamp(0, 1)
    scaled = x * (v_new / v.clamp_min(1e-12))
    # A black pixel has no hue and no saturation: it turns gray at V'.
    return torch.where(v > 0, scaled, v_new.expand_as(x)).clamp(0, 1)


def _box_resize(n_in: int, n_out: int, device: torch.device) -> Tensor:
    """PIL's ``resize(..., Image.BOX)`` along one axis as an (n_out, n_in) matrix: output
    pixel i averages, with equal weights, the input pixels whose centres fall in its
    footprint ((i + 0.5) * n_in / n_out, plus or minus half a footprint; Pillow's
    ``box_filter``, a tie going to the right). Upsampling, that is one pixel: nearest."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centre = (torch.arange(n_out, dtype=torch.float64, device=device) + 0.5) * scale
    t = (torch.arange(n_in, dtype=torch.float64, device=device)[None] + 0.5
         - centre[:, None]) / support
    w = ((t > -0.5) & (t <= 0.5)).double()
    return w / w.sum(1, keepdim=True)


def pixelate(x: Tensor, factor: float) -> Tensor:
    """Resize to ``int(side * factor)`` and back with PIL's BOX filter both ways, as the
    source (``x.resize((int(32 * c), int(32 * c)), PILImage.BOX)``, then back), in float
    rather than PIL's 8-bit passes."""
    h, w = x.shape[-2:]
    hs, ws = max(1, int(h * factor)), max(1, int(w * factor))
    rows = _box_resize(hs, h, x.device) @ _box_resize(h, hs, x.device)
    cols = _box_resize(ws, w, x.device) @ _box_resize(w, ws, x.device)
    return torch.einsum("ij,ncjk,lk->ncil", rows.to(x), x, cols.to(x)).clamp(0, 1)


def _sample_pixels(x: Tensor, px: Tensor, py: Tensor, padding: str = "zeros") -> Tensor:
    """Bilinear samples of each image at pixel coordinates (px column, py row; (N, H, W)
    each; pixel centres at integers, as OpenCV, scipy and skimage). ``padding`` "zeros"
    (black outside, as their constant modes) or "reflection" (about the border: scipy's
    "reflect")."""
    h, w = x.shape[-2:]
    grid = torch.stack([(2 * px + 1) / w - 1, (2 * py + 1) / h - 1], dim=-1)
    return F.grid_sample(x, grid.to(x), mode="bilinear", padding_mode=padding,
                         align_corners=False)


def affine(x: Tensor, matrix: Tensor) -> Tensor:
    """Apply per-image 2x3 affine matrices (N, 2, 3) in normalised coordinates (output
    pixel -> input pixel, as ``torch.nn.functional.affine_grid``). Differentiable."""
    grid = F.affine_grid(matrix.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _warp_about_centre(x: Tensor, a: Tensor, shift: Tensor | None = None) -> Tensor:
    """skimage's ``warp(x, inverse_map=AffineTransform(...))`` with the translation MNIST-C
    adds to keep the centre fixed: the output pixel p samples the input at
    a (p - c) + c + shift, in pixels (column, row), c the image centre; (N, 2, 2) ``a``,
    (N, 2) ``shift``; bilinear, black outside."""
    n, _, h, w = x.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device, dtype=a.dtype),
                            torch.arange(w, device=x.device, dtype=a.dtype), indexing="ij")
    p = torch.stack([xs - (w - 1) / 2, ys - (h - 1) / 2])          # (2, H, W)
    q = torch.einsum("nij,jhw->nihw", a, p)
    if shift is not None:
        q = q + shift[:, :, None, None]
    return _sample_pixels(x, q[:, 0] + (w - 1) / 2, q[:, 1] + (h - 1) / 2)


def _random_signs(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.randint(0, 2, (n,), generator=generator, device=device).float() * 2 - 1


def _matrix(a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> Tensor:
    return torch.stack([torch.stack([a, b], -1), torch.stack([c, d], -1)], -2)


def rotate(x: Tensor, degrees: float, generator: torch.Generator | None = None) -> Tensor:
    """Rotate each image by ``degrees`` about its centre, clockwise or anticlockwise at
    random (seeded): MNIST-C's ``AffineTransform(rotation=c)`` as the inverse map."""
    angle = math.radians(degrees) * _random_signs(x.shape[0], generator, x.device)
    cos, sin = torch.cos(angle), torch.sin(angle)
    return _warp_about_centre(x, _matrix(cos, -sin, sin, cos)).clamp(0, 1)


def shear(x: Tensor, angle: float, generator: torch.Generator | None = None) -> Tensor:
    """MNIST-C's shear by ``angle`` radians, its sign at random per image: the inverse map
    skimage <= 0.20's ``AffineTransform(shear=s)``, [[1, -sin s], [0, cos s]] (the y axis
    turned by s), about the centre. (skimage >= 0.21 reads the same code as a pure shear
    [[1, -tan s], [0, 1]]; MNIST-C was made in 2019, with the former.)"""
    s = angle * _random_signs(x.shape[0], generator, x.device)
    one, zero = torch.ones_like(s), torch.zeros_like(s)
    return _warp_about_centre(x, _matrix(one, -torch.sin(s), zero, torch.cos(s))).clamp(0, 1)


def scale(x: Tensor, factor: float) -> Tensor:
    """Zoom about the centre: ``factor`` < 1 shrinks the object (the digit gets smaller);
    MNIST-C's ``AffineTransform(scale=1 / factor)`` as the inverse map."""
    inv = torch.full((x.shape[0],), 1.0 / factor, device=x.device)
    zero = torch.zeros_like(inv)
    return _warp_about_centre(x, _matrix(inv, zero, zero, inv)).clamp(0, 1)


def translate(x: Tensor, fraction: float, generator: torch.Generator | None = None) -> Tensor:
    """Shift each image by ``fraction`` of its width and of its height, each sign at random
    (seeded), as MNIST-C's translation by c pixels (c / 28 of the side)."""
    n, _, h, w = x.shape
    shift = torch.stack([fraction * w * _random_signs(n, generator, x.device),
                         fraction * h * _random_signs(n, generator, x.device)], 1)
    eye = torch.eye(2, device=x.device).expand(n, 2, 2)
    return _warp_about_centre(x, eye, shift).clamp(0, 1)


def elastic(x: Tensor, alpha: float, sigma: float, generator: torch.Generator | None = None,
            *, jitter: float = 0.0, border: str = "zeros") -> Tensor:
    """The benchmark's elastic transform (its make_*_c.py, after Simard et al. 2003 by way
    of a gist): first a random affine warp that moves three control points (the centre
    plus or minus a third of the side) by up to ``jitter`` pixels each, uniformly, as
    cv2.getAffineTransform / warpAffine; then a displacement field, uniform in [-1, 1] per
    pixel and axis, smoothed by a Gaussian of ``sigma`` pixels (truncated at 3 sigma,
    reflected at the borders) and scaled by ``alpha`` pixels. Bilinear resampling both
    times; ``border`` "zeros" (MNIST-C: black outside) or "reflect" (CIFAR-10-C,
    ImageNet-C; their warpAffine mirrors about the edge pixel's centre, here about its
    edge, which differs in the outermost pixel only). Alpha and jitter 0: the identity."""
    if border not in ("zeros", "reflect"):
        raise ValueError(f"border must be 'zeros' or 'reflect' (got {border!r})")
    padding = "zeros" if border == "zeros" else "reflection"
    n, _, h, w = x.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device, dtype=torch.float64),
                            torch.arange(w, device=x.device, dtype=torch.float64),
                            indexing="ij")
    if jitter > 0:
        cx, cy, s = float(w // 2), float(h // 2), float(min(h, w) // 3)
        src = torch.tensor([[cx + s, cy + s], [cx + s, cy - s], [cx - s, cy - s]],
                           dtype=torch.float64, device=x.device).expand(n, 3, 2)
        dst = src + jitter * (torch.rand((n, 3, 2), generator=generator, device=x.device,
                                         dtype=torch.float64) * 2 - 1)
        # warpAffine's output pixel p samples the input at M^-1 p, M mapping src to dst:
        # solve for the affine map dst -> src directly.
        ones = torch.ones((n, 3, 1), dtype=torch.float64, device=x.device)
        inv = torch.linalg.solve(torch.cat([dst, ones], -1), src).transpose(1, 2)  # (n, 2, 3)
        q = torch.einsum("nij,jhw->nihw", inv, torch.stack([xs, ys, torch.ones_like(xs)]))
        x = _sample_pixels(x, q[:, 0], q[:, 1], padding)
    if alpha > 0:
        field_ = torch.rand((n, 2, h, w), generator=generator, device=x.device,
                            dtype=torch.float64) * 2 - 1
        field_ = _smooth(field_, sigma, "reflect", 3.0) * alpha
        x = _sample_pixels(x, xs + field_[:, 0], ys + field_[:, 1], padding)
    return x.clamp(0, 1)


# -- the benchmarks' constants -----------------------------------------------------------

#: Per corruption, the parameter at severities 1..5, as in Hendrycks & Dietterich's
#: ImageNet-C/create_c/make_cifar_c.py (github.com/hendrycks/robustness, last changed in
#: ca360085, 2019-01-08): the noises, blurs (pixels), contrast, brightness, pixelate and
#: elastic (alpha, sigma and the affine jitter as fractions of the side: the source's
#: ``IMSIZE * c``; its border mode). CIFAR-10-C has no rotate, shear, scale or translate:
#: those are MNIST-C's (github.com/google-research/mnist-c, corruptions.py at aa075693,
#: 2019-05-29; the same in every benchmark): rotate 0.2 .. 1.0 radians (in degrees here),
#: shear 0.2 .. 1.0 radians, scale 1 / 0.9 .. 1 / 0.5 (the zoom here), translate 1 .. 5
#: pixels of 28 (fractions of the side here). The source's severities are not all
#: monotone in pixel change: pixelate on 28 pixels (sizes 26, 25, 23, 21, 18 resample onto
#: grids that align differently) and elastic (severity 1 is a pure affine jitter of 8% of
#: the side, larger than severity 5's 3% plus its displacement field).
_MNIST_C_GEOMETRIC: dict[str, tuple] = {
    "rotate": tuple(math.degrees(r) for r in (0.2, 0.4, 0.6, 0.8, 1.0)),
    "shear": (0.2, 0.4, 0.6, 0.8, 1.0),
    "scale": (0.9, 0.8, 0.7, 0.6, 0.5),
    "translate": tuple(px / 28 for px in (1, 2, 3, 4, 5)),
}
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
    "elastic_transform": ((0.0, 0.0, 0.08, "reflect"), (0.05, 0.2, 0.07, "reflect"),
                          (0.08, 0.06, 0.06, "reflect"), (0.1, 0.04, 0.05, "reflect"),
                          (0.1, 0.03, 0.03, "reflect")),
    **_MNIST_C_GEOMETRIC,
}

#: ImageNet-C's constants (ImageNet-C/create_c/make_imagenet_c.py, same repository and
#: commit) for the corruptions whose parameter is in pixel values rather than pixels, so
#: it means the same at any image size. CIFAR-10-C's noise is mild for MNIST (a standard
#: CNN keeps ~100% under all five severities); ``benchmark="imagenet-c"`` takes these, and
#: CIFAR-10-C's for the blurs, pixelate and elastic (ImageNet-C's are in 224-pixel units).
IMAGENET_C: dict[str, tuple] = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "shot_noise": (60, 25, 12, 5, 3),
    "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),
    "speckle_noise": (0.15, 0.2, 0.35, 0.45, 0.6),
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
}

#: MNIST-C's constants (Mu & Gilmer 2019; corruptions.py above), all of them at its 28
#: pixels: the pixel-value ones are ImageNet-C's, the blurs are ImageNet-C's radii in
#: pixels (strong on 28 pixels), pixelate ImageNet-C's factors, elastic ImageNet-C's
#: fractions of the side with black borders. (The released MNIST-C uses one severity per
#: corruption, its functions' defaults: shear 2, scale 3, rotate 2, translate 3, ...)
MNIST_C: dict[str, tuple] = {
    **IMAGENET_C,
    "gaussian_blur": (1, 2, 3, 4, 6),
    "defocus_blur": ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
    "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),
    "elastic_transform": ((2.0, 0.7, 0.1, "zeros"), (2.0, 0.08, 0.2, "zeros"),
                          (0.05, 0.01, 0.02, "zeros"), (0.07, 0.01, 0.02, "zeros"),
                          (0.12, 0.01, 0.02, "zeros")),
    **_MNIST_C_GEOMETRIC,
}


def _elastic(x: Tensor, p: tuple, g: torch.Generator | None) -> Tensor:
    side = min(x.shape[-2:])
    alpha, sigma, jitter, border = p
    return elastic(x, alpha * side, sigma * side, g, jitter=jitter * side, border=border)


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

#: The severity constants by benchmark.
BENCHMARKS: dict[str, dict[str, tuple]] = {
    "cifar10-c": SEVERITIES,
    "imagenet-c": {**SEVERITIES, **IMAGENET_C},
    "mnist-c": MNIST_C,
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
    ``"cifar10-c"`` (:data:`SEVERITIES`), ``"imagenet-c"`` (:data:`IMAGENET_C` for the
    noises, contrast and brightness) or ``"mnist-c"`` (:data:`MNIST_C`). The output is
    clipped to [0, 1].
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


__all__ = ["CORRUPTIONS", "SEVERITIES", "IMAGENET_C", "MNIST_C", "BENCHMARKS", "CorruptionTable",
           "corrupt", "corruption_table",
           "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "gaussian_blur",
           "defocus_blur", "contrast", "brightness", "pixelate", "elastic", "rotate", "shear",
           "scale", "translate", "affine"]
