"""HTML building blocks: one page template, thumbnails, figures, tables (jinja2 + matplotlib)."""
from __future__ import annotations

import base64
import io
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from jinja2 import Environment

from ..io import atomic_write_bytes

PAGE = Environment(autoescape=True).from_string("""<!doctype html><html><head><meta charset="utf-8">
<title>{{ title }}</title><style>
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f4f4f4}.grid{display:flex;flex-wrap:wrap;gap:10px}
.card{width:180px;border:1px solid #ddd;border-radius:6px;padding:6px;font-size:12px}
.card img{width:168px;height:168px;object-fit:cover}.ok{color:#1a7f37}.bad{color:#c62828}
.bar{background:#4c78a8;height:8px;display:inline-block}
</style></head><body><h1>{{ title }}</h1>
{% for s in sections %}<h2>{{ s.title }}</h2>
{% if s.table %}<table><tr>{% for h in s.table[0] %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in s.table[1:] %}<tr>{% for c in row %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}</table>{% endif %}
{% if s.image %}<img src="data:image/png;base64,{{ s.image }}" style="max-width:100%">{% endif %}
{% if s.cards %}<div class="grid">{% for c in s.cards %}<div class="card">
<img src="data:image/jpeg;base64,{{ c.thumb }}"><div><b>{{ c.title }}</b>{% if c.truth %} — truth: {{ c.truth }}{% endif %}</div>
{% for p in c.preds %}<div class="{{ 'ok' if p.ok else ('bad' if loop.first and c.truth else '') }}">
{{ p.name }} {{ '%.2f' % p.prob }}
<span class="bar" style="width:{{ (p.prob*60)|int }}px"></span></div>{% endfor %}</div>{% endfor %}</div>{% endif %}
{% if s.text %}<pre>{{ s.text }}</pre>{% endif %}
{% endfor %}</body></html>""")


def thumb_b64(im, size: int = 168) -> str:
    im = im.copy()
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=85)
    return base64.b64encode(buf.getvalue()).decode()


def _plt():
    """matplotlib's pyplot on the Agg backend (heavy: imported on the first figure)."""
    import matplotlib
    matplotlib.use("Agg")
    matplotlib.rcParams["text.parse_math"] = False  # class or concept names with "$" are text, never mathtext
    import matplotlib.pyplot as plt
    return plt


def fig_b64(fig) -> str | None:
    """A figure as base64 PNG; a figure that fails to render is left out of the report (with a warning),
    never allowed to take the results down with it."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    except Exception as exc:  # noqa: BLE001 - plotting is optional; results are already written
        warnings.warn(f"a figure could not be drawn and is left out: {type(exc).__name__}: {exc}", stacklevel=2)
        return None
    finally:
        _plt().close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def confusion_figure(labels: np.ndarray, preds: np.ndarray, classnames: Sequence[str], title: str = ""):
    """Row-normalised confusion matrix as a matplotlib figure."""
    from sklearn.metrics import confusion_matrix
    plt = _plt()
    n = len(classnames)
    cm = confusion_matrix(labels, preds, labels=list(range(n))).astype(float)
    cm /= np.maximum(cm.sum(1, keepdims=True), 1)
    size = max(4, min(14, 0.45 * n + 2))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classnames, rotation=90, fontsize=8)
    ax.set_yticks(range(n), classnames, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if cm[i, j] >= 0.01:
                    ax.text(j, i, f"{cm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if cm[i, j] > 0.5 else "black")
    ax.set_title(title)
    return fig


def write_html(path: Path, title: str, sections: list[dict]) -> Path:
    path = Path(path)
    atomic_write_bytes(path, PAGE.render(title=title, sections=sections).encode())
    return path


def table_text(rows: list[list]) -> str:
    """A plain fixed-width table for the terminal."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def image_cards(images, titles: Sequence[str], captions: Sequence[str] | None = None) -> list[dict]:
    """Report cards (thumbnail + title + one line) for a ranked image grid."""
    return [{"thumb": thumb_b64(im), "title": t, "truth": (captions[i] if captions else None), "preds": []}
            for i, (im, t) in enumerate(zip(images, titles)) if im is not None]


def bar_figure(labels: Sequence[str], values: Sequence[float], title: str = "", xlabel: str = ""):
    """Horizontal bar chart, largest on top."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(labels) + 1))
    y = np.arange(len(labels))[::-1]
    ax.barh(y, values, color=["#4c78a8" if v >= 0 else "#e45756" for v in values])
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    return fig
