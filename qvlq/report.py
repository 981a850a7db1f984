"""Shared report rendering: tables described once (`TableSpec`) and rendered as rich tables, markdown
and a rich-recorded SVG. Used by `qvlq profile` and `qvlq compare`."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class TableSpec:
    title: str
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""


def render_rich(tables: Sequence[TableSpec]) -> list[Any]:
    """Rich tables; cells and titles are plain text (a "[w4t1]" in a cell is shown, not read as markup)."""
    from rich.table import Table
    from rich.text import Text

    out = []
    for t in tables:
        rt = Table(title=Text(t.title), caption=Text(t.caption) if t.caption else None, header_style="bold")
        for c in t.columns:
            rt.add_column(Text(c), overflow="fold")
        for r in t.rows:
            rt.add_row(*(Text(x) for x in r))
        out.append(rt)
    return out


def md_escape(x: str) -> str:
    return x.replace("|", "\\|").replace("\n", " ")


def markdown_tables(tables: Sequence[TableSpec]) -> list[str]:
    """Markdown lines: one `## title` section (table, then caption) per table."""
    lines: list[str] = []
    for t in tables:
        lines += [f"## {t.title}", ""]
        lines.append("| " + " | ".join(md_escape(c) or " " for c in t.columns) + " |")
        lines.append("|" + "---|" * len(t.columns))
        lines += ["| " + " | ".join(md_escape(x) for x in r) + " |" for r in t.rows]
        if t.caption:
            lines += ["", t.caption]
        lines.append("")
    return lines


def save_tables_svg(
    path: str | os.PathLike, tables: Sequence[TableSpec], notes: Sequence[str] = (), title: str = "qvlq"
) -> None:
    """The notes and tables as the terminal shows them, recorded to an SVG (written atomically)."""
    from rich.console import Console

    from .io import atomic_write_text

    con = Console(record=True, width=220, file=io.StringIO())
    for n in notes:
        con.print(n, highlight=False, markup=False)
    for t in render_rich(tables):
        con.print(t)
    atomic_write_text(path, con.export_svg(title=title))


__all__ = ["TableSpec", "markdown_tables", "md_escape", "render_rich", "save_tables_svg"]
