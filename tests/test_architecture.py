"""The house rules of the code base, checked on the source."""

from __future__ import annotations

from pathlib import Path


def test_server_and_client_never_import_each_other(root: Path) -> None:
    """The house rule, checked on the source: server/ and client/ share only shared/."""
    import ast

    def imported(package: str) -> set[str]:
        names: set[str] = set()
        for path in (root / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names.add(node.module.split(".")[0])
        return names

    assert "client" not in imported("server")
    assert "server" not in imported("client")
    assert not {"server", "client", "fedhelix"} & imported("shared")
