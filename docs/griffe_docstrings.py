"""Griffe extension for the API pages: read datafree's docstrings the way they are written.

The docstrings follow Google style with two habits that Google style as parsed by griffe does not
know:

- ``Example:`` (singular) heads the ``>>>`` doctests; griffe only reads ``Examples:`` as an
  examples section and would render the doctests as Markdown prose (``>>>`` as nested quotes).
- Sphinx roles such as :class:`Teacher` or :func:`~datafree.condense.condenser.condense`, which
  Markdown shows literally; they become code spans (``Teacher``, ``condense``).

Only the text handed to the docstring parser changes; the source files are not touched.
"""
from __future__ import annotations

import re

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:(\s*)$", re.MULTILINE)
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|obj|exc|const):`(~?)([^`]+)`")


def _role(match: re.Match) -> str:
    short, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


def rewrite(text: str) -> str:
    """The docstring text with ``Example:`` read as ``Examples:`` and Sphinx roles as code spans.

    Examples:
        >>> rewrite("Use :class:`~a.b.Teacher`.\\n\\nExample:\\n    >>> 1\\n    1")
        'Use `Teacher`.\\n\\nExamples:\\n    >>> 1\\n    1'
    """
    return _ROLE.sub(_role, _EXAMPLE.sub(r"\1Examples:\2", text))


class DatafreeDocstrings(griffe.Extension):
    """Rewrite every docstring as :func:`rewrite` says before it is parsed."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:  # noqa: ARG002
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
