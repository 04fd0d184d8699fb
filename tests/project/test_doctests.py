"""Every example in a docstring of the project runs as a test and shows what it claims."""

from __future__ import annotations

import doctest
import importlib
import io
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("edge_runtime", "convert", "benchmarks", "telemetry", "devices", "devtools", "edgeops")


def modules_with_examples() -> list[str]:
    """Dotted names of the project's modules whose source holds a doctest (found without importing them)."""
    names = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if ">>>" in path.read_text(encoding="utf-8", errors="replace"):
                parts = path.relative_to(ROOT).with_suffix("").parts
                names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names + ["helpers"]   # tests/helpers.py: eventually() shows how it is used


def test_the_project_has_doctests_in_several_packages():
    assert {name.split(".")[0] for name in modules_with_examples()} >= {"edge_runtime", "convert", "telemetry"}


@pytest.mark.parametrize("name", modules_with_examples())
def test_every_docstring_example_runs(name):
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        # A module of an optional extra (e.g. the converter without TensorFlow) is skipped, not failed;
        # a module of the project that cannot be imported is a failure.
        if exc.name and exc.name.split(".")[0] in PACKAGES + ("helpers",):
            raise
        pytest.skip(f"{name} needs {exc.name}, which is not installed")
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = doctest.DocTestFinder().find(module, name)
    assert any(t.examples for t in tests), f"{name}: no example was found, though its source has '>>>'"
    for test in tests:
        runner.run(test, out=out.write)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed:\n{out.getvalue()}"
