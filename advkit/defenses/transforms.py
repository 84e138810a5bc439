"""Input reconstruction: transforms that try to wash an adversarial perturbation out of an
image before the classifier sees it.

Every transform is an ``nn.Module`` from images in [0, 1], shape (N, C, H, W), to images in
[0, 1] of the same shape, and declares in ``adaptive`` how an adaptive attack gets through it
(Athalye et al. 2018, "Obfuscated gradients give a false sense of security",
https://arxiv.org/abs/1802.00420). None of these transforms is a defense against such an
attack: they only break attacks that need the transform's own gradients, which is why each
names its way through. :func:`bpda` builds the module an attack differentiates instead.
"""

from __future__ import annotations

import io
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

__all__ = [
    "JPEG", "Adaptive", "BitDepth", "MedianSmoothing", "TotalVariation", "Transform",
    "bpda", "total_variation",
]

AdaptiveKind = Literal["differentiable", "bpda", "eot"]


@dataclass(frozen=True)
class Adaptive:
    """How an adaptive attack gets through a transform.

    kind:
        ``"differentiable"``: attack the transform as it is; its gradients are honest.
        ``"bpda"``: the forward pass is the transform, the backward pass is a differentiable
        approximation of it (Backward Pass Differentiable Approximation, Athalye et al. 2018).
        ``"eot"``: the transform is random; average gradients over its randomness
        (Expectation over Transformation), through ``approximation`` if that is given.
    approximation:
        The approximation's name for ``"bpda"`` (``"identity"``: the transform is close to
        x -> x, so its Jacobian is taken to be the identity); for ``"eot"`` the BPDA
        approximation used inside each draw, or None; always None for ``"differentiable"``.
    """

    kind: AdaptiveKind
    approximation: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("differentiable", "bpda", "eot"):
            raise ValueError(f"Adaptive kind must be 'differentiable', 'bpda' or 'eot' "
                             f"(got {self.kind!r})")
        if self.kind == "bpda" and not self.approximation:
            raise ValueError("Adaptive('bpda') needs the approximation's name, "
                             "e.g. Adaptive('bpda', 'identity')")
        if self.kind == "differentiable" and self.approximation is not None:
            raise ValueError(f"a differentiable transform needs no approximation "
                             f"(got {self.approximation!r}); drop it")

    def __str__(self) -> str:
        return self.kind if self.approximation is None else f"{self.kind}:{self.approximation}"


def _check_images(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} takes a torch.Tensor (got {type(x).__name__})")
    if x.dim() != 4:
        raise ValueError(f"{name} takes images of shape (N, C, H, W) (got {tuple(x.shape)}); "
                         "add a batch dimension with x.unsqueeze(0) for a single image")
    if not x.is_floating_point():
        raise TypeError(f"{name} takes floating-point images in [0, 1] (got {x.dtype}); "
                        "for uint8 images use x.float() / 255")
    if x.numel() == 0:
        return
    x_min, x_max = (v.item() for v in torch.aminmax(x.detach()))
    if not (math.isfinite(x_min) and math.isfinite(x_max)):
        raise ValueError(f"{name}: the images contain "
                         f"{int((~torch.isfinite(x)).sum())} NaN or inf values")
    if x_min < 0 or x_max > 1:
        raise ValueError(f"{name} takes images in [0, 1] (got min {x_min:.4g}, max "
                         f"{x_max:.4g}); scale images to [0, 1] and put normalisation "
                         "inside the model (advkit.models.Normalize)")


class Transform(nn.Module, ABC):
    """An input transform: images in [0, 1], (N, C, H, W), to images in [0, 1] of the same
    shape. Subclasses implement ``_transform`` and declare ``adaptive`` (a class attribute,
    or a property where the settings decide it); a BPDA transform whose approximation is not
    the identity also overrides ``approximation``.
    """

    adaptive: Adaptive

    def forward(self, x: Tensor) -> Tensor:
        _check_images(x, type(self).__name__)
        return self._transform(x)

    @abstractmethod
    def _transform(self, x: Tensor) -> Tensor:
        """The transform itself, on inputs already checked."""

    def approximation(self, x: Tensor) -> Tensor:
        """The differentiable stand-in that BPDA differentiates (the identity by default)."""
        return x

    def for_attack(self) -> nn.Module:
        """The module an adaptive attack differentiates: see :func:`bpda`; the transform
        itself where it declares no approximation (differentiable, or random and
        differentiated directly in each EOT draw)."""
        if self.adaptive.approximation is None:
            return self
        return bpda(self)


class _BackwardThrough(torch.autograd.Function):
    """Forward: the transform. Backward: the vector-Jacobian product of the approximation
    at the same input (the identity's is the incoming gradient itself)."""

    @staticmethod
    def forward(ctx, x: Tensor, transform: Transform) -> Tensor:
        ctx.save_for_backward(x)
        ctx.transform = transform
        with torch.no_grad():
            return transform(x)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:
        transform: Transform = ctx.transform
        if transform.adaptive.approximation == "identity":
            # The identity's vector-Jacobian product is the vector: no second pass needed.
            return grad_output, None
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(transform.approximation(x), x, grad_output)
        return grad, None


class _BPDA(nn.Module):
    def __init__(self, transform: Transform) -> None:
        super().__init__()
        self.transform = transform

    def forward(self, x: Tensor) -> Tensor:
        return _BackwardThrough.apply(x, self.transform)

    def extra_repr(self) -> str:
        return f"backward={self.transform.adaptive.approximation}"


def bpda(transform: Transform) -> nn.Module:
    """The module an adaptive attack differentiates in place of ``transform``.

    For a ``"bpda"`` transform: a module whose forward pass is the transform and whose
    backward pass is its declared approximation (Athalye et al. 2018, section 4.1), so an
    attack optimises against what the classifier really sees while still getting useful
    gradients. A ``"differentiable"`` transform is returned as it is. An ``"eot"`` transform
    is returned as a BPDA module too (when it names an approximation): each call is one draw,
    and the attack averages gradients over draws.
    """
    if not isinstance(transform, Transform):
        raise TypeError(f"bpda takes an advkit.defenses Transform "
                        f"(got {type(transform).__name__})")
    if transform.adaptive.kind == "differentiable":
        return transform
    if transform.adaptive.approximation is None:
        raise ValueError(f"{type(transform).__name__} declares {transform.adaptive} with no "
                         "approximation: differentiate it directly inside EOT instead")
    return _BPDA(transform)


def _check_int(value: object, name: str, low: int, high: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}] (got {value!r}); {fix}")
    return value


class BitDepth(Transform):
    """Bit-depth reduction: each pixel rounded to the nearest of 2**bits evenly spaced levels
    in [0, 1] (Xu et al. 2018, "Feature squeezing", https://arxiv.org/abs/1704.01155).

    bits: bits per channel, 1 to 8 (1 on MNIST is Xu et al.'s binarisation).
    """

    adaptive = Adaptive("bpda", "identity")

    def __init__(self, bits: int = 4) -> None:
        super().__init__()
        self.bits = _check_int(bits, "bits", 1, 8, "e.g. BitDepth(bits=4)")

    def _transform(self, x: Tensor) -> Tensor:
        levels = 2 ** self.bits - 1
        return torch.round(x * levels) / levels

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class MedianSmoothing(Transform):
    """Median filter: each pixel replaced by the median of the size x size window around it,
    per channel, with reflect padding at the border (Xu et al. 2018's local smoothing).

    size: the window's side, an odd number from 1 (the identity) to 15.
    """

    adaptive = Adaptive("bpda", "identity")

    def __init__(self, size: int = 3) -> None:
        super().__init__()
        self.size = _check_int(size, "size", 1, 15, "use an odd window, e.g. size=3")
        if size % 2 == 0:
            # An even window has no centre pixel and its median is not one of the values.
            raise ValueError(f"size must be odd (got {size}); e.g. size=3")

    def _transform(self, x: Tensor) -> Tensor:
        pad = self.size // 2
        if pad == 0:
            return x.clone()
        if pad >= min(x.shape[-2:]):
            raise ValueError(f"MedianSmoothing(size={self.size}) needs images larger than "
                             f"{pad} pixels a side for reflect padding (got "
                             f"{tuple(x.shape[-2:])}); use a smaller size")
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        windows = padded.unfold(2, self.size, 1).unfold(3, self.size, 1)  # N, C, H, W, k, k
        return windows.flatten(-2).median(dim=-1).values

    def extra_repr(self) -> str:
        return f"size={self.size}"


class JPEG(Transform):
    """JPEG compression: each image encoded and decoded by Pillow's (libjpeg's) codec at
    ``quality`` (Dziugaite et al. 2016, https://arxiv.org/abs/1608.00853; Guo et al. 2018,
    https://arxiv.org/abs/1711.00117). Grayscale (C = 1) and RGB (C = 3) images only.

    The round trip runs on the CPU through uint8 (pixels rounded to multiples of 1/255) and
    the result returns to the input's device and dtype. It has no gradient: :func:`bpda`
    differentiates :meth:`approximation` instead, JPEG written in torch with a smooth
    rounding (Shin & Song 2017, "JPEG-resistant adversarial images": round(z) + (z -
    round(z))**3). The identity, Athalye et al.'s choice, is much weaker here: on the MNIST
    PGD-trained preset (200 test images, APGD-CE then APGD-DLR at Linf 0.3, quality 75) it
    left 64.5% robust, the approximation 23.5%.

    quality: Pillow's JPEG quality, 1 (smallest file) to 100.
    """

    adaptive = Adaptive("bpda", "differentiable-jpeg")

    def __init__(self, quality: int = 75) -> None:
        super().__init__()
        self.quality = _check_int(quality, "quality", 1, 100, "e.g. JPEG(quality=75)")

    def _transform(self, x: Tensor) -> Tensor:
        channels = x.shape[1]
        if channels not in (1, 3):
            raise ValueError(f"JPEG takes grayscale (C = 1) or RGB (C = 3) images "
                             f"(got C = {channels})")
        pixels = (x.detach() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        out = np.stack([self._round_trip(image) for image in pixels])
        result = torch.from_numpy(out).reshape(pixels.shape).permute(0, 3, 1, 2)
        return (result.to(x.dtype) / 255).to(x.device)

    def approximation(self, x: Tensor) -> Tensor:
        """JPEG in torch, differentiable: level shift, 8x8 block DCT, division by the
        quality-scaled quantisation tables of the standard (ITU T.81, annex K; luminance
        for Y, chrominance for Cb and Cr of an RGB image, which are coded at half
        resolution as Pillow does), smooth rounding, and back. With hard rounding it is
        within 0.001 of Pillow's round trip on average on MNIST images (the identity:
        0.009); it leaves out libjpeg's integer arithmetic."""
        if x.shape[1] not in (1, 3):
            raise ValueError(f"JPEG takes grayscale (C = 1) or RGB (C = 3) images "
                             f"(got C = {x.shape[1]})")
        return _jpeg_approximation(x, self.quality, hard=False)

    def _round_trip(self, image: np.ndarray) -> np.ndarray:
        grayscale = image.shape[-1] == 1
        pil = Image.fromarray(image[..., 0] if grayscale else image, "L" if grayscale else "RGB")
        buffer = io.BytesIO()
        pil.save(buffer, format="JPEG", quality=self.quality)
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            return np.asarray(decoded.convert("L" if grayscale else "RGB"))

    def extra_repr(self) -> str:
        return f"quality={self.quality}"


#: The example quantisation tables of the JPEG standard (ITU T.81, annex K, tables K.1, K.2),
#: which libjpeg scales by quality.
_LUMINANCE = (
    (16, 11, 10, 16, 24, 40, 51, 61), (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56), (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77), (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101), (72, 92, 95, 98, 112, 100, 103, 99))
_CHROMINANCE = (
    (17, 18, 24, 47, 99, 99, 99, 99), (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99), (47, 66, 99, 99, 99, 99, 99, 99),
    *[(99,) * 8] * 4)
#: JFIF's RGB -> YCbCr matrix (offsets applied separately).
_YCBCR = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))


def _jpeg_approximation(x: Tensor, quality: int, *, hard: bool) -> Tensor:
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality  # libjpeg's quality scaling
    luma, chroma = (((torch.tensor(t, dtype=x.dtype, device=x.device) * scale + 50) // 100)
                    .clamp(1, 255) for t in (_LUMINANCE, _CHROMINANCE))
    v = x * 255
    if x.shape[1] == 1:
        return (_jpeg_planes(v, luma, hard) / 255).clamp(0, 1)
    ycbcr = torch.tensor(_YCBCR, dtype=x.dtype, device=x.device)
    offset = torch.tensor([0.0, 128.0, 128.0], dtype=x.dtype, device=x.device)[:, None, None]
    v = torch.einsum("ij,njhw->nihw", ycbcr, v) + offset
    h, w = v.shape[2:]
    # Pillow's default 4:2:0: Cb and Cr coded at half resolution (2x2 averages), and
    # brought back by libjpeg's "fancy" (triangle) upsampling, bilinear here.
    small = F.avg_pool2d(F.pad(v[:, 1:], (0, w % 2, 0, h % 2), mode="replicate"), 2)
    small = _jpeg_planes(small, chroma, hard)
    cbcr = F.interpolate(small, scale_factor=2, mode="bilinear", align_corners=False)
    v = torch.cat([_jpeg_planes(v[:, :1], luma, hard), cbcr[:, :, :h, :w]], dim=1) - offset
    return (torch.einsum("ij,njhw->nihw", torch.linalg.inv(ycbcr), v) / 255).clamp(0, 1)


def _jpeg_planes(v: Tensor, table: Tensor, hard: bool) -> Tensor:
    """Planes of values in [0, 255] through JPEG's lossy core: level shift, 8x8 block DCT,
    quantisation by ``table`` (rounded hard, or smoothly), and back."""
    k = torch.arange(8, dtype=v.dtype, device=v.device)
    # The orthonormal DCT-II matrix: JPEG's 2-D DCT of a block is dct @ block @ dct.T.
    dct = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / 16)
    dct = dct * torch.where(k[:, None] == 0, math.sqrt(1 / 8), 0.5)
    n, c, h, w = v.shape
    # libjpeg pads a partial block by repeating the edge.
    v = F.pad(v - 128, (0, -w % 8, 0, -h % 8), mode="replicate")
    rows, cols = v.shape[2] // 8, v.shape[3] // 8
    blocks = v.reshape(n, c, rows, 8, cols, 8).transpose(3, 4)
    z = (dct @ blocks @ dct.T) / table
    rounded = torch.round(z)
    z = rounded if hard else rounded + (z - rounded) ** 3
    v = (dct.T @ (z * table) @ dct).transpose(3, 4).reshape(n, c, rows * 8, cols * 8)
    return v[:, :, :h, :w] + 128


def _gradient(z: Tensor) -> tuple[Tensor, Tensor]:
    # Forward differences, zero across the last row and column (Chambolle 2004, eq. 2.1).
    dy = F.pad(z[..., 1:, :] - z[..., :-1, :], (0, 0, 0, 1))
    dx = F.pad(z[..., :, 1:] - z[..., :, :-1], (0, 1, 0, 0))
    return dy, dx


def _divergence(py: Tensor, px: Tensor) -> Tensor:
    # Minus the adjoint of _gradient (Chambolle 2004, before eq. 2.2), so <grad z, p> = -<z, div p>.
    div_y = torch.cat([py[..., :1, :], py[..., 1:-1, :] - py[..., :-2, :], -py[..., -2:-1, :]],
                      dim=-2)
    div_x = torch.cat([px[..., :1], px[..., 1:-1] - px[..., :-2], -px[..., -2:-1]], dim=-1)
    return div_y + div_x


def total_variation(x: Tensor) -> Tensor:
    """Isotropic total variation per image: the sum over pixels and channels of
    sqrt(dy**2 + dx**2) with forward differences. Returns shape (N,)."""
    dy, dx = _gradient(x)
    return torch.sqrt(dy ** 2 + dx ** 2).flatten(1).sum(dim=1)


class TotalVariation(Transform):
    """Total-variation minimisation (Guo et al. 2018, "Countering adversarial images using
    input transformations", https://arxiv.org/abs/1711.00117): per image and channel,

        z = argmin_z  ||m * (z - x)||**2 / 2 + weight * TV(z),

    with TV the isotropic total variation (Rudin, Osher & Fatemi 1992) and m a random mask
    that keeps each pixel (all its channels) with probability ``keep``, so the solver fills the
    dropped pixels from their neighbours. Solved approximately by ``steps`` iterations of
    Chambolle & Pock's primal-dual algorithm (2011, "A first-order primal-dual algorithm for
    convex problems", algorithm 1), then clipped to [0, 1].

    The solver is unrolled torch operations, so it declares itself differentiable: an
    adaptive attack differentiates every iteration exactly. (Athalye et al. 2018 broke Guo
    et al.'s non-differentiable solver with BPDA through the identity; exact gradients are
    the stronger attack here: on the MNIST PGD-trained preset, 200 test images, APGD-CE then
    APGD-DLR at Linf 0.3 left 50.5% robust through the solver and 86.0% through BPDA.) With
    ``keep < 1`` (Guo et al. used 0.5) it is random, draws its mask from torch's global
    generator (seed with torch.manual_seed) and declares EOT, differentiated directly in
    each draw.

    weight: lambda, the strength of the TV term in pixel units (0 returns x unchanged).
    steps: primal-dual iterations; each costs a few element-wise passes.
    keep: probability that a pixel takes part in the fidelity term, in (0, 1].
    """

    def __init__(self, weight: float = 0.1, steps: int = 20, keep: float = 1.0) -> None:
        super().__init__()
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            raise ValueError(f"weight must be a finite number >= 0 (got {weight!r}); "
                             "e.g. weight=0.1")
        if not (isinstance(keep, (int, float)) and 0 < keep <= 1):
            raise ValueError(f"keep must be a probability in (0, 1] (got {keep!r}); "
                             "1 keeps every pixel, Guo et al. used 0.5")
        self.weight = float(weight)
        self.steps = _check_int(steps, "steps", 1, 10_000, "e.g. steps=20")
        self.keep = float(keep)

    @property
    def adaptive(self) -> Adaptive:  # type: ignore[override]
        return Adaptive("differentiable" if self.keep == 1 else "eot")

    def _transform(self, x: Tensor) -> Tensor:
        if self.weight == 0:
            return x.clone()
        mask = torch.ones_like(x[:, :1])
        if self.keep < 1:
            mask = (torch.rand_like(mask) < self.keep).to(x.dtype)
        # The step sizes satisfy tau * sigma * ||grad||**2 <= 1 (||grad||**2 <= 8), the
        # algorithm's condition for convergence.
        tau = sigma = 8 ** -0.5
        # Start from the kept pixels only: the dropped ones must not leak into the result.
        z = z_bar = x * mask
        py, px = torch.zeros_like(x), torch.zeros_like(x)
        for _ in range(self.steps):
            # Dual step: ascend, then project each 2-vector p onto the ball of radius weight
            # (the conjugate of weight * TV is that ball's indicator).
            gy, gx = _gradient(z_bar)
            py, px = py + sigma * gy, px + sigma * gx
            # (The 1e-12 keeps sqrt's gradient finite where p is 0: attacks differentiate
            # this solver. It moves no result: there the clamp to 1 holds anyway.)
            shrink = torch.clamp(torch.sqrt(py ** 2 + px ** 2 + 1e-12) / self.weight, min=1)
            py, px = py / shrink, px / shrink
            # Primal step: the proximal map of the masked fidelity term, in closed form.
            z_next = (z + tau * _divergence(py, px) + tau * mask * x) / (1 + tau * mask)
            z, z_bar = z_next, 2 * z_next - z
        return z.clamp(0, 1)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, steps={self.steps}, keep={self.keep}"
