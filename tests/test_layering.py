"""The layering README and ARCHITECTURE.md promise, checked on the source itself.

``rwft.core`` is the machine-learning library: it must import neither Flower nor Ray nor
any rwft package built on top of it, at module level or inside a function. A walk over
every import statement (not an import of the modules) catches the lazy imports too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package folder -> module prefixes it must never import
FORBIDDEN = {
    "core": ("flwr", "ray", "rwft.server", "rwft.clients", "rwft.federation", "rwft.plugins", "rwft.experiments"),
    "federation": ("rwft.server", "rwft.clients", "rwft.experiments"),
    "plugins": ("rwft.clients",),
    # Sweeps sit on top of everything; nothing else builds on them.
    "server": ("rwft.experiments",),
    "clients": ("rwft.experiments",),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_nothing_above_it(package: str) -> None:
    violations = [f"{path.relative_to(ROOT)}:{line} imports {module}"
                  for path in sorted((ROOT / package).glob("*.py"))
                  for line, module in imported_modules(path)
                  if any(module == bad or module.startswith(bad + ".") for bad in FORBIDDEN[package])]
    assert not violations, "\n".join(violations)


def test_the_walk_sees_lazy_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from flwr.app import Array\n    import ray\n")
    assert [name for _, name in imported_modules(module)] == ["flwr.app", "ray"]


def test_ruff_is_clean_on_the_whole_tree() -> None:
    """The house rules (``[tool.ruff]`` in pyproject.toml) hold for every file, tests included."""
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    result = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
