"""Self-contained HTML report of an EM / find_MAP / NUTS comparison (``write_report``)."""

from ppl_em.report.writer import render_html, write_report

__all__ = ["render_html", "write_report"]
