"""Resolve user-given paths the same way in every entry point."""

from __future__ import annotations

from pathlib import Path

# The checkout (or installed tree) holding shared/, studies/ and data/.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STUDY = PROJECT_ROOT / "studies" / "tcga-brca" / "study.toml"


def resolve_path(value: str | Path) -> Path:
    """Absolute paths as given; relative ones against the working directory, else the project root."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    here = Path.cwd() / path
    if here.exists():
        return here.resolve()
    return (PROJECT_ROOT / path).resolve()
