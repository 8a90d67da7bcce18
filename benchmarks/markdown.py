"""Markdown tables, as the benchmark runners print them for docs/benchmarks.md (row by row, as measured)."""

from __future__ import annotations


def markdown_header(columns: list[str]) -> str:
    """A table's header line and the separator line under it."""
    return "| " + " | ".join(columns) + " |\n" + "|" + "---|" * len(columns)


def markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"
