"""The dependency rules of STYLE.md §2, checked on the source with ast."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "cxr_daemon"
SDKS = {"boto3", "botocore", "requests", "pymysql", "sqlite3", "urllib3"}
PURE = {"domain", "errors", "ports"}
CORE = {"pipeline", "poller", "worker", "status"}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", sorted(PURE))
def test_pure_modules_import_only_stdlib_and_each_other(module: str) -> None:
    """domain, errors and ports import nothing but the stdlib and one another."""
    for name in imports_of(PACKAGE / f"{module}.py"):
        top = name.split(".")[0]
        if top == "cxr_daemon":
            assert name.split(".")[1] in PURE, f"{module} imports {name}"
        else:
            assert top not in SDKS | {"structlog", "tenacity", "pydicom", "numpy", "PIL"}, name


@pytest.mark.parametrize("module", sorted(CORE))
def test_core_never_imports_an_sdk_or_an_adapter(module: str) -> None:
    """pipeline, poller, worker and status reach the world only through ports."""
    for name in imports_of(PACKAGE / f"{module}.py"):
        assert name.split(".")[0] not in SDKS, f"{module} imports {name}"
        assert not name.startswith(("cxr_daemon.adapters", "cxr_daemon.bootstrap")), name


def test_only_bootstrap_and_cli_wire_adapters() -> None:
    """No module outside adapters/, bootstrap and cli imports an adapter."""
    allowed = {"bootstrap.py", "cli.py"}
    for path in PACKAGE.rglob("*.py"):
        if "adapters" in path.parts or path.name in allowed:
            continue
        for name in imports_of(path):
            assert not name.startswith("cxr_daemon.adapters"), f"{path.name} imports {name}"


def test_only_config_reads_the_environment() -> None:
    """os.environ and os.getenv appear only in config.py (STYLE §1)."""
    for path in PACKAGE.rglob("*.py"):
        if path.name == "config.py" or "sandbox" in path.parts:
            continue
        text = path.read_text()
        assert "os.environ" not in text, path
        assert "os.getenv" not in text, path
