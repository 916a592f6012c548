"""What the ``fedhelix`` commands print: styled, but never read as rich markup.

Rich takes ``[word]`` for a style tag and drops it, so a contract fix naming
``[data.categories]``, a ``[privacy]`` section, a path or a Flower log line with
brackets would reach the user with holes in it. These consoles print text as
written; colour comes only from :func:`tagged`, around a tag we chose.
"""

from __future__ import annotations

from rich.console import Console
from rich.text import Text


def plain_console(*, stderr: bool = False) -> Console:
    """A console that prints every string as written (no markup; tables and titles too)."""
    return Console(stderr=stderr, markup=False, highlight=False, soft_wrap=True)  # one line stays one line (the terminal wraps it), piped or not


def tagged(tag: str, style: str, text: str) -> Text:
    """``tag`` in ``style`` (e.g. "OK" in green), a space, then ``text`` exactly as given."""
    return Text.assemble((tag, style), " ", text)
