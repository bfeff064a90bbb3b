"""Griffe extension of the documentation build: read the package's docstrings as written.

The docstrings are Google style with a few reST habits that Python's ``help`` and LightningCLI
print as they are, but that Markdown would garble on the site:

- an ``Example:`` section (griffe's Google parser knows only ``Examples:``) holding doctests,
  whose outputs (``[None, None]``) Markdown would read as reference links;
- Sphinx roles, ``:class:`~lightning_stability.StabilityMonitor``` → ```StabilityMonitor```;
- reST literal-block markers, ``Usage::`` → ``Usage:``;
- the ``Args:`` of the callbacks, plain text on purpose (LightningCLI prints them), where
  ``[model.h.*]`` or ``<name>`` would be read as Markdown or HTML: escaped there.

Loaded by ``mkdocs.yml`` (``mkdocstrings`` → ``extensions``); nothing in the package depends on it.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.M)
_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj|py:\w+):`(~?)([^`<]+?)(?:\s*<([^>]+)>)?`")
_LITERAL = re.compile(r"(\S)::[ \t]*$", re.M)
_BARE_LITERAL = re.compile(r"^[ \t]*::[ \t]*\n?", re.M)
_PLAIN = "(The Args below are plain text"
_SECTION = re.compile(r"^\s*(Args|Attributes|Returns|Raises|Examples?):\s*$")
_SPECIAL = re.compile(r"([*\[\]<>])")


def _role(match: re.Match[str]) -> str:
    tilde, text, target = match.group(1), match.group(2).strip(), match.group(3)
    if target is None and tilde:
        text = text.rsplit(".", 1)[-1]
    return f"`{text}`"


def markdown_docstring(text: str) -> str:
    """The docstring ``text`` with the reST habits above turned into what Markdown renders.

    Args:
        text: a docstring as written in the source.

    Returns:
        The same docstring for the site.

    Examples:
        >>> markdown_docstring("See :class:`~a.b.C` and :func:`f`.\\n\\nExample:\\n    >>> 1\\n    1")
        'See `C` and `f`.\\n\\nExamples:\\n    >>> 1\\n    1'
        >>> markdown_docstring("Usage::\\n\\n    run()")
        'Usage:\\n\\n    run()'
    """
    if _PLAIN in text:
        text = _escape_args(text)
    text = _EXAMPLE.sub(r"\1Examples:", text)
    text = _ROLE.sub(_role, text)
    text = _BARE_LITERAL.sub("", text)
    return _LITERAL.sub(r"\1:", text)


def _escape_args(text: str) -> str:
    """Escape Markdown/HTML characters in the lines of an ``Args:`` section."""
    out, in_args = [], False
    for line in text.split("\n"):
        section = _SECTION.match(line)
        if section:
            in_args = section.group(1) == "Args"
        elif in_args:
            line = _SPECIAL.sub(r"\\\1", line)
        out.append(line)
    return "\n".join(out)


class MarkdownDocstrings(Extension):
    """Rewrite every docstring with :func:`markdown_docstring` as griffe loads it."""

    def on_instance(self, *, obj: Object, **kwargs: Any) -> None:
        """Called for every object griffe builds (module, class, function, attribute)."""
        if obj.docstring is not None:
            obj.docstring.value = markdown_docstring(obj.docstring.value)
