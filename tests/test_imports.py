"""Imports go one way, ``data_shards`` <- ``pretrain`` <- ``downstream`` <- ``medfm`` (the Python API), and no
files of a package import each other around a circle, at module level or inside functions (a lazy import only
hides a circle); every import of the library goes through the ``medfm`` namespace (the folders install as
``medfm.data_shards``, ``medfm.pretrain``, ``medfm.downstream``). Parses the source; imports nothing."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("data_shards", "pretrain", "downstream", "medfm")  # each package may import only the ones before it
NAMESPACE = "medfm"  # pyproject.toml's package-dir: the folder pretrain/ is the package medfm.pretrain


def module_files(root: Path, packages: tuple[str, ...] = LAYERS, namespace: str | None = None) -> dict[str, Path]:
    """Dotted module name -> file for every ``.py`` of ``packages`` (an ``__init__.py`` under its package's name);
    folders other than ``namespace`` itself are named under it."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            parts = parts if namespace in (None, package) else (namespace, *parts)
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def layer(module: str) -> int:
    """The index in LAYERS of ``medfm.pretrain.x`` (pretrain) or ``medfm.api`` (medfm)."""
    parts = module.split(".")
    return LAYERS.index(parts[1] if len(parts) > 1 and parts[1] in LAYERS[:-1] else parts[0])


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """Modules of ``modules`` that ``path`` (module ``name``) imports anywhere in the file -> line of the first.

    ``from package import name`` counts as importing ``package.name`` when that is a module, else ``package``.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import medfm.pretrain.methods.mae.X` -> the deepest module file
                target = target.rpartition(".")[0]
            if target and target != name:
                found.setdefault(target, node.lineno)
    return found


def import_graph(
    root: Path, packages: tuple[str, ...] = LAYERS, namespace: str | None = NAMESPACE
) -> dict[str, dict[str, int]]:
    modules = module_files(root, packages, namespace)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def import_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Groups of modules that reach each other through imports (strongly connected components of two or more,
    Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in graph.get(module, {}):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = stack[stack.index(module) :]
            del stack[stack.index(module) :]
            if len(group) > 1:
                cycles.append(sorted(group))

    for module in graph:
        if module not in index:
            visit(module)
    return cycles


def describe(group: list[str], graph: dict[str, dict[str, int]], root: Path) -> str:
    edges = [
        f"{source.replace('.', '/')}.py:{line} imports {target}"
        for source in group
        for target, line in sorted(graph[source].items())
        if target in group
    ]
    return " <-> ".join(group) + "\n    " + "\n    ".join(edges)


def test_no_import_cycle_between_files_of_a_package():
    graph = import_graph(REPO)
    cycles = import_cycles(graph)
    assert not cycles, "import cycles (move the shared piece into a leaf module):\n" + "\n".join(
        describe(group, graph, REPO) for group in cycles
    )


def test_imports_go_one_way():
    wrong = [
        f"{module_files(REPO, namespace=NAMESPACE)[source].relative_to(REPO)}:{line} imports {target}"
        for source, targets in import_graph(REPO).items()
        for target, line in sorted(targets.items())
        if layer(target) > layer(source)
    ]
    assert not wrong, "imports must go data_shards <- pretrain <- downstream:\n" + "\n".join(wrong)


def test_the_check_sees_imports_inside_functions(tmp_path: Path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from pkg.sub.b import B\n")
    (package / "a.py").write_text("def f():\n    from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("from .. import a\nB = 1\n")
    (package / "c.py").write_text("import pkg.sub.b\n")
    graph = import_graph(tmp_path, ("pkg",), namespace=None)
    assert graph["pkg.a"] == {"pkg.sub.b": 2} and graph["pkg.sub.b"] == {"pkg.a": 1}
    assert graph["pkg.sub"] == {"pkg.sub.b": 1} and graph["pkg.c"] == {"pkg.sub.b": 1}
    assert import_cycles(graph) == [["pkg.a", "pkg.sub.b"]]


def test_every_import_of_the_library_goes_through_the_namespace():
    """``import pretrain.x`` would load a second copy of the module beside ``medfm.pretrain.x`` when run from the
    repository root (two registries, two exception classes) and fails once installed."""
    bare = []
    for path in sorted(REPO.rglob("*.py")):
        if ".venv" in path.parts or "build" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            bare += [
                f"{path.relative_to(REPO)}:{node.lineno} imports {n}"
                for n in names
                if n.split(".")[0] in (*LAYERS[:-1], "medfm_cli")
            ]
    assert not bare, "import the library as medfm.data_shards / medfm.pretrain / medfm.downstream:\n" + "\n".join(bare)
