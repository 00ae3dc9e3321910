"""The printed report: one small table per scenario, every cell a median over rounds with its spread.

A ``Section`` has a column per variant (relayd/memory, baseline, node, ...)
and a column per ratio (e.g. relayd/node). A number cell reads
``median [min-max]`` over the rounds; a ratio cell is the median of the
per-round ratios, so a ratio never mixes rounds. Text cells (e.g. which side
was the bottleneck) show the most common value and how often it occurred.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

from measure import Rounds, paired_ratios, summary


def fmt_num(v: float | None, digits: int = 1) -> str:
    if v is None:
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def fmt_summary(values: list[Any], digits: int = 1) -> str:
    s = summary(values)
    if s is None:
        texts = [v for v in values if isinstance(v, str)]
        if texts:
            value, count = Counter(texts).most_common(1)[0]
            return value if count == len(values) else f"{value} ({count}/{len(values)})"
        return "-"
    med, lo, hi, n = s
    cell = fmt_num(med, digits)
    if n > 1:
        cell += f" [{fmt_num(lo, digits)}-{fmt_num(hi, digits)}]"
    if n < len(values):
        cell += f" ({n}/{len(values)})"
    return cell


class Section:
    """One scenario's table."""

    def __init__(self, title: str, columns: list[str], ratios: list[tuple[str, str]], absent: dict[str, str]) -> None:
        self.title = title
        self.columns = columns
        self.ratios = [r for r in ratios if r[0] in columns and r[1] in columns]
        self.absent = absent  # column -> what to print when it was not measured (e.g. "not measured")
        self.rows: list[tuple[str, list[str], list[str], str]] = []
        self.notes: list[str] = []
        self.raw: dict[str, dict[str, list[Any]]] = {}

    def row(self, metric: str, values: dict[str, list[Any]], *, digits: int = 1, note: str = "",
            ratios: bool = True, verdict: Callable[[dict[str, list[Any]]], str] | None = None) -> None:
        """Add a row from per-round values per column; ``verdict`` gets those values and returns a note."""
        cells = []
        for c in self.columns:
            if c in self.absent and not values.get(c):
                cells.append(self.absent[c])
            else:
                cells.append(fmt_summary(values.get(c, []), digits))
        rcells = []
        for a, b in self.ratios:
            rs = paired_ratios(values.get(a, []), values.get(b, [])) if ratios else []
            rcells.append(fmt_summary(rs, 2) if rs else "")
        if verdict is not None:
            extra = verdict(values)
            note = f"{note}; {extra}" if note and extra else (note or extra)
        self.raw[metric] = {c: values.get(c, []) for c in self.columns}
        self.rows.append((metric, cells, rcells, note))

    def rounds_row(self, metric: str, rounds: Rounds, key: str | Callable[[dict[str, Any]], Any], **kw: Any) -> None:
        """A row whose per-round values come from each run's figures (``key`` or a function of them)."""
        values = {}
        for label in rounds.labels:
            vals = []
            for r in rounds.runs.get(label, []):
                if not isinstance(r, dict):
                    vals.append(r)
                    continue
                try:
                    vals.append(key(r) if callable(key) else r.get(key))
                except (KeyError, TypeError, ZeroDivisionError):
                    vals.append(None)
            values[label] = vals
        self.row(metric, values, **kw)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def render(self) -> str:
        short = lambda label: label.removeprefix("relayd/")  # noqa: E731
        head = ["metric"] + self.columns + [f"{short(a)}/{short(b)}" for a, b in self.ratios] + ["notes"]
        body = [[m] + cells + rcells + [note] for m, cells, rcells, note in self.rows]
        widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head) - 1)]
        lines = [self.title]

        def line(cells: list[str]) -> str:
            parts = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:-1], widths[1:])]
            return ("  " + "  ".join(parts) + ("  " + cells[-1] if cells[-1] else "")).rstrip()

        lines.append(line(head))
        for r in body:
            lines.append(line(r))
        for n in self.notes:
            lines.append("  * " + n)
        return "\n".join(lines)


class Report:
    def __init__(self) -> None:
        self.sections: list[Section] = []
        self.raw: dict[str, Any] = {}
        self.problems: list[str] = []

    def section(self, title: str, columns: list[str], ratios: list[tuple[str, str]] | None = None,
                absent: dict[str, str] | None = None) -> Section:
        s = Section(title, columns, ratios or [], absent or {})
        self.sections.append(s)
        return s

    def render(self) -> str:
        return "\n\n".join(s.render() for s in self.sections)

    def table(self) -> list[dict[str, Any]]:
        """Every row as data, for --json."""
        out = []
        for s in self.sections:
            for metric, cells, rcells, note in s.rows:
                out.append({"section": s.title, "metric": metric, "cells": dict(zip(s.columns, cells)),
                            "ratios": {f"{a} / {b}": c for (a, b), c in zip(s.ratios, rcells)}, "note": note,
                            "values": s.raw.get(metric, {})})
        return out
