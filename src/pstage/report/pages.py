"""Self-contained HTML pages (EDA, run report): figures and image grids embedded as base64 PNG/JPEG.

No CDN, no scripts: one file that opens offline on a laptop. matplotlib draws the plots (Agg
backend, no display needed).
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pstage.core.io import write_text

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;padding:1rem 1.5rem;max-width:1200px;color:#222}
h1{margin-bottom:.2rem}h2{margin-top:2rem;border-bottom:2px solid #eee;padding-bottom:.2rem}
nav a{margin-right:.8rem}.muted{color:#666}
table{border-collapse:collapse;font-variant-numeric:tabular-nums;margin:.5rem 0}
th,td{padding:.25rem .55rem;border-bottom:1px solid #e4e4e4;text-align:right}
th{background:#f5f5f5}td.l,th.l{text-align:left}
img.fig{max-width:100%;height:auto}
.grid{display:flex;flex-wrap:wrap;gap:.6rem}
.tile{width:150px;font-size:12px;text-align:center;overflow-wrap:anywhere}
.tile img{width:150px;height:auto;image-rendering:pixelated;border:1px solid #ccc}
.row{display:flex;align-items:center;gap:.4rem;margin:.2rem 0}.row span{width:170px;font-size:12px}
.row img{height:64px;width:auto;image-rendering:pixelated;border:1px solid #ccc}
.warn{color:#a40}
"""


def figure(fig: Any, alt: str) -> str:
    """A matplotlib figure as an embedded PNG (and closed, so pages of many plots stay light)."""
    import matplotlib.pyplot as plt  # deferred: pyplot only after new_figure has picked the off-screen Agg backend

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode()
    return f"<img class='fig' alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"


def new_figure(width: float = 6.0, height: float = 3.5, ncols: int = 1) -> tuple[Any, Any]:
    """A matplotlib figure and its axes, drawn off-screen (Agg)."""
    import matplotlib  # deferred: the backend is picked per figure, not for whoever imports this module

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # deferred: pyplot only after the Agg backend is picked (the line above)

    return plt.subplots(1, ncols, figsize=(width, height))


def image_tag(image: np.ndarray, alt: str, max_side: int = 192) -> str:
    """An RGB uint8 image as an embedded JPEG, shrunk to ``max_side``."""
    height, width = image.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    if scale < 1:
        image = cv2.resize(image, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(
        ".jpg", cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 88]
    )
    assert ok  # encoding a valid uint8 array cannot fail
    return f"<img alt='{html.escape(alt)}' src='data:image/jpeg;base64,{base64.b64encode(data.tobytes()).decode()}'>"


def tiles(items: Sequence[tuple[np.ndarray, str]]) -> str:
    """A grid of images with captions (caption text is escaped; line breaks kept)."""
    cells = "".join(
        f"<div class='tile'>{image_tag(image, caption.splitlines()[0] if caption else 'image')}"
        f"<div>{'<br>'.join(html.escape(line) for line in caption.splitlines())}</div></div>"
        for image, caption in items
    )
    return f"<div class='grid'>{cells}</div>"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    """A plain HTML table; the first ``left`` columns are left-aligned (names), the rest numbers."""

    def cell(value: Any, i: int, tag: str) -> str:
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        return f"<{tag}{' class=l' if i < left else ''}>{html.escape(text)}</{tag}>"

    head = "".join(cell(h, i, "th") for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(cell(v, i, "td") for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def page(title: str, subtitle: str, sections: Sequence[tuple[str, str, str]], path: str | Path) -> Path:
    """Write sections (anchor, heading, html) as one page with a table of contents; atomic."""
    nav = "".join(f"<a href='#{anchor}'>{html.escape(heading)}</a>" for anchor, heading, _ in sections)
    body = "".join(
        f"<section id='{anchor}'><h2>{html.escape(heading)}</h2>{content}</section>"
        for anchor, heading, content in sections
    )
    text = (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<meta name='viewport' content='width=device-width,initial-scale=1'><style>{CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p class='muted'>{html.escape(subtitle)} · generated {dt.datetime.now():%Y-%m-%d %H:%M}</p>"
        f"<nav>{nav}</nav>{body}</body></html>\n"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, text)
    return path
