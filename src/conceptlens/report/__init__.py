"""Reports: HTML building blocks (html) and one page per capability (pages)."""
from .html import (acc_text, bar_figure, confusion_figure, fig_b64, format_table, heatmap_figure, image_cards,
                   prediction_cards, results_table, stratified_positions, table_text, thumb_b64, wilson, write_html)
from .pages import (cbm_report, decode_report, decompose_report, diagnose_report, diffusion_report, explain_report,
                    linear_probe_report, predictions_section, search_report, train_report, zeroshot_report)

__all__ = ["acc_text", "bar_figure", "cbm_report", "confusion_figure", "decode_report", "decompose_report", "diagnose_report",
           "diffusion_report", "explain_report", "fig_b64", "format_table", "heatmap_figure", "image_cards",
           "linear_probe_report", "prediction_cards", "predictions_section", "results_table", "search_report",
           "stratified_positions", "table_text", "thumb_b64", "train_report", "wilson", "write_html", "zeroshot_report"]
