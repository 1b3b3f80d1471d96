"""The package's shape: imports point one way down the layers, no module imports itself
back through others, and the RL stage stays small enough to read.

Layers, lowest first (docs/architecture.md): envs < rlrouter.router < the training stages
(rlrouter.boundary, rlrouter.sft, rlrouter.rl) < the recipe schema (rlrouter.config) <
rlrouter.evaluate, rlrouter.serve, rlrouter.distributed < rlrouter.pipeline < rlrouter.cli.
Imports inside functions count.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [
    ("envs",),
    ("rlrouter.router",),
    ("rlrouter.boundary", "rlrouter.sft", "rlrouter.rl"),
    ("rlrouter.config",),
    ("rlrouter.evaluate", "rlrouter.serve", "rlrouter.distributed"),
    ("rlrouter.pipeline",),
    ("rlrouter.cli", "rlrouter.__main__"),
]


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted([*ROOT.glob("envs/**/*.py"), *ROOT.glob("rlrouter/**/*.py")]):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def layer(module: str) -> int | None:
    for level, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return level
    return None  # the bare ``rlrouter`` package


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports (``from a.b import c`` names a.b.c if that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def test_the_import_walker_resolves_relative_and_from_imports(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    source = pkg / "a.py"
    source.write_text("from . import b\nfrom .c import thing\nimport envs.pool\n\ndef f():\n    from pkg.d import x\n")
    known = {"pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.d", "envs", "envs.pool"}
    assert imports("pkg.a", source, known) == {"pkg", "pkg.b", "pkg.c", "pkg.d", "envs.pool"}


def test_every_module_has_a_layer():
    assert [name for name in modules() if layer(name) is None] == ["rlrouter"]


def test_no_import_climbs_from_a_lower_layer_to_a_higher_one():
    climbs = [f"{a} -> {b}" for a, targets in graph().items() for b in targets
              if layer(a) is not None and layer(b) is not None and layer(b) > layer(a)]
    assert climbs == []


def test_no_import_cycles():
    edges = graph()
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_rl_stage_reads_in_short_functions():
    trainer = ROOT / "rlrouter" / "rl" / "trainer.py"
    assert len(trainer.read_text().splitlines()) <= 400
    long = []
    for path in sorted((ROOT / "rlrouter" / "rl").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{path.name}:{node.name}")
    assert long == []
