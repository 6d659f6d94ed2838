"""The architecture is enforced, not hoped for (docs/architecture.md): the layer contracts of pyproject.toml
(``[tool.importlinter]``) hold, and no source file of the package is over 600 lines."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from conftest import REPO

MAX_LINES = 600
SOURCE_DIRS = ("superdiff_protein", "models", "eval")

# the package's own `lint-imports`, run in a fresh interpreter from the repository root (where pyproject.toml is);
# --no-cache: nothing is written into the checkout
_LINT = ("import sys; from importlinter.cli import lint_imports_command; "
         "sys.exit(lint_imports_command(['--no-cache']))")


def test_import_contracts_hold():
    """core imports nothing of the project; models never import cli; eval imports only superdiff_protein.runs
    (and the errors base class) of the library; the layers point one way; no sibling modules import in a circle."""
    if importlib.util.find_spec("importlinter") is None:
        pytest.skip("import-linter is not installed (it comes with the test extra: pip install -e '.[test]')")
    res = subprocess.run([sys.executable, "-c", _LINT], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"lint-imports: a layer contract is broken\n{res.stdout}\n{res.stderr}"
    assert "0 broken" in res.stdout, res.stdout


def test_no_source_file_over_600_lines():
    """Every .py file under superdiff_protein/, models/ and eval/ has at most 600 lines."""
    long = []
    for d in SOURCE_DIRS:
        for f in sorted((REPO / d).rglob("*.py")):
            with open(f, encoding="utf-8") as fh:
                n = sum(1 for _ in fh)
            if n > MAX_LINES:
                long.append(f"{f.relative_to(REPO)}: {n} lines")
    assert not long, f"source files over {MAX_LINES} lines (split them): " + "; ".join(long)
