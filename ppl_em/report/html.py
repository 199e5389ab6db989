"""The report page: one self-contained HTML file with inline CSS and base64 PNG figures."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

# Sampler-health thresholds the page flags, following Vehtari et al. (2021).
R_HAT_MAX = 1.01
ESS_PER_CHAIN_MIN = 100

CSS = """
:root { --ink:#1d2330; --muted:#5b6474; --line:#e3e7ee; --ok:#1a7f37; --bad:#c62828;
        --warn:#b26a00; --bg:#f6f8fb; --accent:#2f5fa7; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
       color:var(--ink); background:var(--bg); }
header { background:linear-gradient(120deg,#23395d,#2f5fa7); color:#fff; padding:28px 40px; }
header h1 { margin:0 0 4px; font-size:26px; font-weight:650; }
header p { margin:0; opacity:.85; }
main { max-width:1120px; margin:0 auto; padding:24px 32px 60px; }
section { background:#fff; border:1px solid var(--line); border-radius:10px;
          padding:18px 24px; margin:18px 0; }
h2 { font-size:19px; margin:0 0 10px; color:var(--accent); }
.cards { display:grid; grid-template-columns:repeat(auto-fit,minmax(230px,1fr)); gap:14px; }
.card { border:1px solid var(--line); border-radius:8px; padding:12px 14px; background:#fbfcfe; }
.card h3 { margin:0 0 4px; font-size:13px; text-transform:uppercase; letter-spacing:.04em;
           color:var(--muted); }
.card .big { font-size:20px; font-weight:600; }
.ok { color:var(--ok); } .bad { color:var(--bad); font-weight:600; } .warn { color:var(--warn); }
figure { margin:8px 0 4px; text-align:center; }
figure img { max-width:100%; height:auto; }
figcaption { color:var(--muted); font-size:13.5px; margin-top:4px; text-align:left; }
table { border-collapse:collapse; width:100%; font-size:13.5px;
        font-variant-numeric:tabular-nums; }
th, td { padding:5px 8px; border-bottom:1px solid var(--line); text-align:right; }
th { background:#f0f3f8; font-weight:600; } td:first-child, th:first-child { text-align:left; }
tr:hover td { background:#f7f9fc; }
#diagnostics-table td:last-child { text-align:left; }
ul.notes li { margin:4px 0; }
.muted { color:var(--muted); font-size:13px; }
"""


def figure_to_img(fig: Figure, alt: str) -> str:
    """An ``<img>`` tag holding the figure as a base64 PNG (no external files)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight", facecolor="white")
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def figure_block(fig: Figure | None, alt: str, caption: str) -> str:
    img = figure_to_img(fig, alt) if fig is not None else ""
    return f"<figure>{img}<figcaption>{html.escape(caption)}</figcaption></figure>"


def section(title: str, body: str, anchor: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{body}</section>'


def fmt(value) -> str:
    """Numbers to 4 significant digits; everything else as text."""
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return "–" if not np.isfinite(value) else f"{float(value):.4g}"
    return html.escape(str(value))


def _cell_class(column: str, value, min_ess: float) -> str:
    flagged = {
        "em_in_hdi": isinstance(value, bool | np.bool_) and not value,
        "r_hat": isinstance(value, float | np.floating) and value > R_HAT_MAX,
        "ess_bulk": isinstance(value, float | np.floating) and value < min_ess,
        "z_score": isinstance(value, float | np.floating) and abs(value) > 3,
    }
    return ' class="bad"' if flagged.get(column, False) else ""


def table_html(table: pd.DataFrame, n_chains: int) -> str:
    """The comparison table, flagging EM outside the HDI, high r_hat and low ESS in red."""
    min_ess = ESS_PER_CHAIN_MIN * n_chains
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in ["parameter", *table.columns])
    rows = []
    for label, row in table.iterrows():
        cells = "".join(
            f"<td{_cell_class(c, row[c], min_ess)}>{fmt(row[c])}</td>" for c in table.columns
        )
        rows.append(f"<tr><td>{html.escape(str(label))}</td>{cells}</tr>")
    return f'<table id="comparison-table"><tr>{head}</tr>{"".join(rows)}</table>'


def key_value_table(pairs: Iterable[tuple[str, object]], table_id: str) -> str:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{fmt(v)}</td></tr>" for k, v in pairs)
    return f'<table id="{table_id}">{rows}</table>'


def card(title: str, big: str, detail: str, status: str = "") -> str:
    cls = f' class="big {status}"' if status else ' class="big"'
    return (
        f'<div class="card"><h3>{html.escape(title)}</h3><div{cls}>{html.escape(big)}</div>'
        f'<div class="muted">{html.escape(detail)}</div></div>'
    )


def notes_html(notes: list[str]) -> str:
    if not notes:
        return '<p class="ok">No warnings were raised.</p>'
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return f'<ul class="notes">{items}</ul>'


def page(title: str, subtitle: str, sections: list[str]) -> str:
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p></header>"
        f"<main>{''.join(sections)}</main></body></html>"
    )
