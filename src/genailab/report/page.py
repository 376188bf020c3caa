"""One self-contained HTML page: metrics tables with the report's figures embedded as base64 PNGs.

Each metric can carry a one-line explanation (range, which direction is better) and each section a
line saying which cells it was computed on; classifier AUCs below 0.5 are flagged.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

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
td.note, ul.notes, p.cells { color: #555; font-size: 0.9em; } ul.notes { margin-top: 0; }
td.flag { background: #fde2e1; color: #a00; font-weight: bold; }
"""
AUC_FLAG = "below 0.5: worse than chance, something is off"
_NO_NOTES: Mapping[str, str] = MappingProxyType({})


@dataclass
class Section:
    """A heading, its metrics (nested dicts and lists of records allowed) and (PNG, caption) figures.

    ``notes`` maps a metric name to its one-line explanation (used at every nesting level);
    ``cells`` says which cells the section was computed on.
    """

    heading: str
    metrics: Mapping | Sequence[Mapping]
    figures: list[tuple[Path, str]] = field(default_factory=list)
    notes: Mapping[str, str] = field(default_factory=dict)
    cells: str | None = None


def _format(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format(v) for v in value) or "none"
    return str(value)


def _is_low_auc(key: object, value: object) -> bool:
    """A classifier AUC below 0.5: a cross-validated classifier that does worse than chance."""
    return str(key).endswith("auc") and isinstance(value, (int, float)) and not math.isnan(value) and value < 0.5


def _cell(value: object, key: object = "") -> str:
    if _is_low_auc(key, value):
        return f"<td class='value flag' title='{AUC_FLAG}'>{html.escape(_format(value))} ({AUC_FLAG})</td>"
    return f"<td class='value'>{html.escape(_format(value))}</td>"


def _legend(columns: Sequence, notes: Mapping[str, str]) -> str:
    items = "".join(
        f"<li><b>{html.escape(str(c))}</b>: {html.escape(notes[c])}</li>" for c in columns if c in notes
    )
    return f"<ul class='notes'>{items}</ul>" if items else ""


def _is_records(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(r, Mapping) for r in value)


def _records_table(records: Sequence[Mapping], notes: Mapping[str, str] = _NO_NOTES) -> str:
    """One row per record, one column per field (e.g. the latent-dimension sweep), then a legend of
    the columns that have notes."""
    columns = list(dict.fromkeys(k for r in records for k in r))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(r.get(c), c) for c in columns) + "</tr>" for r in records)
    return f"<table><tr>{head}</tr>{body}</table>{_legend(columns, notes)}"


def _metrics_table(metrics: Mapping, notes: Mapping[str, str] = _NO_NOTES) -> str:
    """Scalars as a metric | value | meaning table (meaning only when a scalar has a note); a dict of
    dicts (e.g. per condition) as a groups x metrics table under its own title; other nested dicts
    recursively."""
    scalars = [(k, v) for k, v in metrics.items() if not isinstance(v, Mapping) and not _is_records(v)]
    parts = []
    if scalars:
        explained = any(k in notes for k, _ in scalars)
        rows = "".join(
            f"<tr><td>{html.escape(str(k))}</td>{_cell(v, k)}"
            + (f"<td class='note'>{html.escape(notes.get(k, ''))}</td>" if explained else "")
            + "</tr>"
            for k, v in scalars
        )
        meaning = "<th>meaning</th>" if explained else ""
        parts.append(f"<table><tr><th>metric</th><th>value</th>{meaning}</tr>{rows}</table>")
    for key, value in metrics.items():
        if _is_records(value):
            parts.append(f"<h3>{html.escape(str(key))}</h3>{_records_table(value, notes)}")
        elif isinstance(value, Mapping) and value and all(isinstance(v, Mapping) for v in value.values()):
            records = [{"": name, **group} for name, group in value.items()]
            parts.append(f"<h3>{html.escape(str(key))}</h3>{_records_table(records, notes)}")
        elif isinstance(value, Mapping):
            parts.append(f"<h3>{html.escape(str(key))}</h3>{_metrics_table(value, notes)}")
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
        if section.cells:
            parts.append(f"<p class='cells'>Computed on: {html.escape(section.cells)}</p>")
        metrics, notes = section.metrics, section.notes
        parts.append(_records_table(metrics, notes) if isinstance(metrics, list) else _metrics_table(metrics, notes))
        parts.extend(_figure(png, caption) for png, caption in section.figures)
    parts.append("</body></html>")
    return write_text(path, "\n".join(parts))
