"""Write an evaluation as one self-contained HTML page for people, and its JSON twin
for machines.

The HTML file embeds everything (CSS, the plots as inline SVG, images as PNG data
URIs), so it can be mailed, attached to a ticket or opened offline and still show
the same thing. Both writers validate all input first and write atomically: a
reader never sees a half-written report, and a failed run leaves the old one intact.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import jinja2
import torch
from markupsafe import Markup

from advkit._files import atomic_write
from advkit.report.images import (
    amplified_perturbation,
    check_image,
    curves_svg,
    png_data_uri,
    query_efficiency_svg,
    upscale_factor,
)
from advkit.report.queries import QueryEfficiency

JSON_FORMAT = "advkit-report"
JSON_VERSION = 1

Scalar = str | int | float | bool | None


# eq=False: field-wise == would compare tensors, which has no single truth value.
@dataclass(frozen=True, eq=False)
class GalleryItem:
    """One adversarial example for the report's gallery (the "panda -> gibbon" figure).

    Attributes:
        clean: the original image, (C, H, W) float in [0, 1], C = 1 or 3.
        adversarial: the attacked image, same shape and range.
        label: true class name.
        clean_pred: predicted class name on the clean image.
        clean_conf: softmax confidence of ``clean_pred``, in [0, 1].
        adv_pred: predicted class name on the adversarial image.
        adv_conf: softmax confidence of ``adv_pred``, in [0, 1].
        attack: a short description of the attack, e.g. ``"PGD linf eps=0.3"``.
        norm: size of the perturbation in the attack's own norm (>= 0).

    Raises:
        ValueError: on construction, if any field is malformed.
    """

    clean: torch.Tensor
    adversarial: torch.Tensor
    label: str
    clean_pred: str
    clean_conf: float
    adv_pred: str
    adv_conf: float
    attack: str
    norm: float

    def __post_init__(self) -> None:
        clean = check_image(self.clean, "GalleryItem.clean")
        adversarial = check_image(self.adversarial, "GalleryItem.adversarial")
        if clean.shape != adversarial.shape:
            raise ValueError(f"GalleryItem.clean and .adversarial must have the same shape "
                             f"(got {tuple(clean.shape)} and {tuple(adversarial.shape)})")
        for field in ("label", "clean_pred", "adv_pred", "attack"):
            if not isinstance(getattr(self, field), str):
                raise ValueError(f"GalleryItem.{field} must be a str "
                                 f"(got {getattr(self, field)!r}); map class indices to names")
        for field in ("clean_conf", "adv_conf"):
            value = _number(getattr(self, field), f"GalleryItem.{field}")
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"GalleryItem.{field} must be a softmax probability in [0, 1] "
                                 f"(got {value!r}); pass softmax(logits), not logits")
        norm = _number(self.norm, "GalleryItem.norm")
        if norm < 0.0:
            raise ValueError(f"GalleryItem.norm must be a finite number >= 0 (got {norm!r})")
        # Frozen, so store the normalised forms through object.__setattr__: CPU
        # float32 tensors and plain floats, whatever the caller passed in.
        object.__setattr__(self, "clean", clean)
        object.__setattr__(self, "adversarial", adversarial)
        for field in ("clean_conf", "adv_conf", "norm"):
            object.__setattr__(self, field, float(getattr(self, field)))

    def metadata(self) -> dict[str, object]:
        """Everything but the pixels, as JSON-ready values."""
        _, peak = amplified_perturbation(self.clean, self.adversarial)
        return {
            "label": self.label,
            "clean_pred": self.clean_pred, "clean_conf": self.clean_conf,
            "adv_pred": self.adv_pred, "adv_conf": self.adv_conf,
            "attack": self.attack, "norm": self.norm,
            "fooled": self.adv_pred != self.label,
            "shape": list(self.clean.shape),
            "max_abs_delta": peak,
        }


def write_html_report(path: str | Path, *, title: str, summary: Sequence[Mapping[str, object]],
                      curves: Mapping[str, Sequence[tuple[float, float]]],
                      gallery: Sequence[GalleryItem], environment: Mapping[str, object],
                      notes: Sequence[str] = (),
                      tables: Sequence[tuple[str, Sequence[Mapping[str, object]]]] = (),
                      banner: str | None = None,
                      query_efficiency: QueryEfficiency | None = None,
                      figures: Sequence[tuple[str, str, str]] = ()) -> Path:
    """Write a self-contained HTML robustness report.

    Args:
        path: output file; its parent directory is created if missing.
        title: page title and heading.
        summary: table rows, each a dict with the same keys (the column headers),
            e.g. attack, eps, clean_acc, robust_acc, success_rate, median_norm.
            Values whose key ends in "acc", "accuracy" or "rate" must be fractions
            in [0, 1] and are shown as percentages; NaN shows as "n/a", None as "—".
        curves: attack name -> points ``(eps, robust accuracy in [0, 1])``, drawn
            as one line per attack on a single plot.
        gallery: adversarial examples shown as clean / amplified perturbation /
            adversarial, with predictions and confidences.
        environment: key -> value (library versions, device, seed, model
            fingerprint, ...), shown as a table for reproducibility.
        notes: warnings or remarks shown prominently at the top (e.g. signs of
            gradient masking).
        tables: further sections after the summary, each ``(heading, rows)`` with
            rows shaped like ``summary``'s (e.g. per stage, checks, per class).
        banner: a warning that changes how everything below must be read (e.g. "this
            run is unfinished"), shown above all else in red.
        query_efficiency: median norm (and robust accuracy) versus queries per image for
            query-based black-box attacks (:meth:`QueryEfficiency.from_results`), drawn
            after the eps plot; None leaves that section out.
        figures: further plots after the tables, each ``(heading, svg, caption)`` with
            ``svg`` inline SVG markup made by :mod:`advkit.report.images` (e.g.
            :func:`~advkit.report.images.heatmap_svg`).

    Returns:
        ``Path(path)``.

    Raises:
        ValueError: if any input is malformed; nothing is written then.
    """
    fields = _validate(title, summary, curves, gallery, environment, notes, banner)
    _check_query_efficiency(query_efficiency)
    columns, rows = _table(fields["columns"], fields["summary"])
    sections = []
    for heading, table_rows in tables:
        if not isinstance(heading, str) or not heading.strip():
            raise ValueError(f"a table heading must be a non-empty string (got {heading!r})")
        keys, checked = _validate_summary(table_rows)
        sections.append((heading, *_table(keys, checked)))
    for figure in figures:
        if (len(figure) != 3 or not all(isinstance(part, str) for part in figure)
                or not figure[1].lstrip().startswith("<svg")):
            raise ValueError("a figure must be (heading, svg markup, caption), all strings, "
                             "the svg from advkit.report.images")
    html = _template().render(
        title=fields["title"],
        banner=banner,
        notes=fields["notes"],
        columns=columns,
        rows=rows,
        sections=sections,
        figures=[(heading, Markup(svg), caption) for heading, svg, caption in figures],
        plot=Markup(curves_svg(fields["curves"])) if fields["curves"] else None,
        curve_names=list(fields["curves"]),
        queries_plot=(Markup(query_efficiency_svg(query_efficiency))
                      if query_efficiency is not None else None),
        queries=query_efficiency,
        gallery=[_card(item) for item in gallery],
        environment=[(key, _display(value)) for key, value in fields["environment"].items()],
    )
    return atomic_write(path, html)


def _table(keys: Sequence[str], checked: Sequence[Mapping[str, Scalar]]
           ) -> tuple[list[dict[str, object]], list[list[dict[str, object]]]]:
    rows = [[_cell(key, row[key]) for key in keys] for row in checked]
    # Right-align a column when its cells are numbers (empty cells do not count).
    columns = [{"name": key.replace("_", " "),
                "numeric": all(row[i]["numeric"] is not False for row in rows)
                and any(row[i]["numeric"] for row in rows)}
               for i, key in enumerate(keys)]
    return columns, rows


def write_json_report(path: str | Path, *, title: str, summary: Sequence[Mapping[str, object]],
                      curves: Mapping[str, Sequence[tuple[float, float]]],
                      gallery: Sequence[GalleryItem], environment: Mapping[str, object],
                      notes: Sequence[str] = (),
                      tables: Sequence[tuple[str, Sequence[Mapping[str, object]]]] = (),
                      banner: str | None = None,
                      query_efficiency: QueryEfficiency | None = None,
                      figures: Sequence[tuple[str, str, str]] = ()) -> Path:
    """Write the machine-readable twin of :func:`write_html_report`.

    Takes the same arguments and validates them the same way. The gallery is
    stored as metadata only (labels, predictions, confidences, norms, shapes, no
    pixels). Non-finite floats become ``null`` so the file is strict JSON.

    Returns:
        ``Path(path)``.
    """
    fields = _validate(title, summary, curves, gallery, environment, notes, banner)
    _check_query_efficiency(query_efficiency)
    document = {
        "format": JSON_FORMAT,
        "version": JSON_VERSION,
        "title": fields["title"],
        "banner": banner,
        "notes": fields["notes"],
        "summary": fields["summary"],
        "curves": {name: [list(point) for point in points]
                   for name, points in fields["curves"].items()},
        "gallery": [item.metadata() for item in gallery],
        "environment": fields["environment"],
        "tables": {heading: _validate_summary(rows)[1] for heading, rows in tables},
        "query_efficiency": query_efficiency.as_dict() if query_efficiency else None,
    }
    text = json.dumps(_json_safe(document), indent=2, ensure_ascii=False, allow_nan=False)
    return atomic_write(path, text + "\n")


# --- validation ----------------------------------------------------------------------------------


def _number(value: object, name: str) -> float:
    """A finite real number as float (accepting NumPy and 0-d torch scalars)."""
    value = _plain(value, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number (got {value!r})")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite (got {value!r})")
    return float(value)


def _plain(value: object, name: str = "value") -> object:
    """Unwrap NumPy / 0-d torch scalars into Python numbers; leave the rest alone."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar (got a tensor of shape "
                             f"{tuple(value.shape)}); reduce it first, e.g. with .mean()")
        return value.item()
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return value.item()
    return value


def _is_fraction_key(key: str) -> bool:
    return key.lower().endswith(("acc", "accuracy", "rate"))


def _validate(title: object, summary: object, curves: object, gallery: object,
              environment: object, notes: object, banner: object = None) -> dict[str, object]:
    """Check every input, returning normalised copies; raise ValueError naming the bad part."""
    if not isinstance(title, str) or not title.strip():
        raise ValueError(f"title must be a non-empty string (got {title!r})")
    if banner is not None and (not isinstance(banner, str) or not banner.strip()):
        raise ValueError(f"banner must be a non-empty string or None (got {banner!r})")
    if isinstance(notes, str) or not all(isinstance(note, str) for note in notes):
        raise ValueError(f"notes must be a list of strings (got {notes!r})")
    if isinstance(gallery, GalleryItem) or not all(isinstance(i, GalleryItem) for i in gallery):
        raise ValueError("gallery must be a list of GalleryItem (got "
                         f"{type(gallery).__name__}); build items with GalleryItem(...)")
    columns, rows = _validate_summary(summary)
    if not isinstance(environment, Mapping):
        raise ValueError(f"environment must be a dict (got {type(environment).__name__})")
    for key in environment:
        if not isinstance(key, str):
            raise ValueError(f"environment keys must be strings (got {key!r})")
    return {
        "title": title,
        "notes": list(notes),
        "columns": columns,
        "summary": rows,
        "curves": _validate_curves(curves),
        "environment": {key: _plain(value, f"environment[{key!r}]")
                        for key, value in environment.items()},
    }


def _check_query_efficiency(value: object) -> None:
    if value is not None and not isinstance(value, QueryEfficiency):
        raise ValueError("query_efficiency must be a QueryEfficiency or None (got "
                         f"{type(value).__name__}); build it with "
                         "QueryEfficiency.from_results(results)")


def _validate_summary(summary: object) -> tuple[list[str], list[dict[str, Scalar]]]:
    if isinstance(summary, Mapping) or not isinstance(summary, Sequence):
        raise ValueError("summary must be a list of dicts, one per table row "
                         f"(got {type(summary).__name__})")
    if not summary:
        return [], []
    rows: list[dict[str, Scalar]] = []
    columns: list[str] = []
    for index, row in enumerate(summary):
        if not isinstance(row, Mapping):
            raise ValueError(f"summary[{index}] must be a dict (got {type(row).__name__})")
        if index == 0:
            columns = list(row)
        elif set(row) != set(columns):
            missing = sorted(set(columns) - set(row))
            extra = sorted(set(row) - set(columns), key=str)
            raise ValueError(f"summary rows must all have the same keys: summary[{index}] "
                             f"is missing {missing} and has extra {extra}")
        clean: dict[str, Scalar] = {}
        for key in columns:
            if not isinstance(key, str):
                raise ValueError(f"summary keys must be strings (got {key!r})")
            value = _plain(row[key], f"summary[{index}][{key!r}]")
            if value is not None and not isinstance(value, str | numbers.Real):
                raise ValueError(f"summary[{index}][{key!r}] must be a string, number or None "
                                 f"(got {type(value).__name__})")
            if (_is_fraction_key(key) and isinstance(value, numbers.Real)
                    and not isinstance(value, bool) and math.isfinite(value)
                    and not 0.0 <= value <= 1.0):
                raise ValueError(f"summary[{index}][{key!r}] must be a fraction in [0, 1] "
                                 f"(got {value!r}); divide percentages by 100")
            clean[key] = value
        rows.append(clean)
    return columns, rows


def _validate_curves(curves: object) -> dict[str, list[tuple[float, float]]]:
    if not isinstance(curves, Mapping):
        raise ValueError("curves must be a dict: attack name -> [(eps, robust accuracy), ...] "
                         f"(got {type(curves).__name__})")
    checked: dict[str, list[tuple[float, float]]] = {}
    for name, points in curves.items():
        if not isinstance(name, str):
            raise ValueError(f"curve names must be strings (got {name!r})")
        if isinstance(points, str | bytes) or not isinstance(points, Sequence) or not points:
            raise ValueError(f"curves[{name!r}] must be a non-empty list of (eps, accuracy) pairs "
                             f"(got {points!r})")
        pairs = []
        for index, point in enumerate(points):
            if not isinstance(point, Sequence) or len(point) != 2:
                raise ValueError(f"curves[{name!r}][{index}] must be an (eps, accuracy) pair "
                                 f"(got {point!r})")
            eps = _number(point[0], f"curves[{name!r}][{index}] eps")
            accuracy = _number(point[1], f"curves[{name!r}][{index}] accuracy")
            if eps < 0.0:
                raise ValueError(f"curves[{name!r}][{index}] eps must be >= 0 (got {eps!r})")
            if not 0.0 <= accuracy <= 1.0:
                raise ValueError(f"curves[{name!r}][{index}] accuracy must be a fraction in "
                                 f"[0, 1] (got {accuracy!r}); divide percentages by 100")
            pairs.append((eps, accuracy))
        # Drawn as a line, so the points must be in eps order whatever order they came in.
        checked[name] = sorted(pairs)
    return checked


# --- rendering -----------------------------------------------------------------------------------


def _format_number(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    if float(value).is_integer() and abs(value) < 1e15:
        return f"{int(value):,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def _display(value: object) -> str:
    """Human-readable text for any value (used for the environment table)."""
    value = _plain(value)
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return str(value)
    if isinstance(value, numbers.Real):
        return _format_number(float(value))
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(_json_safe(value), ensure_ascii=False, default=str)
    return str(value)


def _cell(key: str, value: Scalar) -> dict[str, object]:
    """One summary table cell: its text and whether it is a number (None when empty)."""
    if value is None:
        return {"text": "—", "numeric": None}
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if _is_fraction_key(key) and math.isfinite(value):
            return {"text": f"{100.0 * value:.1f}%", "numeric": True}
        if isinstance(value, numbers.Integral):
            return {"text": f"{int(value):,}", "numeric": True}
        return {"text": _format_number(float(value)), "numeric": True}
    return {"text": _display(value), "numeric": False}


def _card(item: GalleryItem) -> dict[str, object]:
    perturbation, peak = amplified_perturbation(item.clean, item.adversarial)
    _, height, width = item.clean.shape
    return {
        "label": item.label,
        "attack": item.attack,
        "norm": _format_number(item.norm),
        "clean": png_data_uri(item.clean),
        "perturbation": png_data_uri(perturbation),
        "adversarial": png_data_uri(item.adversarial),
        "clean_pred": item.clean_pred,
        "clean_conf": f"{100.0 * item.clean_conf:.1f}%",
        "clean_correct": item.clean_pred == item.label,
        "adv_pred": item.adv_pred,
        "adv_conf": f"{100.0 * item.adv_conf:.1f}%",
        "fooled": item.adv_pred != item.label,
        "peak": f"{peak:.3g}",
        "gain": f"{1.0 / (2.0 * peak):.3g}" if peak > 0 else None,
        "pixelated": upscale_factor(height, width) > 1,
    }


def _template() -> jinja2.Template:
    source = resources.files("advkit.report").joinpath("templates/report.html").read_text("utf-8")
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined,
                                     trim_blocks=True, lstrip_blocks=True)
    return environment.from_string(source)


def _json_safe(value: object) -> object:
    """Convert to strict-JSON values: non-finite floats -> None, unknown objects -> str."""
    value = _plain(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return _json_safe(float(value))
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return str(value)
