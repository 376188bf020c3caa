"""One self-contained HTML page: metrics tables with the report's figures embedded as base64 PNGs."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from genailab.safe_write import write_text

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
h3 { font-size: 1em; color: #444; }
table { border-collapse: collapse; font-size: 0.92em; margin-bottom: 0.8em; }
td, th { border: 1px solid #ccc; padding: 3px 10px; text-align: left; }
td.value { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) { background: #f6f6f6; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
"""


@dataclass
class Section:
    """A heading, its metrics (nested dicts and lists of records allowed) and (PNG, caption) figures."""

    heading: str
    metrics: Mapping | Sequence[Mapping]
    figures: list[tuple[Path, str]] = field(default_factory=list)


def _format(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format(v) for v in value) or "none"
    return str(value)


def _cell(value: object) -> str:
    return f"<td class='value'>{html.escape(_format(value))}</td>"


def _is_records(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(r, Mapping) for r in value)


def _records_table(records: Sequence[Mapping]) -> str:
    """One row per record, one column per field (e.g. the latent-dimension sweep)."""
    columns = list(dict.fromkeys(k for r in records for k in r))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(r.get(c)) for c in columns) + "</tr>" for r in records)
    return f"<table><tr>{head}</tr>{body}</table>"


def _metrics_table(metrics: Mapping) -> str:
    """Scalars as a two-column table; a dict of dicts (e.g. per condition) as a metrics x groups
    table under its own title; other nested dicts recursively."""
    scalars = [(k, v) for k, v in metrics.items() if not isinstance(v, Mapping) and not _is_records(v)]
    parts = []
    if scalars:
        rows = "".join(f"<tr><td>{html.escape(str(k))}</td>{_cell(v)}</tr>" for k, v in scalars)
        parts.append(f"<table><tr><th>metric</th><th>value</th></tr>{rows}</table>")
    for key, value in metrics.items():
        if _is_records(value):
            parts.append(f"<h3>{html.escape(str(key))}</h3>{_records_table(value)}")
        elif isinstance(value, Mapping) and value and all(isinstance(v, Mapping) for v in value.values()):
            records = [{"": name, **group} for name, group in value.items()]
            parts.append(f"<h3>{html.escape(str(key))}</h3>{_records_table(records)}")
        elif isinstance(value, Mapping):
            parts.append(f"<h3>{html.escape(str(key))}</h3>{_metrics_table(value)}")
    return "".join(parts)


def _figure(png: Path, caption: str) -> str:
    data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
    return (
        f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
        f"<figcaption>{html.escape(caption)} ({html.escape(Path(png).name)})</figcaption></figure>"
    )


def render_page(title: str, sections: Sequence[Section], path: str | Path) -> Path:
    """Write ``path``: for each section its heading, tables and figures; nothing is linked externally."""
    parts = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
    ]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.heading)}</h2>")
        metrics = section.metrics
        parts.append(_records_table(metrics) if isinstance(metrics, list) else _metrics_table(metrics))
        parts.extend(_figure(png, caption) for png, caption in section.figures)
    parts.append("</body></html>")
    return write_text(path, "\n".join(parts))
