"""Evaluation reports: metrics.json, PNG figures and one self-contained HTML page per model.

>>> from genailab.report import write_report
>>> write_report(model, adata, "reports/nb", label_key="cell_type", batch_key="batch")  # doctest: +SKIP
"""

from __future__ import annotations

from genailab.report.evaluate import write_report

__all__ = ["write_report"]
