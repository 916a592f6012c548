"""Reading the kit directories `fedhelix provision` writes (server, admin, one per site)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from shared.errors import ConfigError


def read_kit(path: Path, filename: str, table: str, keys: tuple[str, ...]) -> tuple[Path, dict[str, Any]]:
    """The kit's resolved directory and the ``keys`` of ``[table]`` in its ``filename``, or one clear line."""
    path = Path(path).resolve()
    config = path / filename
    if not config.is_file():
        raise ConfigError(f"{path} is not a {table} kit ({filename} missing); use the kit directory written by `fedhelix provision`")
    try:
        values = tomllib.loads(config.read_text()).get(table, {})
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{config} is not valid TOML: {err}") from None
    missing = [key for key in keys if key not in values]
    if missing:
        raise ConfigError(f"{config}: [{table}] {missing[0]} is missing")
    return path, values
