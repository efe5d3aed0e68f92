"""Import cycles among picochat's modules: prints each cycle (a strongly connected component of the
import graph) and a count; exits 1 if there is one.

    python scripts/import_cycles.py            # module-level imports: what runs at import time
    python scripts/import_cycles.py --lazy     # also imports inside functions (deferred, never a
                                               # load-order failure, but still a two-way dependency)

Module level means the top-level statements, including those inside top-level if/try/with blocks
and class bodies (not `if TYPE_CHECKING:`). Importing a.b.c also runs a and a.b, so those count as
edges too, except the importer's own parent packages (already running when a submodule loads);
`from pkg import name` of a non-module name is an edge to pkg itself (it needs pkg's attributes).
Reads the source with ast; imports nothing.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def modules() -> dict[str, Path]:
    out = {}
    for p in (ROOT / "picochat").rglob("*.py"):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def imports(stmts, lazy: bool):
    """The Import/ImportFrom nodes that run at import time (or anywhere, with lazy)."""
    for s in stmts:
        if isinstance(s, (ast.Import, ast.ImportFrom)):
            yield s
        elif lazy and isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield from imports(s.body, lazy)
        elif isinstance(s, ast.ClassDef):
            yield from imports(s.body, lazy)  # a class body runs at import time
        elif isinstance(s, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
            if isinstance(s, ast.If) and "TYPE_CHECKING" in ast.unparse(s.test):
                continue
            for block in ("body", "orelse", "finalbody"):
                yield from imports(getattr(s, block, []), lazy)
            for handler in getattr(s, "handlers", []):
                yield from imports(handler.body, lazy)
        elif lazy:
            for child in ast.iter_child_nodes(s):  # nested defs inside other statements
                if isinstance(child, ast.stmt):
                    yield from imports([child], lazy)


def graph(lazy: bool) -> dict[str, set[str]]:
    mods, edges = modules(), {}

    def known(t: str) -> str:  # the longest module prefix of a dotted name
        while t and t not in mods:
            t = t.rpartition(".")[0]
        return t

    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        own_parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        deps = set()
        for node in imports(ast.parse(path.read_text(encoding="utf-8")).body, lazy):
            if isinstance(node, ast.Import):
                targets = {known(a.name) for a in node.names}
            else:
                base = node.module or ""
                if node.level:  # relative: from .x import y
                    parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                # `from pkg import module` imports the module; `from pkg import name` needs pkg itself
                targets = {f"{base}.{a.name}" if f"{base}.{a.name}" in mods else known(base) for a in node.names}
            for t in filter(None, targets):
                deps.add(t)
                # importing a.b.c first runs a and a.b; the importer's own parent packages are already
                # running by then (a submodule loads after its package starts), so they add no edge
                parts = t.split(".")
                deps.update(".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) not in own_parents)
        edges[name] = {d for d in deps if d in mods and d != name}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]; counter[0] += 1; stack.append(root); on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]; counter[0] += 1; stack.append(w); on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop(); on.discard(w); comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def main() -> int:
    lazy = "--lazy" in sys.argv[1:]
    edges = graph(lazy)
    found = cycles(edges)
    for c in found:
        print("cycle: " + " <-> ".join(c))
    print(f"{len(found)} import cycle(s) among {len(edges)} picochat modules "
          f"({'all imports, function-local included' if lazy else 'module-level imports'})")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
