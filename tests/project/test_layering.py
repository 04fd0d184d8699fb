"""The layering contract, read from the source: edge_runtime imports nothing else of this repository and no
heavy library, and no package imports a package above it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = {"tensorflow", "keras", "sklearn", "tf2onnx", "skl2onnx", "onnx", "torch", "scipy", "sqlalchemy", "matplotlib"}
# who may import whom (DESIGN.md): arrows point into edge_runtime, never out of it
ALLOWED = {
    "edge_runtime": set(),
    "convert": {"edge_runtime"},
    "telemetry": {"edge_runtime", "convert"},
    "devices": {"edge_runtime", "telemetry", "convert"},
    # development tools (test and demo brokers, the emulated aarch64 device, fleet emulation): never shipped
    # to a device, imported by nothing of the runtime, the converter, the monitor or the device tools
    "devtools": {"edge_runtime", "convert", "telemetry", "devices"},
    "benchmarks": {"edge_runtime", "convert", "telemetry", "devices", "devtools"},
    "edgeops": {"edge_runtime", "convert", "benchmarks", "telemetry", "devices", "devtools"},
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_the_packages_below_it(package):
    others = set(ALLOWED) - {package}
    offenders = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = (imported_roots(path) & others) - ALLOWED[package]
        if package == "edge_runtime":
            bad |= imported_roots(path) & HEAVY
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders, f"{package} imports what it may not: {offenders}"


# what of SQLAlchemy a module may use without building SQL: types and errors
SQL_FREE_NAMES = {"sqlalchemy.engine", "sqlalchemy.exc"}


def test_all_sql_of_the_monitor_lives_in_telemetry_store():
    """Queries and statements are built in telemetry/store.py only; the other modules call its functions."""
    offenders = []
    for path in sorted((ROOT / "telemetry").rglob("*.py")):
        if path.name == "store.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sqlalchemy"):
                names = {f"{node.module}.{a.name}" for a in node.names}
                if node.module not in SQL_FREE_NAMES and not names <= SQL_FREE_NAMES:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} from {node.module} import "
                                     f"{', '.join(a.name for a in node.names)}")
            elif isinstance(node, ast.Import) and any(a.name.startswith("sqlalchemy") for a in node.names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} import sqlalchemy")
    assert not offenders, offenders
