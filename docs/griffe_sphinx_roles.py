"""Griffe extension for the API reference: render medkt's reST habits in Markdown.

medkt's docstrings are read with ``help()`` and IDEs as they are, and use two reST habits that
Markdown lacks:

* Sphinx roles (``:func:`invert```, ``:class:`~a.B```): each becomes a code span of the name (the
  last component for ``~`` names), as Sphinx displays it;
* a paragraph ending in ``::`` introduces an indented literal block: Sphinx shows ``:`` (the
  indented block is already a Markdown code block).
"""
from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|const|type):`(~?)([^`]+)`")
LITERAL = re.compile(r"(?<=\S)::[ \t]*$", re.M)


def render_roles(text: str) -> str:
    """``:func:`~medkt.api.invert``` -> ```invert```; ``:class:`medkt.Concept``` -> ```medkt.Concept```;
    ``Example::`` at a line end -> ``Example:``."""
    text = ROLE.sub(lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", text)
    return LITERAL.sub(":", text)


class SphinxRoles(Extension):
    """Rewrite the roles of every docstring griffe loads."""

    def on_instance(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = render_roles(obj.docstring.value)
