"""The house rules the tree is held to: each module one job a newcomer can name, no
package or benchmark file over ~500 lines, no function over 60 (Triton kernels aside), no
import cycle inside the package, no citation of a file outside the repository."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCES = sorted(
    [*REPO.glob("slbi_triton/**/*.py"), *REPO.glob("kernels/*.py"), *REPO.glob("benchmarks/*.py"),
     *REPO.glob("examples/*.py")]
)
MAX_FILE_LINES = 515
MAX_FUNCTION_LINES = 60


def _is_triton_kernel(node: ast.FunctionDef) -> bool:
    return any("triton.jit" in ast.unparse(decorator) for decorator in node.decorator_list)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_file_and_function_sizes(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.count("\n") <= MAX_FILE_LINES
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.FunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
        and not _is_triton_kernel(node)
    ]
    assert not long


def _module_name(path: Path) -> str:
    """The import name of a library file (``kernels/`` is installed as ``slbi_triton.kernels``)."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[0] == "kernels":
        parts.insert(0, "slbi_triton")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str) -> set[str]:
    """Every name ``module`` imports, relative imports resolved (``a.b`` and ``a.b.c`` for
    ``from a.b import c``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            target = ".".join(part for part in (base, node.module) if part)
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_no_import_cycles_in_the_library() -> None:
    paths = [p for p in SOURCES if p.parts[len(REPO.parts)] in ("slbi_triton", "kernels")]
    modules = {_module_name(path): path for path in paths}
    graph = {
        name: {other for other in _imports(path, name) if other in modules and other != name}
        for name, path in modules.items()
    }

    def visit(name: str, stack: tuple[str, ...]) -> None:
        assert name not in stack, "import cycle: " + " -> ".join([*stack, name])
        for other in graph[name]:
            if not other.startswith(name + "."):  # a package importing its own modules
                visit(other, (*stack, name))

    for name in graph:
        visit(name, ())


def test_no_citation_of_files_outside_the_repository() -> None:
    for path in [*SOURCES, *REPO.glob("tests/*.py"), *REPO.glob("docs/*.md"), REPO / "README.md",
                 *REPO.glob("kernels/*.c")]:
        text = path.read_text(encoding="utf-8")
        outside = ("DESIGN" + ".md", "../" + "shared")  # spelled apart so this file passes itself
        assert not any(name in text for name in outside), path
