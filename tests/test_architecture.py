"""The package map of docs/architecture.md, checked from the code's own imports (module level and inside
functions alike): no import cycle between lorakit's modules, imports point down the layers, and no
subpackage `__init__` imports torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "lorakit"

# The layers, lowest first: a module may import its own package and any package of a lower layer. Top-level
# modules are named by their file (cli, merge, ...). Keep in step with docs/architecture.md.
LAYERS = [
    {"errors"},
    {"runtime"},
    {"recipe"},
    {"speed"},
    {"model", "data"},
    {"estimate", "checkpoints"},
    {"merge"},
    {"adapters", "export"},
    {"train"},
    {"generate", "validate"},
    {"cli_argv"},
    {"cli"},
    {"__main__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """lorakit modules that `path` imports anywhere in its code (`from lorakit.x import y` counts y when it
    is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lorakit.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lorakit"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    return {name: {m for m in _imports(p) if m in modules and m != name} for name, p in modules.items()}


def _area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "lorakit"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_cycle_between_lorakit_modules():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_point_down_the_layers():
    wrong = []
    for module, targets in _graph().items():
        src = _area(module)
        if src == "lorakit":  # the package root (version only)
            continue
        assert src in RANK, f"{module}: area {src!r} is not in the layer map (add it here and to docs/architecture.md)"
        for t in targets:
            dst = _area(t)
            if dst != "lorakit" and dst != src and RANK[dst] >= RANK[src]:
                wrong.append(f"{module} -> {t}")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_subpackage_inits_import_no_torch():
    inits = sorted(_module_name(p) for p in PKG.rglob("__init__.py"))
    code = ("import sys\n" + "".join(f"import {m}\n" for m in inits)
            + "heavy = [m for m in ('torch', 'transformers', 'peft', 'trl', 'datasets') if m in sys.modules]\n"
              "print(','.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "", f"a subpackage __init__ imports {out.stdout.strip()}"
