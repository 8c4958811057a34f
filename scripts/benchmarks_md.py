"""Writing a benchmark script's table into BENCHMARKS.md between its markers.

A table lives between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``. A later run replaces it in
place; a new one goes at the end of the section ``## HEADING`` (before the next ``## `` heading), so
the file keeps one section per subject instead of growing duplicate headings at its end.

Example:
    >>> text = "# B\\n\\n## Condensation\\n\\nold notes\\n\\n## int8\\n"
    >>> print(with_block(text, "c-15m", "| a |", "Condensation"))
    # B
    <BLANKLINE>
    ## Condensation
    <BLANKLINE>
    old notes
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
    """``text`` with the block ``name`` set to ``table`` (replaced, or added to the section ``heading``)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{table}\n{end}"
    if start in text and end in text:
        return text[: text.index(start)] + block + text[text.index(end) + len(end):]
    title = f"## {heading}\n"
    if title not in text:
        return text.rstrip("\n") + f"\n\n{title}\n{block}\n"
    after = text.index(title) + len(title)
    following = text.find("\n## ", after)
    if following < 0:
        return text.rstrip("\n") + f"\n\n{block}\n"
    return text[:following].rstrip("\n") + f"\n\n{block}\n\n" + text[following + 1:]


def write_block(name: str, table: str, heading: str, path: Path = BENCHMARKS_MD) -> None:
    """Set the block ``name`` of ``path`` (BENCHMARKS.md) to ``table``."""
    path.write_text(with_block(path.read_text(), name, table, heading))
