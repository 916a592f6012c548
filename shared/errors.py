"""Errors that end in one readable line naming where the problem is and what to do.

Every error a user can cause (a bad study file, a bad site file, bad data) is a
``FedhelixError``. Its ``str()`` is a single line; the CLI prints it without a
traceback.

What leaves a site is never that line: the line may name the site's files,
columns, category values or patients. A site seals every error into a fixed
*code* and a generic phrase (:func:`sealed_line`); the full line stays in the
site's own log. The coordinator recovers the sealed line with
:func:`extract_error_line`.
"""

from __future__ import annotations

import re
from pathlib import Path

_MARK = "fedhelix:"


class FedhelixError(Exception):
    """Base class: a problem the user can fix, described in one line."""

    code = "E100"  # what the coordinator is told instead of the line (see CODES)

    def __init__(self, message: str) -> None:
        one_line = " ".join(message.split())
        super().__init__(f"{_MARK} {one_line}")

    @property
    def line(self) -> str:
        """The message without the marker."""
        return str(self)[len(_MARK) + 1 :]


class ConfigError(FedhelixError):
    """A study, site or consortium file is malformed or inconsistent."""

    code = "E110"


class DataContractError(FedhelixError):
    """A site's data does not satisfy the data contract; nothing is sent."""

    code = "E120"


class RequestRefused(FedhelixError):
    """A site refuses a coordinator's request that its approved study does not allow; nothing is sent."""

    code = "E130"


# The only error text that leaves a site: a code and a fixed phrase per code.
CODES: dict[str, str] = {
    "E100": "the site could not serve the request",
    "E110": "the site's configuration does not fit the study",
    "E120": "the site's data does not meet the study's data contract",
    "E130": "the site refused a request its approved study does not allow",
    "E140": "the site refused a request beyond the approved schedule (round, fit or evaluation)",
    "E150": "the site refused a secure-aggregation message that breaks the approved protocol",
    "E160": "the site's privacy budget does not allow this round",
    "E170": "the site's privacy ledger failed its integrity check",
    "E180": "the site's audit log cannot be written",
    "E190": "the site has not approved this run",
    "E199": "internal error at the site",
}
INTERNAL = "E199"


def error_code(err: BaseException) -> str:
    """The code a site reports for ``err``: its class's ``code``, or E199 for anything unexpected."""
    code = getattr(err, "code", None) if isinstance(err, FedhelixError) else None
    return code if code in CODES else INTERNAL


def site_error_log(audit_log: Path, site: str) -> Path:
    """Where a site keeps its errors in full: ``SITE.errors.log`` beside its audit log, never sent."""
    return Path(audit_log).with_name(f"{site}.errors.log")


def read_site_errors(directory: str | Path) -> list[str]:
    """Every full error line the sites logged in ``directory`` (a simulation, whose researcher is every site's IT)."""
    return [line for path in sorted(Path(directory).glob("*.errors.log")) for line in path.read_text(encoding="utf-8").splitlines() if line]


def sealed_line(site: str, code: str) -> str:
    """What the coordinator sees of a site's error: the site, a code and that code's fixed phrase."""
    return f"{_MARK} site '{site}' {code}: {CODES.get(code, CODES[INTERNAL])}; the details stay in the site's log"


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
