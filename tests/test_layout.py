"""The tree's layout rules (DESIGN.md, "Layers"), checked by reading the source:
no import cycle in ``engine/`` or ``kernels/``, no file there over 450 lines, no import of
another project module's private (``_``-prefixed) name, and ``engine/models`` knows nothing
of ``engine/parallel``."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "kernels")
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _is_package(mod: str) -> bool:
    return MODULES[mod].name == "__init__.py"


def _type_checking(node: ast.If) -> bool:
    return isinstance(node.test, (ast.Name, ast.Attribute)) and ast.unparse(node.test).endswith("TYPE_CHECKING")


def _imports(mod: str):
    """Yield (line, target module, imported name or None) for each import in ``mod``
    that names a project module; imports under ``if TYPE_CHECKING:`` are skipped."""
    tree = ast.parse(MODULES[mod].read_text())
    base = mod.split(".") if _is_package(mod) else mod.split(".")[:-1]
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _type_checking(node)
            for child in node.body for n in ast.walk(child)}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                source = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                yield node.lineno, source, alias.name


def _defined_in(package: str, name: str) -> str:
    """The submodule a package re-exports ``name`` from (the package itself if it defines it)."""
    for _, source, imported in _imports(package):
        if imported == name and source.startswith(package + "."):
            return _defined_in(source, name) if source in MODULES and _is_package(source) else source
    return package


def _edges(mod: str) -> set[str]:
    out = set()
    for _, source, name in _imports(mod):
        if name and f"{source}.{name}" in MODULES:
            target = f"{source}.{name}"
        elif name and source in MODULES and _is_package(source):
            target = _defined_in(source, name)  # `from engine.infer import X` depends on X's module
        else:
            target = source
        if target in MODULES and target != mod:
            out.add(target)
    return out


def test_no_import_cycle():
    graph = {m: _edges(m) for m in MODULES}
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    # A package's __init__ re-exporting its submodules is not a cycle of the code (a name
    # taken from a package counts as taken from the submodule that defines it).
    cycles = [c for c in cycles if not any(_is_package(m) for m in c)]
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_long_files():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_no_private_imports():
    bad = []
    for mod, path in MODULES.items():
        for line, source, name in _imports(mod):
            # (kernels._C, the compiled extension, is no Python module of ours: torch's naming.)
            private = [p for p in source.split(".") if p.startswith("_") and not p.startswith("__")
                       and source in MODULES]
            if name and name.startswith("_") and not name.startswith("__"):
                private.append(name)
            if private and source != mod:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {source} {name or ''}".rstrip())
    assert not bad, "imports of private names:\n" + "\n".join(bad)


@pytest.mark.parametrize("lower, upper", [("engine.models", "engine.parallel"), ("kernels", "engine")] + [
    (lower, "engine.integrations") for lower in ("engine.models", "engine.parallel", "engine.infer", "engine.train",
                                                  "engine.api")])
def test_layers(lower, upper):
    bad = [f"{MODULES[m].relative_to(ROOT)}:{line}: {source}" for m in MODULES if m.startswith(lower)
           for line, source, _ in _imports(m) if source == upper or source.startswith(upper + ".")]
    assert not bad, f"{lower} imports {upper}:\n" + "\n".join(bad)
