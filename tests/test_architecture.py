"""The layers of ../shared/DESIGN.md, enforced: import-linter's contracts (pyproject.toml) hold, no llamalite module
takes part in an import cycle (function-level and TYPE_CHECKING imports included), and the contracts do break when
an upward import is planted in a copy of the package."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp")
pytest.importorskip("importlinter")

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
               "sys.exit(lint_imports_command())", "--config", str(cwd / "pyproject.toml"), "--no-cache", "--no-logo"]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={"PATH": "", "PYTHONPATH": str(pythonpath)})


def test_the_layer_contracts_hold():
    result = lint_imports(ROOT, ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def strongly_connected(graph) -> list[set[str]]:
    """Tarjan's strongly connected components of the module graph (iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components


def test_no_module_takes_part_in_an_import_cycle():
    graph = grimp.build_graph("llamalite", cache_dir=None)  # every import statement, in functions too
    assert len(graph.modules) > 40
    cycles = [sorted(component) for component in strongly_connected(graph) if len(component) > 1]
    assert cycles == []


def test_the_cycle_finder_sees_a_cycle_made_of_function_level_imports(tmp_path):
    package = tmp_path / "loop"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from loop import b\n")
    (package / "b.py").write_text("def g():\n    from loop import a\n")
    sys.path.insert(0, str(tmp_path))
    try:
        graph = grimp.build_graph("loop", cache_dir=None)
    finally:
        sys.path.remove(str(tmp_path))
    assert [sorted(c) for c in strongly_connected(graph) if len(c) > 1] == [["loop.a", "loop.b"]]


@pytest.mark.parametrize("module, planted", [
    ("errors.py", "\nimport llamalite.cli  # an upward import\n"),
    ("model/llama.py", "\n\ndef _upward():\n    from llamalite.train import trainer  # inside a function\n"),
])
def test_an_upward_import_breaks_the_contracts(tmp_path, module, planted):
    shutil.copytree(ROOT / "llamalite", tmp_path / "llamalite", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "llamalite" / module, "a") as f:
        f.write(planted)
    result = lint_imports(tmp_path, tmp_path)
    assert result.returncode == 1, result.stdout
    assert "BROKEN" in result.stdout
    importer = "llamalite." + module.removesuffix(".py").replace("/", ".")
    assert importer in result.stdout
