"""The tree keeps the shape the README promises: short functions, no import cycles, no
private names taken from another module, test-only helpers outside the package.

These read the source as text (``ast`` for Python, a brace scanner for C and C++), so a
violation fails with the file, line and name to fix.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pyactadd"
MAX_LINES = 80
PYTHON_TREES = ("pyactadd", "benchmarks", "convert", "scripts")
CPP_TREES = ("cpp",)


def _python_files() -> list[Path]:
    return sorted(p for tree in PYTHON_TREES for p in (ROOT / tree).rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def long_python_functions(path: Path, limit: int = MAX_LINES) -> list[str]:
    """Functions and methods in ``path`` whose definition spans more than ``limit`` lines."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            length = node.end_lineno - first + 1
            if length > limit:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}() is {length} lines")
    return found


_CPP_NOISE = re.compile(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'', re.S)
_CONTAINER = re.compile(r"\b(namespace|struct|class|union|enum)\b|extern\s*$")


def long_cpp_functions(path: Path, limit: int = MAX_LINES) -> list[str]:
    """Function bodies in a C or C++ file longer than ``limit`` lines (a brace scanner:
    comments and literals are blanked first; a brace after ``namespace``, ``struct``,
    ``extern "C"`` or an ``=`` opens a container, not a function)."""
    text = _CPP_NOISE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), path.read_text(encoding="utf-8"))
    stack: list[tuple[str, int, str]] = []  # (kind, line, header)
    found, since = [], 0
    for i, ch in enumerate(text):
        if ch in ";{}":
            header = text[since:i]
            since = i + 1
        if ch == "{":
            in_function = any(kind == "function" for kind, _, _ in stack)
            is_function = not in_function and "(" in header and "=" not in header.split("(")[0]
            is_function = is_function and not _CONTAINER.search(header.split("(")[0])
            stack.append(("function" if is_function else "block", text.count("\n", 0, i) + 1, header.strip()))
        elif ch == "}" and stack:
            kind, start, header = stack.pop()
            end = text.count("\n", 0, i) + 1
            if kind == "function" and end - start + 1 > limit:
                name = re.findall(r"[\w:~]+(?=\s*\()", header)
                found.append(f"{path.relative_to(ROOT)}:{start} {name[0] if name else header[:40]} is {end - start + 1} lines")
    return found


def test_no_python_function_over_80_lines():
    found = [line for path in _python_files() for line in long_python_functions(path)]
    assert not found, "split these functions:\n" + "\n".join(found)


def test_no_cpp_function_over_80_lines():
    files = sorted(p for tree in CPP_TREES for p in (ROOT / tree).rglob("*") if p.suffix in (".c", ".cpp", ".h"))
    found = [line for path in files for line in long_cpp_functions(path)]
    assert not found, "split these functions:\n" + "\n".join(found)


def _type_checking_only(tree: ast.AST) -> set[int]:
    """Line numbers of imports under ``if TYPE_CHECKING:`` (never run, so no real dependency)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            lines |= {n.lineno for stmt in node.body for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return lines


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, names, line) for every pyactadd import in a file that runs (top level or in a
    function; not under ``if TYPE_CHECKING:``), relative ones resolved."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = _type_checking_only(tree)
    out = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            if base.split(".")[0] == "pyactadd":
                out.append((base, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "pyactadd"]
    return out


def _package_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _targets(base: str, names: list[str], modules: dict[str, Path]) -> list[str]:
    """The modules an import statement makes Python load (names that are submodules count)."""
    found = [base] if base in modules else []
    found += [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
    return found


def test_no_import_cycle_in_the_package():
    """Every import that runs counts, also one inside a function: an import delayed to
    break a cycle still makes two modules depend on each other."""
    modules = _package_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for base, names, _ in _imports(path):
            edges |= {t for t in _targets(base, names, modules) if t != name and not name.startswith(t + ".")}
        graph[name] = edges
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_private_name_imported_from_another_module():
    modules = _package_modules()
    found = []
    for path in _python_files():
        for base, names, line in _imports(path):
            for n in names:
                target = f"{base}.{n}" if f"{base}.{n}" in modules else base
                if n.startswith("_") and not n.startswith("__") and n != "_engine" and target != _module_name(path):
                    found.append(f"{path.relative_to(ROOT)}:{line} imports {n} from {base}")
    assert not found, "use a public name instead:\n" + "\n".join(found)


def test_test_only_helpers_live_under_tests():
    """Nothing in the package is imported only by tests (launchers, scoring helpers)."""
    used = set()
    for path in [*_python_files(), *(ROOT / "cpp").rglob("*.py")]:
        for base, names, _ in _imports(path):
            used.add(base)
            used |= {f"{base}.{n}" for n in names}
    modules = _package_modules()
    unused = [name for name, p in modules.items() if p.name != "__init__.py" and name not in used and not name.endswith("__main__")]
    assert not unused, "imported by nothing in the package (move to tests/helpers or delete): " + ", ".join(unused)


@pytest.mark.parametrize("checker", [long_python_functions, long_cpp_functions])
def test_the_checkers_find_a_long_function(tmp_path, checker):
    """The length checks can fail: a 90-line function is reported."""
    if checker is long_python_functions:
        source, name = "def f():\n" + "    x = 1\n" * 90, "f.py"
    else:
        source, name = 'namespace a {\nextern "C" int f(int x) {\n' + "    x += 1;\n" * 90 + "    return x;\n}\n}\n", "f.cpp"
    path = tmp_path / name
    path.write_text(source)
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert len(checker(path)) == 1
    finally:
        ROOT = saved


def test_the_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None
