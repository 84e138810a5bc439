"""Reports for people and machines: one self-contained HTML page (summary table,
robust-accuracy-versus-eps plot, adversarial-example gallery, environment) and its
JSON twin.
"""

from advkit.report.gallery import gallery_items
from advkit.report.html import GalleryItem, write_html_report, write_json_report

__all__ = ["GalleryItem", "gallery_items", "write_html_report", "write_json_report"]
