"""The tree's house rules: no import cycles among our modules, and no module over 400 lines.

Imports are read with `ast`, not by importing: every `import` and `from ... import` counts,
at module level and inside functions alike (an import moved into a function to dodge a cycle
still ties the two modules together). An import of a package counts as a dependency on its
__init__; the implicit import of a module's parent package does not.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flashcli", "converters", "scripts", "studies")
MAX_LINES = 400


def modules(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the packages."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imported(name: str, path: Path, known: dict) -> dict[str, int]:
    """The known modules that module `name` (at `path`) imports, with the line of each import."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            targets = [f"{module}.{alias.name}" for alias in node.names]  # a submodule, or a name in module
        else:
            continue
        for target in targets:
            while target and target not in known:  # the longest prefix that is one of ours
                target = target.rpartition(".")[0]
            if target and target != name:
                out.setdefault(target, node.lineno)
    return out


def import_graph(root: Path, packages=PACKAGES) -> dict[str, dict[str, int]]:
    known = modules(root, packages)
    return {name: imported(name, path, known) for name, path in known.items()}


def cycles(graph: dict) -> list[list[str]]:
    """One cycle [a, b, ..., a] per back edge that a depth-first search meets: empty exactly
    where the graph has no cycle."""
    state, stack, found = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def describe(cycle: list[str], graph: dict) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_no_import_cycles():
    graph = import_graph(ROOT)
    assert len(graph) > 50 and graph["flashcli.decoding.loader"], "the import graph was not read"
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(describe(c, graph) for c in found)


def test_the_cycle_finder_names_a_cycle_and_passes_a_tree():
    tree = {"a": {"b": 1, "c": 1}, "b": {"c": 1}, "c": {}, "d": {"a": 1}}
    assert cycles(tree) == []
    looped = tree | {"c": {"d": 3}}
    assert cycles(looped) == [["a", "b", "c", "d", "a"]]
    assert describe(["c", "d", "c"], {"c": {"d": 3}, "d": {"c": 7}}) == "c (line 3) -> d (line 7) -> c"


def test_function_level_and_relative_imports_count(tmp_path):
    """A fake package whose cycle closes through an import inside a function, written as
    `from . import`, `from .x import` and `from pkg.x import`."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("from pkg.c import thing\n")
    (pkg / "c.py").write_text("thing = 1\n\n\ndef late():\n    from . import a\n\n    return a\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.a"] == {"pkg.sub.b": 1} and graph["pkg.sub.b"] == {"pkg.c": 1}
    assert graph["pkg.c"] == {"pkg.a": 5}
    assert cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]
    (pkg / "c.py").write_text("thing = 1\n")
    assert cycles(import_graph(tmp_path, ("pkg",))) == []


def test_no_module_over_400_lines():
    files = [p for d in PACKAGES + ("tests",) for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 50
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


LAYERS = ("flashcli.arch", "flashcli.engine", "flashcli.flash", "flashcli.decoding", "flashcli.cli")


def allowed_imports(package: str) -> set[str] | None:
    """The packages a layer says it may import: its docstring's "May import:" sentence, up to
    the first ';' or '.' ending it (None: "everything in flashcli")."""
    doc = ast.get_docstring(ast.parse((ROOT / package.replace(".", "/") / "__init__.py").read_text())) or ""
    line = next((x for x in doc.split("\n\n") if x.startswith("May import:")), None)
    assert line, f"{package}'s docstring does not say what it may import"
    said = line.partition(":")[2].split(";")[0].split(" only")[0]
    if "everything in flashcli" in said:
        return None
    return {w.strip(" ,.") for w in said.replace(" and ", ",").split(",") if w.strip(" ,.")}


def test_each_layer_imports_only_what_its_docstring_allows():
    """flashcli's folders are layers (arch < engine < flash < decoding < cli); each package's
    docstring names the packages it may import, and no module of it imports another."""
    graph = import_graph(ROOT)
    said = {layer: allowed_imports(layer) for layer in LAYERS}
    assert said["flashcli.engine"] == {"flashcli.errors", "flashcli.arch"}  # the parse reads the sentence
    wrong = []
    for name, targets in graph.items():
        layer = next((x for x in LAYERS if name == x or name.startswith(x + ".")), None)
        if layer is None or said[layer] is None:
            continue
        for target in targets:
            if not target.startswith("flashcli.") or target.startswith(layer + ".") or target == layer:
                continue
            if not any(target == ok or target.startswith(ok + ".") for ok in said[layer]):
                wrong.append(f"{name} imports {target} (line {targets[target]})")
    assert not wrong, "imports across layers that the docstrings do not allow:\n" + "\n".join(wrong)


def test_every_flashcli_module_lives_in_a_layer():
    loose = [n for n in modules(ROOT, ("flashcli",)) if n.count(".") == 1 and n not in LAYERS]
    assert loose == ["flashcli.errors"], f"modules outside the layer packages: {loose}"
