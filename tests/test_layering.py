"""The dependency rules of docs/architecture.md "Layers": diffusers is only a test oracle, and lower
layers never import higher ones. Checked on the source text, so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Each package may import only the packages listed (plus itself).
ALLOWED = {
    "kernels": set(),
    "ldm": {"kernels"},
    "samplers": {"kernels", "ldm"},
    "control": {"kernels", "ldm", "samplers"},
    "inversion": {"kernels", "ldm", "samplers", "control"},
    "evaluation": {"kernels", "ldm", "samplers", "control", "inversion"},
    "weights": {"kernels", "ldm"},
}
PROJECT = set(ALLOWED) | {"cli", "benchmarks"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def runtime_files() -> list[Path]:
    files = [ROOT / "cli.py"]
    for package in ALLOWED:
        files += sorted((ROOT / package).rglob("*.py"))
    return files


def test_no_runtime_module_imports_diffusers():
    offenders = [str(p.relative_to(ROOT)) for p in runtime_files() if "diffusers" in imported_modules(p)]
    assert offenders == []


def test_lower_layers_never_import_higher_ones():
    violations = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            bad = (imported_modules(path) & PROJECT) - allowed - {package}
            if bad:
                violations.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert violations == []
