"""Reports for people and machines: one self-contained HTML page (summary table,
robust-accuracy-versus-eps plot, query efficiency of black-box attacks, adversarial-example
gallery, environment) and its JSON twin.
"""

from advkit.report.gallery import gallery_items
from advkit.report.html import GalleryItem, write_html_report, write_json_report
from advkit.report.queries import QueryEfficiency

__all__ = ["GalleryItem", "QueryEfficiency", "gallery_items", "write_html_report",
           "write_json_report"]
