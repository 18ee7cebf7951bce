"""The package layout the README's architecture section describes: every dependency points toward the feature
model, and the feature model opens no socket and no file.

Imports inside functions count too (the CLI imports lazily), so this reads every module's syntax tree.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OURS = {"featurestore", "stores", "ingest", "streaming", "batch", "model", "serving", "services", "demo"}
#: What each package may import (besides itself and third-party libraries). The README's table says the same.
ALLOWED = {
    "featurestore": set(),
    "stores": {"featurestore"},
    "services": {"stores"},
    "ingest": {"featurestore", "stores"},
    "batch": {"featurestore", "stores"},
    "model": {"featurestore", "stores", "batch"},
    "serving": {"featurestore", "stores", "model"},
    "streaming": {"featurestore", "stores", "model", "serving"},
    "demo": OURS - {"demo"},
}
#: Libraries that reach outside the process: the feature model uses none of them.
IO_LIBRARIES = {"redis", "aiokafka", "kafka", "faust", "duckdb", "pyspark", "socket", "requests", "httpx",
                "pyarrow", "pandas", "subprocess", "urllib", "fastapi", "mlflow"}


def imports_of(package: str) -> dict[str, set[str]]:
    """module path -> top-level names it imports (anywhere in the module)."""
    out = {}
    for path in sorted((REPO / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        out[str(path.relative_to(REPO))] = names
    return out


@pytest.mark.unit
@pytest.mark.parametrize("package", sorted(p for p in ALLOWED if (REPO / p).is_dir()))
def test_dependencies_point_toward_the_feature_model(package):
    for module, names in imports_of(package).items():
        wrong = (names & OURS) - ALLOWED[package] - {package}
        assert not wrong, f"{module} imports {sorted(wrong)}; {package}/ may import only {sorted(ALLOWED[package])}"


@pytest.mark.unit
def test_the_feature_model_does_no_io():
    for module, names in imports_of("featurestore").items():
        assert not names & IO_LIBRARIES, f"{module} imports {sorted(names & IO_LIBRARIES)}: it belongs in stores/"
    for path in (REPO / "featurestore").rglob("*.py"):
        assert "open(" not in path.read_text(), f"{path.name} opens a file: it belongs in stores/"


@pytest.mark.unit
def test_every_package_is_installed_and_in_the_image():
    import tomllib

    declared = {p.split(".")[0] for p in tomllib.loads((REPO / "pyproject.toml").read_text())
                ["tool"]["setuptools"]["packages"]}
    on_disk = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()} - {"tests", "bench"}
    assert declared == on_disk
