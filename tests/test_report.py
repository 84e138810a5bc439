"""Specification of advkit.report: the self-contained HTML report and its JSON twin.

The last tests render the page in headless Chromium (scripts/install_chromium.sh
installs it); they skip without it, except under CI=true, where they must run.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from browser import run_chromium
from PIL import Image

from advkit.report import GalleryItem, write_html_report, write_json_report
from advkit.report.images import amplified_perturbation, png_data_uri

WINDOW = (1280, 2000)
TITLE = "SmallCNN on MNIST & CIFAR-10 <smoke test>"


def _digit_seven() -> torch.Tensor:
    """A crude handwritten-looking 7 on a 28x28 black background, (1, 28, 28)."""
    image = torch.zeros(1, 28, 28)
    image[0, 5:8, 6:22] = 1.0
    for row in range(8, 24):
        column = 21 - (row - 8) // 2
        image[0, row, column - 1:column + 2] = 0.9
    return image


def _blob_rgb(seed: int) -> torch.Tensor:
    """A smooth coloured blob on a sky gradient, (3, 32, 32)."""
    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    cy, cx = torch.rand(2, generator=generator) * 0.4 + 0.3
    blob = torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / 0.03)
    sky = torch.stack([0.4 + 0.3 * ys, 0.6 + 0.2 * ys, 0.9 - 0.2 * ys])
    colour = torch.tensor([0.9, 0.5, 0.1]).view(3, 1, 1)
    return (sky * (1 - blob) + colour * blob).clamp(0, 1)


def _attacked(clean: torch.Tensor, eps: float, seed: int) -> torch.Tensor:
    """FGSM-like sign noise of size eps, clipped to the image bounds."""
    generator = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, clean.shape, generator=generator).float() * 2 - 1
    return (clean + eps * sign).clamp(0, 1)


def _gallery() -> list[GalleryItem]:
    seven = _digit_seven()
    items = [
        GalleryItem(seven, _attacked(seven, 0.3, 1), "7", "7", 0.993, "3", 0.871,
                    "PGD linf eps=0.3", 0.3),
        GalleryItem(seven, _attacked(seven, 0.1, 2), "7", "7", 0.993, "7", 0.64,
                    "FGSM linf eps=0.1", 0.1),
    ]
    for seed, (label, fooled_as) in enumerate([("cat", "dog"), ("ship", "airplane")]):
        clean = _blob_rgb(seed)
        items.append(GalleryItem(clean, _attacked(clean, 8 / 255, seed), label, label, 0.91,
                                 fooled_as, 0.77, "PGD linf eps=8/255", 8 / 255))
    return items


REPORT_FIELDS = dict(
    title=TITLE,
    summary=[
        {"attack": "FGSM", "eps": 0.3, "clean_acc": 0.9912, "robust_acc": 0.4235,
         "success_rate": 0.5727, "median_norm": 0.3, "images_per_s": 15234.7},
        {"attack": "PGD-40", "eps": 0.3, "clean_acc": 0.9912, "robust_acc": 0.0123,
         "success_rate": 0.9876, "median_norm": float("nan"), "images_per_s": 412.25},
    ],
    curves={
        "FGSM": [(0.0, 0.9912), (0.1, 0.81), (0.2, 0.6), (0.3, 0.4235)],
        "PGD-40": [(0.3, 0.0123), (0.0, 0.9912), (0.1, 0.55), (0.2, 0.12)],
    },
    environment={"torch": torch.__version__, "device": "cpu", "seed": 0,
                 "model_sha256": "3f2a9c0d" * 8, "deterministic": True},
    notes=["Robust accuracy is the per-sample worst case over all attacks run."],
)


@pytest.fixture(scope="module")
def gallery() -> list[GalleryItem]:
    return _gallery()


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, gallery: list[GalleryItem]) -> Path:
    path = tmp_path_factory.mktemp("report") / "report.html"
    assert write_html_report(path, gallery=gallery, **REPORT_FIELDS) == path
    return path


@pytest.fixture(scope="module")
def html(report: Path) -> str:
    return report.read_text("utf-8")


# --- structure of the HTML -----------------------------------------------------------------------


def test_html_references_no_network_resource(html: str) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.IGNORECASE)
    # Stronger than required: no URL anywhere, not even an SVG namespace.
    assert "http://" not in html and "https://" not in html
    assert "<link" not in html and "<script" not in html


def test_html_embeds_three_png_images_per_gallery_item(html: str, gallery) -> None:
    sources = re.findall(r'<img class="px" src="([^"]+)"', html)
    assert len(sources) == 3 * len(gallery)
    assert all(source.startswith("data:image/png;base64,") for source in sources)


def test_html_shows_summary_keys_as_headers_and_fractions_as_percents(html: str) -> None:
    for header in ("attack", "clean acc", "robust acc", "success rate", "median norm"):
        assert f">{header}</th>" in html
    for cell in ("99.1%", "42.4%", "1.2%", "98.8%", "15,235", "412.2", "n/a", "PGD-40"):
        assert f">{cell}</td>" in html


def test_html_plots_one_line_per_curve_as_inline_svg(html: str) -> None:
    assert html.count("<svg") == 1
    assert ">robust accuracy</text>" in html and ">FGSM</text>" in html
    assert ">PGD-40</text>" in html


def test_html_shows_predictions_confidences_and_amplification(html: str) -> None:
    assert "87.1%" in html and "99.3%" in html
    assert "0.5 + δ / (2·max|δ|)" in html
    assert "shown ×1.67" in html  # 1 / (2 * 0.3)


def test_html_lists_environment_and_notes(html: str) -> None:
    assert "3f2a9c0d" * 8 in html and ">yes</td>" in html
    assert "per-sample worst case" in html


def test_html_escapes_user_text(html: str) -> None:
    assert "SmallCNN on MNIST &amp; CIFAR-10 &lt;smoke test&gt;" in html
    assert "<smoke test>" not in html


def test_html_escapes_text_inside_the_plot(tmp_path: Path) -> None:
    path = write_html_report(tmp_path / "r.html", title="t", summary=[], gallery=[],
                             curves={"<b>x</b> & $y$": [(0.0, 1.0)], "_private": [(0, 0.5)]},
                             environment={})
    text = path.read_text("utf-8")
    assert "<b>x</b>" not in text and "&lt;b&gt;x&lt;/b&gt; &amp; $y$" in text
    assert "_private</text>" in text  # matplotlib would hide a label starting with "_"


def test_report_is_reproducible_byte_for_byte(tmp_path: Path, html: str, gallery) -> None:
    again = write_html_report(tmp_path / "again.html", gallery=gallery, **REPORT_FIELDS)
    assert again.read_text("utf-8") == html


def test_empty_sections_say_so(tmp_path: Path) -> None:
    path = write_html_report(tmp_path / "empty.html", title="Nothing yet", summary=[],
                             curves={}, gallery=[], environment={})
    text = path.read_text("utf-8")
    assert "No summary rows." in text and "No curves." in text
    assert "No adversarial examples." in text and "<svg" not in text


# --- images --------------------------------------------------------------------------------------


def _decode(uri: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def test_small_images_are_upscaled_with_nearest_neighbour() -> None:
    image = torch.zeros(1, 28, 28)
    image[0, 0, 0] = 1.0
    picture = _decode(png_data_uri(image))
    assert picture.size == (140, 140) and picture.mode == "L"
    pixels = np.asarray(picture)
    assert (pixels[:5, :5] == 255).all() and (pixels[5:, :] == 0).all()  # one sharp block


def test_rgb_images_stay_rgb() -> None:
    picture = _decode(png_data_uri(_blob_rgb(0)))
    assert picture.size == (128, 128) and picture.mode == "RGB"


def test_perturbation_maps_zero_to_mid_grey_and_extremes_to_black_and_white() -> None:
    clean = torch.full((1, 2, 2), 0.5)
    adversarial = clean + torch.tensor([[[0.0, 0.1], [-0.1, 0.05]]])
    shown, peak = amplified_perturbation(clean, adversarial)
    assert math.isclose(peak, 0.1, rel_tol=1e-5)
    assert torch.allclose(shown, torch.tensor([[[0.5, 1.0], [0.0, 0.75]]]), atol=1e-5)


def test_identical_images_give_a_uniform_grey_perturbation() -> None:
    shown, peak = amplified_perturbation(torch.ones(3, 4, 4), torch.ones(3, 4, 4))
    assert peak == 0.0 and bool((shown == 0.5).all())


# --- the JSON twin -------------------------------------------------------------------------------


def test_json_report_holds_the_same_facts_without_pixels(tmp_path: Path, gallery) -> None:
    path = write_json_report(tmp_path / "report.json", gallery=gallery, **REPORT_FIELDS)
    document = json.loads(path.read_text("utf-8"))
    assert document["format"] == "advkit-report" and document["title"] == TITLE
    assert document["summary"][1]["median_norm"] is None  # NaN is not JSON
    assert document["curves"]["PGD-40"][0] == [0.0, 0.9912]  # sorted by eps
    assert document["gallery"][0] == {
        "label": "7", "clean_pred": "7", "clean_conf": 0.993, "adv_pred": "3",
        "adv_conf": 0.871, "attack": "PGD linf eps=0.3", "norm": 0.3, "fooled": True,
        "shape": [1, 28, 28], "max_abs_delta": pytest.approx(0.3, rel=1e-5)}
    assert document["environment"]["deterministic"] is True
    assert "base64" not in path.read_text("utf-8")


# --- atomic writes -------------------------------------------------------------------------------


def test_write_replaces_an_existing_report_and_leaves_no_temporary_file(
        tmp_path: Path, gallery) -> None:
    path = tmp_path / "out" / "report.html"
    write_html_report(path, title="first", summary=[], curves={}, gallery=[], environment={})
    write_html_report(path, gallery=gallery, **REPORT_FIELDS)
    assert "first" not in path.read_text("utf-8")
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]


def test_invalid_input_leaves_the_previous_report_untouched(tmp_path: Path) -> None:
    path = write_html_report(tmp_path / "r.html", title="kept", summary=[], curves={},
                             gallery=[], environment={})
    with pytest.raises(ValueError):
        write_html_report(path, title="lost", summary=[{"acc": 2.0}], curves={}, gallery=[],
                          environment={})
    assert "kept" in path.read_text("utf-8")
    assert len(list(tmp_path.iterdir())) == 1


# --- input validation ----------------------------------------------------------------------------


def _item(clean: object, adversarial: object = None, **changes: object) -> GalleryItem:
    fields = dict(label="7", clean_pred="7", clean_conf=0.9, adv_pred="1", adv_conf=0.8,
                  attack="PGD", norm=0.3)
    fields.update(changes)
    return GalleryItem(clean, clean if adversarial is None else adversarial, **fields)


@pytest.mark.parametrize(("image", "message"), [
    (torch.zeros(28, 28), r"must be 3-D \(C, H, W\) \(got shape \(28, 28\)\)"),
    (torch.zeros(2, 1, 28, 28), "must be 3-D"),
    (torch.zeros(28, 28, 3), r"channels-last; use \.permute\(2, 0, 1\)"),
    (torch.zeros(1, 28, 28, dtype=torch.uint8), r"floating-point.*\.float\(\) / 255"),
    (torch.full((1, 4, 4), 1.5), r"must lie in \[0, 1\] \(got min 1.5, max 1.5\)"),
    (torch.full((1, 4, 4), -0.2), r"must lie in \[0, 1\]"),
    (torch.full((1, 4, 4), float("nan")), "NaN"),
    (np.zeros((1, 4, 4)), "must be a torch.Tensor"),
])
def test_gallery_item_rejects_bad_images(image: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _item(image)


def test_gallery_item_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"same shape \(got \(1, 4, 4\) and \(3, 4, 4\)\)"):
        _item(torch.zeros(1, 4, 4), torch.zeros(3, 4, 4))


def test_gallery_item_rejects_confidence_that_is_not_a_probability() -> None:
    with pytest.raises(ValueError, match=r"clean_conf must be a softmax probability.*7\.2"):
        _item(torch.zeros(1, 4, 4), clean_conf=7.2)


def test_gallery_item_rejects_class_index_instead_of_name() -> None:
    with pytest.raises(ValueError, match="label must be a str"):
        _item(torch.zeros(1, 4, 4), label=7)


def _write(tmp_path: Path, **changes: object) -> Path:
    fields = dict(title="t", summary=[], curves={}, gallery=[], environment={})
    fields.update(changes)
    return write_html_report(tmp_path / "r.html", **fields)


@pytest.mark.parametrize(("changes", "message"), [
    ({"title": ""}, "title must be a non-empty string"),
    ({"summary": [{"a": 1}, {"b": 2}]}, r"summary\[1\] is missing \['a'\] and has extra \['b'\]"),
    ({"summary": [{"robust_acc": 87.5}]}, r"fraction in \[0, 1\] \(got 87.5\); divide"),
    ({"summary": {"a": 1}}, "summary must be a list of dicts"),
    ({"curves": {"PGD": []}}, r"curves\['PGD'\] must be a non-empty list"),
    ({"curves": {"PGD": [(0.1, 1.3)]}}, r"accuracy must be a fraction in \[0, 1\] \(got 1.3\)"),
    ({"curves": {"PGD": [(-0.1, 0.3)]}}, r"eps must be >= 0 \(got -0.1\)"),
    ({"curves": {"PGD": [(float("nan"), 0.3)]}}, "eps must be finite"),
    ({"gallery": [torch.zeros(1, 4, 4)]}, "gallery must be a list of GalleryItem"),
    ({"notes": "one note"}, "notes must be a list of strings"),
])
def test_write_rejects_bad_input_naming_the_value(tmp_path: Path, changes, message) -> None:
    with pytest.raises(ValueError, match=message):
        _write(tmp_path, **changes)


# --- rendered in a real browser ------------------------------------------------------------------


def _run_chromium(report: Path, profile: Path, *arguments: str) -> subprocess.CompletedProcess:
    return run_chromium(report, profile, *arguments, window=WINDOW)


def test_chromium_screenshot_has_the_window_size_and_is_not_blank(
        report: Path, tmp_path: Path) -> None:
    screenshot = tmp_path / "report.png"
    result = _run_chromium(report, tmp_path / "profile", f"--screenshot={screenshot}")
    assert screenshot.exists(), f"no screenshot; chromium said:\n{result.stderr[-2000:]}"
    picture = Image.open(screenshot).convert("RGB")
    assert picture.size == WINDOW
    pixels = np.asarray(picture)
    assert pixels.astype(np.float64).std() > 20.0
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200
    # The plot rendered: the first curve's colour (#0072B2) is on screen.
    assert (np.abs(pixels.astype(int) - (0, 114, 178)).max(axis=2) < 8).sum() > 200


def test_chromium_dom_contains_the_visible_text(report: Path, tmp_path: Path) -> None:
    result = _run_chromium(report, tmp_path / "profile", "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    assert "SmallCNN on MNIST &amp; CIFAR-10 &lt;smoke test&gt;" in dom
    assert ">airplane</span>" in dom and ">42.4%</td>" in dom
    assert dom.count("<img") == 12 and "<svg" in dom
