"""The layout keeps the data flow visible: stations -> core -> interfaces -> service.

Checked over the package's ASTs (type-only imports included): no import circle, no lower layer
importing a higher one, and the writer check called from the control path only.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "openwb_modbus_evse"
ROOT = PACKAGE.name


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def _imports() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (relative, absolute, under TYPE_CHECKING)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(max(node.level - 1, 0)):
                    base = base.rpartition(".")[0]
                if node.level:
                    target = f"{base}.{node.module}" if node.module else base
                else:
                    target = node.module or ""
                targets = [f"{target}.{alias.name}" for alias in node.names] + [target]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target not in (module, ROOT):
                    graph[module].add(target)
    return graph


# Below everything: the stations' wire codec, settings, connection caps, rate limits.
FOUNDATION = ("evse.protocol", "config", "limits", "ratelimit")


def _layer(module: str) -> int:
    """-1 foundation, 0 stations, 1 core, 2 interfaces, 3 service and what users run."""
    parts = module.split(".")
    if ".".join(parts[1:]) in FOUNDATION:
        return -1
    if parts[1:2] == ["evse"]:
        return 0
    if parts[1:2] in (["interfaces"], ["mqtt"]):
        return 2
    if parts[1:2] and parts[1] in ("service", "cli", "__main__", "tools"):
        return 3
    return 1


def test_the_package_has_no_import_circle():
    graph = _imports()
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                circle = [*path[path.index(target) :], target]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_no_layer_imports_a_higher_one():
    wrong = [
        f"{module} -> {target}"
        for module, targets in _imports().items()
        for target in targets
        if _layer(target) > _layer(module)
    ]
    assert not wrong, wrong


def test_the_layers_are_what_the_architecture_says():
    assert _layer(f"{ROOT}.evse.link") == 0
    assert _layer(f"{ROOT}.control") == _layer(f"{ROOT}.view") == _layer(f"{ROOT}.registry") == 1
    assert _layer(f"{ROOT}.interfaces.modbus.server") == 2
    assert _layer(f"{ROOT}.service") == 3


def test_the_writer_check_is_made_by_the_control_path_only():
    callers = set()
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "check_writer":
                callers.add(module)
    assert callers == {f"{ROOT}.control"}
