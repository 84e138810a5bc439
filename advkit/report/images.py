"""Pictures embedded in the HTML report: image tensors as PNG data URIs, the
amplified perturbation, and the plots (robust accuracy versus eps, query efficiency) as
inline SVG.

Everything here returns text that can go straight into one self-contained HTML
file: no temporary files, no external URLs, and the same bytes for the same input.
"""

from __future__ import annotations

import base64
import io
import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import matplotlib
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator, PercentFormatter
from PIL import Image

if TYPE_CHECKING:
    from advkit.report.queries import QueryEfficiency

# Small images (28x28 digits) are upscaled to about this many pixels on their
# longer side so a reader can see individual pixels; large images are left alone.
# 140 fits three panels side by side in a half-width gallery card.
DISPLAY_PIXELS = 140

# Colour-blind-safe palette (Okabe & Ito), so lines stay distinguishable in print.
_PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def check_image(image: object, name: str) -> torch.Tensor:
    """Validate one image and return it as a detached float32 CPU tensor.

    Args:
        image: a (C, H, W) floating-point tensor with C in {1, 3} and values in [0, 1].
        name: how to call the image in error messages (e.g. ``"gallery[2].clean"``).

    Raises:
        ValueError: if the image is not a tensor of that shape, dtype or range,
            with the fix in the message.
    """
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (C, H, W) "
                         f"(got {type(image).__name__})")
    if image.dim() != 3:
        raise ValueError(f"{name} must be 3-D (C, H, W) (got shape {tuple(image.shape)}); "
                         "pass one image, e.g. x[i], not a batch, and add a channel axis to "
                         "a 2-D grayscale image with .unsqueeze(0)")
    channels = image.shape[0]
    if channels not in (1, 3):
        hint = (" - it looks channels-last; use .permute(2, 0, 1)"
                if image.shape[-1] in (1, 3) else "")
        raise ValueError(f"{name} must have 1 (grayscale) or 3 (RGB) channels first "
                         f"(got shape {tuple(image.shape)}){hint}")
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(image.shape)})")
    if not image.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor in [0, 1] (got {image.dtype}); "
                         "convert 8-bit images with .float() / 255")
    image = image.detach().to(device="cpu", dtype=torch.float32)
    if not bool(torch.isfinite(image).all()):
        raise ValueError(f"{name} contains NaN or infinite values; check the attack's output")
    low, high = float(image.min()), float(image.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(f"{name} values must lie in [0, 1] (got min {low:.4g}, max {high:.4g}); "
                         "undo any normalisation and clamp adversarial images to the bounds")
    return image


def upscale_factor(height: int, width: int) -> int:
    """Integer nearest-neighbour factor that brings the longer side near DISPLAY_PIXELS."""
    # An integer factor keeps every source pixel the same size on screen.
    return max(1, round(DISPLAY_PIXELS / max(height, width)))


def png_data_uri(image: torch.Tensor) -> str:
    """Encode a checked (C, H, W) image in [0, 1] as a ``data:image/png;base64,...`` URI.

    The image is upscaled by :func:`upscale_factor` with nearest-neighbour
    resampling, so single-pixel perturbations stay sharp instead of blurring.
    """
    pixels = (image * 255.0).round().to(torch.uint8).numpy()
    if pixels.shape[0] == 1:
        picture = Image.fromarray(pixels[0], mode="L")
    else:
        picture = Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)), mode="RGB")
    factor = upscale_factor(picture.height, picture.width)
    if factor > 1:
        picture = picture.resize((picture.width * factor, picture.height * factor),
                                 Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def amplified_perturbation(clean: torch.Tensor, adversarial: torch.Tensor
                           ) -> tuple[torch.Tensor, float]:
    """Map ``delta = adversarial - clean`` to [0, 1] for display.

    Uses ``0.5 + delta / (2 * max|delta|)``: mid-grey means "unchanged", white and
    black are the largest increase and decrease. One scale for all channels, so
    the colour of an RGB perturbation is meaningful.

    Returns:
        The displayable (C, H, W) image and ``max|delta|`` (0.0 when the images
        are identical, in which case the image is uniformly mid-grey).
    """
    delta = adversarial - clean
    peak = float(delta.abs().max())
    if peak == 0.0:
        return torch.full_like(delta, 0.5), 0.0
    return (0.5 + delta / (2.0 * peak)).clamp(0.0, 1.0), peak


def _legend_label(name: str) -> str:
    # Matplotlib silently drops legend entries whose label starts with "_";
    # a zero-width space keeps the attack's name visible and unchanged to the eye.
    return "\u200b" + name if name.startswith("_") else name


def curves_svg(curves: Mapping[str, Sequence[tuple[float, float]]]) -> str:
    """Draw robust accuracy versus eps, one line per attack, as an inline ``<svg>`` element.

    Args:
        curves: attack name -> points ``(eps, robust accuracy in [0, 1])``, already
            validated and sorted by eps.

    Returns:
        SVG markup for direct inclusion in HTML: no XML prolog, no namespace URLs,
        no metadata, scaled by CSS through its viewBox.
    """
    with matplotlib.rc_context(_STYLE):
        figure = Figure(figsize=(8.0, 4.2), layout="constrained")
        axes = figure.add_subplot()
        for index, (name, points) in enumerate(curves.items()):
            eps = [point[0] for point in points]
            accuracy = [point[1] for point in points]
            axes.plot(eps, accuracy, label=_legend_label(name), linewidth=2, markersize=5,
                      color=_PALETTE[index % len(_PALETTE)],
                      marker=_MARKERS[index % len(_MARKERS)])
        axes.set_xlabel("perturbation budget ε")
        axes.set_ylabel("robust accuracy")
        axes.set_ylim(-0.02, 1.02)
        axes.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
        _tidy(axes, legend_title="attack")
    return _inline_svg(figure)


def heatmap_svg(rows: Sequence[str], columns: Sequence[str], values: Sequence[Sequence[float]],
                xlabel: str, ylabel: str) -> str:
    """Draw a matrix of fractions in [0, 1] (NaN: not measured, left blank) as a heat map
    with each cell's percentage written in it, as an inline ``<svg>`` (the transferability
    matrix: source rows, target columns)."""
    grid = np.array(values, dtype=float).reshape(len(rows), len(columns))
    with matplotlib.rc_context(_STYLE):
        figure = Figure(figsize=(1.3 * len(columns) + 3.0, 0.45 * len(rows) + 1.6),
                        layout="constrained")
        axes = figure.add_subplot()
        image = axes.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=0.0, vmax=1.0,
                            aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            if not math.isnan(value):
                # Dark cells get white text, light cells black: the number stays legible.
                axes.text(j, i, f"{value:.0%}", ha="center", va="center",
                          color="white" if value < 0.6 else "black")
        axes.set_xticks(range(len(columns)), list(columns), rotation=20, ha="right")
        axes.set_yticks(range(len(rows)), list(rows))
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        figure.colorbar(image, ax=axes, format=PercentFormatter(xmax=1.0, decimals=0))
    return _inline_svg(figure)


def query_efficiency_svg(efficiency: QueryEfficiency) -> str:
    """Draw median norm versus queries (log-x), one line per attack, and, when the data
    has it, robust accuracy at eps versus queries beside it, as an inline ``<svg>``.

    An infinite median (fewer than half the images broken so far) is left as a gap.
    """
    accuracy = efficiency.robust_acc
    budgets = sorted({q for points in efficiency.median_norm.values() for q, _ in points})
    with matplotlib.rc_context(_STYLE):
        figure = Figure(figsize=(11.0 if accuracy else 8.0, 4.2), layout="constrained")
        panels = figure.subplots(1, 2 if accuracy else 1, squeeze=False)[0]
        # Same colour and marker per attack in both panels, so one legend reads for both.
        for index, name in enumerate(efficiency.median_norm):
            look = {"label": _legend_label(name), "linewidth": 2, "markersize": 5,
                    "color": _PALETTE[index % len(_PALETTE)],
                    "marker": _MARKERS[index % len(_MARKERS)]}
            queries, norms = zip(*efficiency.median_norm[name], strict=True)
            panels[0].plot(queries, [n if math.isfinite(n) else math.nan for n in norms],
                           **look)
            if name in accuracy:
                panels[1].plot(*zip(*accuracy[name], strict=True), **look)
        panels[0].set_ylabel(f"median {efficiency.norm} norm (all images)")
        panels[0].set_ylim(bottom=0)
        if accuracy:
            panels[1].set_ylabel(f"robust accuracy at ε = {efficiency.eps:g}")
            panels[1].set_ylim(-0.02, 1.02)
            panels[1].yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
        for axes in panels:
            axes.set_xscale("log")
            axes.set_xlabel("queries per image")
            # The budgets themselves as ticks, written out: "5,000" reads better than 5e3.
            axes.set_xticks(budgets, [f"{q:,}" for q in budgets])
            axes.xaxis.set_minor_locator(NullLocator())
            _tidy(axes, legend_title=None)
        # Outside the axes, right of the last panel: with several attacks an inside legend
        # hides the lines' starts, where they differ most.
        panels[-1].legend(*panels[0].get_legend_handles_labels(), title="attack", frameon=False,
                          loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return _inline_svg(figure)


# No pyplot: a bare Figure needs no backend switch and leaves global state alone.
# svg.fonttype "none" keeps labels as real text (selectable, small, crisp);
# parse_math off so a "$" in an attack name is printed, not parsed as TeX;
# a fixed hash salt makes the SVG ids, and so the report, reproducible.
_STYLE = {"svg.fonttype": "none", "svg.hashsalt": "advkit", "text.parse_math": False,
          "font.size": 11}


def _tidy(axes: Axes, legend_title: str | None) -> None:
    axes.grid(True, color="#d0d4da", linewidth=0.8)
    axes.set_axisbelow(True)
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)
    if legend_title is not None:
        axes.legend(title=legend_title, frameon=False, loc="best")


def _inline_svg(figure: Figure) -> str:
    buffer = io.StringIO()
    with matplotlib.rc_context(_STYLE):
        figure.savefig(buffer, format="svg",
                       metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    svg = buffer.getvalue()
    # The HTML parser knows the SVG namespaces; dropping the prolog and the
    # namespace declarations leaves the report free of any URL.
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r'\s+xmlns(:xlink)?="[^"]*"', "", svg)
    return re.sub(r'\s+(width|height)="[^"]*pt"', "", svg, count=2)
