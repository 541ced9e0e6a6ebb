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

PAGE = Environment(autoescape=True).from_string("""{% macro grid(cards) %}<div class="grid">{% for c in cards %}<div class="card">
<img src="data:image/jpeg;base64,{{ c.thumb }}" alt="{{ c.title }}"><div><b>{{ c.title }}</b></div>
{% if c.meta %}<div class="meta">{{ c.meta }}</div>{% endif %}{% if c.truth %}<div>truth: {{ c.truth }}</div>{% endif %}
{% for p in c.preds %}<div class="{{ 'ok' if p.ok else ('bad' if loop.first and c.truth else '') }}">
{{ p.name }} {{ '%.2f' % p.prob }}
<span class="bar" style="width:{{ (p.prob*60)|int }}px"></span></div>{% endfor %}</div>{% endfor %}</div>{% endmacro %}
<!doctype html><html><head><meta charset="utf-8">
<title>{{ title }}</title><style>
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}pre{white-space:pre-wrap;overflow-wrap:anywhere}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f4f4f4}.grid{display:flex;flex-wrap:wrap;gap:10px}
.card{width:182px;box-sizing:border-box;border:1px solid #ddd;border-radius:6px;padding:6px;font-size:12px;
overflow:hidden;overflow-wrap:anywhere}
.card img{width:168px;height:168px;object-fit:cover;display:block}.ok{color:#1a7f37}.bad{color:#c62828}
.bar{background:#4c78a8;height:8px;display:inline-block}.meta{color:#555}
.pair{display:flex;gap:24px}.pair>div{flex:1;min-width:0}h3{font-size:14px}
.prov{font-size:12px;border:1px solid #ddd;border-radius:6px;padding:4px 10px;background:#fafafa}
.prov td{text-align:left;border:none;padding:1px 8px;overflow-wrap:anywhere}.note{color:#555;font-style:italic}
</style></head><body><h1>{{ title }}</h1>
{% if prov %}<details class="prov" open><summary>provenance</summary><table>
{% for k, v in prov %}<tr><td><b>{{ k }}</b></td><td>{{ v }}</td></tr>{% endfor %}</table></details>{% endif %}
{% for s in sections %}<h2>{{ s.title }}</h2>{% if s.note %}<p class="note">{{ s.note }}</p>{% endif %}
{% if s.table %}<table><tr>{% for h in s.table[0] %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in s.table[1:] %}<tr>{% for c in row %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}</table>{% endif %}
{% if s.image %}<img src="data:image/png;base64,{{ s.image }}" style="max-width:100%">{% endif %}
{% if s.cards %}{{ grid(s.cards) }}{% endif %}
{% if s.pair %}<div class="pair">{% for side in s.pair %}<div><h3>{{ side.label }}</h3>{{ grid(side.cards) }}</div>
{% endfor %}</div>{% endif %}
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


def provenance_rows(prov: dict | None) -> list[tuple[str, str]]:
    """The report header: what produced it (command, version, date, data, device, seed...)."""
    if not prov:
        return []
    rows = [("command", prov.get("command", "")),
            ("version", f"conceptlens {prov.get('conceptlens', '?')}" + (f" (git {prov['git'][:12]}"
                                                                         f"{' dirty' if prov['git'].endswith('-dirty') else ''})"
                                                                         if prov.get("git") else "")),
            ("date", prov.get("date", "")), ("torch / python", f"{prov.get('torch', '?')} / {prov.get('python', '?')}")]
    for d in prov.get("datasets", []):
        rows.append((f"data {d.get('name') or Path(str(d['spec'])).name}", f"{d['n_images']} images, "
                     + (f"{d['n_classes']} classes, " if d.get("n_classes") else "")
                     + (f"{d['n_pairs']} captions, " if d.get("n_pairs") else "") + str(d["spec"])
                                          + (f", limit {d['limit']}" if d.get("limit") else "")
                                          + f", identity {d['identity'][:12]}"))
    rows += [(k, str(v)) for k, v in prov.get("args", {}).items()]
    return rows


def write_html(path: Path, title: str, sections: list[dict], provenance: dict | None = None) -> Path:
    path = Path(path)
    atomic_write_bytes(path, PAGE.render(title=title, sections=sections, prov=provenance_rows(provenance)).encode())
    return path


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (scipy's binomtest): how far an accuracy on n images can be trusted."""
    from scipy.stats import binomtest
    if n == 0:
        return float("nan"), float("nan")
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def acc_text(acc: float, n: int) -> str:
    """`0.575 [0.42, 0.72]`: an accuracy with its 95 % Wilson interval."""
    lo, hi = wilson(round(acc * n), n)
    return f"{acc:.3f} [{lo:.3f}, {hi:.3f}]"


def stratified_positions(labels: np.ndarray, n: int) -> list[int]:
    """Up to `n` positions taken round-robin across classes (thumbnails that show every class, not one)."""
    labels = np.asarray(labels)
    groups = [list(np.nonzero(labels == c)[0]) for c in np.unique(labels)]
    out: list[int] = []
    while len(out) < n and any(groups):
        for g in groups:
            if g and len(out) < n:
                out.append(int(g.pop(0)))
    return sorted(out)


def prediction_cards(images, keys: Sequence[str], probs: np.ndarray, classnames: Sequence[str],
                     truths: Sequence[str | None]) -> list[dict]:
    """Thumbnails with their top-5 predictions (probabilities) and the true class."""
    cards = []
    for im, key, p, truth in zip(images, keys, probs, truths):
        top = np.argsort(-p)[:min(5, len(classnames))]
        cards.append({"thumb": thumb_b64(im), "title": key, "truth": truth,
                      "preds": [{"name": classnames[j], "prob": float(p[j]), "ok": classnames[j] == truth} for j in top]})
    return cards


def table_text(rows: list[list]) -> str:
    """A plain fixed-width table for the terminal."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def image_cards(images, titles: Sequence[str], meta: Sequence[str] | None = None) -> list[dict]:
    """Report cards (thumbnail + title + one line, e.g. rank, score and label) for a ranked image grid."""
    return [{"thumb": thumb_b64(im), "title": t, "meta": (meta[i] if meta else None), "preds": []}
            for i, (im, t) in enumerate(zip(images, titles)) if im is not None]


def bar_figure(labels: Sequence[str], values: Sequence[float], title: str = "", xlabel: str = "",
               legend: tuple[str, str] | None = None):
    """Horizontal bar chart, first on top; blue >= 0, red < 0 (`legend` names the two)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(labels) + 1))
    y = np.arange(len(labels))[::-1]
    ax.barh(y, values, color=["#4c78a8" if v >= 0 else "#e45756" for v in values])
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.axvline(0, color="#888", lw=0.8)
    if legend:
        from matplotlib.patches import Patch
        ax.legend(handles=[Patch(color="#4c78a8", label=legend[0]), Patch(color="#e45756", label=legend[1])],
                  fontsize=8, loc="lower right")
    return fig


def curve_figure(steps: Sequence[float], panels: dict[str, Sequence[float]], smooth: int = 50, log: Sequence[str] = ()):
    """One panel per series against the step (e.g. loss, learning rate): raw values light, their `smooth`-step
    moving average dark; series named in `log` on a log scale."""
    plt = _plt()
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.4 * len(panels)), sharex=True, squeeze=False)
    x = np.asarray(steps, float)
    for ax, (name, ys) in zip(axes[:, 0], panels.items()):
        y = np.asarray(ys, float)
        ax.plot(x, y, color="#9ecae9", lw=0.8, label="per step")
        w = min(smooth, len(y) // 5)
        if w > 1:
            avg = np.convolve(y, np.ones(w) / w, mode="valid")
            ax.plot(x[w - 1:], avg, color="#1f4e79", lw=1.6, label=f"{w}-step mean")
            ax.legend(fontsize=8, loc="upper right")
        if name in log and (y > 0).all():
            from matplotlib.ticker import FuncFormatter
            ax.set_yscale("log")
            for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):  # plain numbers, no mathtext
                axis(FuncFormatter(lambda v, _: f"{v:.3g}"))
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    return fig


def heatmap_figure(matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], title: str = "", cbar: str = ""):
    """A rows x columns heat map on one diverging scale with a colour bar (e.g. class x concept weights)."""
    plt = _plt()
    m = np.asarray(matrix, float)
    lim = float(np.abs(m).max()) or 1.0
    fig, ax = plt.subplots(figsize=(max(5, 0.28 * len(cols) + 3), max(3, 0.32 * len(rows) + 1.5)))
    im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=cbar, shrink=0.8)
    return fig


def results_table(paths: Sequence[str | Path]) -> list[list]:
    """One table across result files, like `clip_benchmark build`: a row per result (a file may hold several,
    e.g. the demo's), columns dataset, model, pretrained, task, then every metric any of them reports."""
    import json
    from ..errors import ConceptlensError
    from ..io import read_text
    found: list[tuple[str, dict]] = []
    for p in paths:
        try:
            obj = json.loads(read_text(p))
        except json.JSONDecodeError as exc:
            raise ConceptlensError(f"{p} is not JSON: {exc.msg} (line {exc.lineno})") from None
        items = [obj] if isinstance(obj, dict) and "metrics" in obj else \
            [v for v in obj.values() if isinstance(v, dict) and "metrics" in v] if isinstance(obj, dict) else []
        if not items:
            raise ConceptlensError(f"{p} holds no results (no 'metrics'): give results JSON written by --output")
        found += [(str(p), r) for r in items]
    metrics = list(dict.fromkeys(k for _, r in found for k, v in r["metrics"].items()
                                 if isinstance(v, (int, float)) or v is None))
    rows: list[list] = [["dataset", "model", "pretrained", "task", *metrics, "file"]]
    for p, r in found:
        rows.append([r.get("dataset", ""), r.get("model", ""), r.get("pretrained", ""), r.get("task", ""),
                     *(_cell(r["metrics"].get(m)) for m in metrics), p])
    return rows


def _cell(v) -> str:
    if v is None:
        return ""
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def format_table(rows: list[list], fmt: str) -> str:
    """`rows` as markdown, CSV or the terminal's fixed-width text."""
    if fmt == "csv":
        import csv
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        return buf.getvalue()
    if fmt == "markdown":
        esc = [[str(c).replace("|", "\\|") for c in r] for r in rows]
        return "\n".join(["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(esc[0])] +
                         ["| " + " | ".join(r) + " |" for r in esc[1:]]) + "\n"
    return table_text(rows) + "\n"
