"""The package's import graph: no cycle among bdsafety's modules and no import from a lower layer to a higher one.

Every ``import`` / ``from ... import`` of a bdsafety module counts, at top level or inside a function (a cycle hidden
behind a function-level import is still a cycle), except under ``if __name__ == "__main__":`` (runs only when the
module is the program, e.g. ``python -m bdsafety.records``) and ``if TYPE_CHECKING:``. The registry's discovery of
the method packages (importlib) is no static edge: plug-ins import their base and the registry, never the reverse.
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "bdsafety"

# lowest first; a module may import its own layer and the ones below (a package name covers its submodules)
LAYERS = [
    ["bdsafety.errors", "bdsafety.safeio", "bdsafety.paths"],
    ["bdsafety.models"],  # the architectures: torch only
    ["bdsafety.config"],  # schemas and their validation (model names checked against bdsafety.models)
    ["bdsafety.outputs", "bdsafety.data"],
    ["bdsafety.engine"],
    ["bdsafety.registry"],  # the method list; plug-ins register here, the kinds' runners too
    ["bdsafety.records", "bdsafety.pools"],
    ["bdsafety.experiment", "bdsafety.selection", "bdsafety.cli"],
    ["bdsafety.attacks", "bdsafety.defenses", "bdsafety.retune", "bdsafety.analysis"],  # the methods
    ["bdsafety.study"],
    ["bdsafety.inspector"],
    ["bdsafety.run", "bdsafety.demo"],
]


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _guarded(node: ast.If) -> bool:
    t = node.test
    if isinstance(t, ast.Name) and t.id == "TYPE_CHECKING":
        return True
    return (isinstance(t, ast.Compare) and isinstance(t.left, ast.Name) and t.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in t.comparators))


def _imports(tree: ast.AST, module: str, is_pkg: bool):
    """(candidate dotted names, line) of every import outside the guarded blocks: ``import a.b`` gives ('a.b',);
    ``from a import b`` gives ('a.b', 'a'): the submodule a.b when there is one, else the module a."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _guarded(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            yield from (((a.name,), node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                keep = len(parts) - node.level + (1 if is_pkg else 0)
                base = ".".join(parts[:keep] + ([base] if base else []))
            yield from (((f"{base}.{a.name}", base), node.lineno) for a in node.names)
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported bdsafety module: line of the first such import}."""
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for m, p in mods.items():
        edges: dict[str, int] = {}
        for names, line in _imports(ast.parse(p.read_text()), m, p.name == "__init__.py"):
            name = next((n for n in names if n in mods), names[-1])  # the submodule imported by name, if one
            if name == "bdsafety" or name.startswith("bdsafety."):
                r = resolve(name)
                if r and r != m and r != "bdsafety":
                    edges.setdefault(r, line)
        graph[m] = edges
    return graph


def _cycles(graph: dict) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(graph[w])))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def _layer(module: str) -> int | None:
    found = None
    for i, group in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in group):
            found = i
    return found


def test_no_import_cycle_among_bdsafety_modules():
    graph = import_graph()
    cycles = _cycles(graph)
    detail = ["; ".join(f"{m} -> {d} (line {graph[m][d]})" for m in c for d in graph[m] if d in c) for c in cycles]
    assert not cycles, f"import cycles: {detail}"


def test_no_import_from_a_lower_layer_to_a_higher_one():
    graph = import_graph()
    unlayered = sorted(m for m in graph if _layer(m) is None and m != "bdsafety")
    assert not unlayered, f"modules outside LAYERS (add them to the layer they belong to): {unlayered}"
    up = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)}) at line {line}"
          for m, edges in sorted(graph.items()) if m != "bdsafety" for d, line in edges.items()
          if _layer(d) > _layer(m)]
    assert not up, "upward imports:\n" + "\n".join(up)


def test_the_walker_sees_function_level_imports_and_skips_main_guards():
    src = ("import os\nfrom bdsafety import engine\n\ndef f():\n    from bdsafety.records import x\n\n"
           "if __name__ == '__main__':\n    from bdsafety.inspector import main\n")
    names = {n for ns, _ in _imports(ast.parse(src), "bdsafety.demo", False) for n in ns}
    assert {"bdsafety.engine", "bdsafety.records.x"} <= names and not any("inspector" in n for n in names)
    graph = import_graph()
    assert "bdsafety.data.synthetic" in graph["bdsafety.data.datasets"]  # from bdsafety.data import synthetic
    assert "bdsafety.data" not in graph["bdsafety.data.datasets"]  # ... is no edge to the package
    assert _cycles({"a": {"b": 1}, "b": {"a": 1}, "c": {"a": 1}}) == [["a", "b"]]


def test_imports_inside_functions_are_few_and_say_why():
    """Function-level imports only for heavy or optional modules (matplotlib, torchvision, ray, opencv, ...) and
    platform / version alternatives, each with a comment on its line saying why; never a bdsafety module."""
    found = []
    for p in sorted(PKG.rglob("*.py")):
        src = p.read_text().splitlines()
        for fn in ast.walk(ast.parse("\n".join(src))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    found.append((p.relative_to(PKG.parent).as_posix(), node.lineno, src[node.lineno - 1].strip()))
    inner_bdsafety = [f for f in found if "bdsafety" in f[2] or f[2].startswith("from .")]
    assert not inner_bdsafety, inner_bdsafety
    no_reason = [f for f in found if "#" not in f[2]]
    assert not no_reason, f"function-level imports without a comment saying why: {no_reason}"
    assert len(found) <= 30, f"{len(found)} function-level imports: hoist what is not heavy or optional"
