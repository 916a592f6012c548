"""Errors that end in one readable line naming where the problem is and what to do.

Every error a user can cause (a bad study file, a bad site file, bad data) is a
``FedhelixError``. Its ``str()`` is a single line; the CLI prints it without a
traceback. When raised inside a Flower ClientApp, Flower forwards ``str(err)``
to the server wrapped in its own text, so :func:`extract_error_line` recovers it.
"""

from __future__ import annotations

import re

_MARK = "fedhelix:"


class FedhelixError(Exception):
    """Base class: a problem the user can fix, described in one line."""

    def __init__(self, message: str) -> None:
        one_line = " ".join(message.split())
        super().__init__(f"{_MARK} {one_line}")

    @property
    def line(self) -> str:
        """The message without the marker."""
        return str(self)[len(_MARK) + 1 :]


class ConfigError(FedhelixError):
    """A study, site or consortium file is malformed or inconsistent."""


class DataContractError(FedhelixError):
    """A site's data does not satisfy the data contract; nothing is sent."""


def site_error(site: str, file: str, column: str | None, problem: str, fix: str) -> DataContractError:
    """Build the standard data-contract message: site, file, column, problem, remedy."""
    where = f"site '{site}', file {file}"
    if column is not None:
        where += f", column '{column}'"
    return DataContractError(f"{where}: {problem}. Fix: {fix}.")


def extract_error_line(text: str) -> str | None:
    """Find a fedhelix error line inside text Flower wrapped around it (or ``None``)."""
    match = re.search(re.escape(_MARK) + r" (.*?)(?:'>|$)", text, flags=re.S)
    return match.group(1).strip() if match else None
