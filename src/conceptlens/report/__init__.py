"""Reports: HTML building blocks (html) and one page per capability (pages)."""
from .html import bar_figure, confusion_figure, fig_b64, image_cards, table_text, thumb_b64, write_html
from .pages import cbm_report, diagnose_report, explain_report, search_report

__all__ = ["bar_figure", "cbm_report", "confusion_figure", "diagnose_report", "explain_report", "fig_b64",
           "image_cards", "search_report", "table_text", "thumb_b64", "write_html"]
