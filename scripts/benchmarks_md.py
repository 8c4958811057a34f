"""Writing a benchmark script's table into BENCHMARKS.md between its markers.

A table lives between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``. A later run replaces it in
place; a new one goes at the end of the section titled ``HEADING`` (at any heading level, before the
next heading of the same or a higher level), so the file keeps one section per subject instead of
growing duplicate headings at its end.

Example:
    >>> text = "# B\\n\\n## Condensation\\n\\nold notes\\n\\n### an entry\\n\\n## int8\\n"
    >>> print(with_block(text, "c-15m", "| a |", "Condensation"))
    # B
    <BLANKLINE>
    ## Condensation
    <BLANKLINE>
    old notes
    <BLANKLINE>
    ### an entry
    <BLANKLINE>
    <!-- c-15m:start -->
    | a |
    <!-- c-15m:end -->
    <BLANKLINE>
    ## int8
    <BLANKLINE>
"""
from __future__ import annotations

from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def with_block(text: str, name: str, table: str, heading: str) -> str:
    """``text`` with the block ``name`` set to ``table`` (replaced, or added to the section ``heading``,
    a heading line of any level whose title is exactly ``heading``)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{table}\n{end}"
    if start in text and end in text:
        return text[: text.index(start)] + block + text[text.index(end) + len(end):]
    lines = text.split("\n")
    found = next((i for i, line in enumerate(lines) if line.lstrip("#").strip() == heading and line.startswith("#")), None)
    if found is None:
        return text.rstrip("\n") + f"\n\n## {heading}\n\n{block}\n"
    level = len(lines[found]) - len(lines[found].lstrip("#"))
    following = next((i for i in range(found + 1, len(lines)) if lines[i].startswith("#")
                      and len(lines[i]) - len(lines[i].lstrip("#")) <= level and lines[i].lstrip("#").startswith(" ")), None)
    if following is None:
        return text.rstrip("\n") + f"\n\n{block}\n"
    before = "\n".join(lines[:following]).rstrip("\n")
    return before + f"\n\n{block}\n\n" + "\n".join(lines[following:])


def write_block(name: str, table: str, heading: str, path: Path = BENCHMARKS_MD) -> None:
    """Set the block ``name`` of ``path`` (BENCHMARKS.md) to ``table``."""
    path.write_text(with_block(path.read_text(), name, table, heading))
