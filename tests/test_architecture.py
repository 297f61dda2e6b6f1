"""The package's shape: one folder per stage, arrows one way (cli → stages → data/models/rundir).

The import graph is read from the source with ast (no module is imported): an edge A → B for
every `import B` / `from B import x` in A, at module level or inside a function.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "visionrecipe"
TOP_MODULES = {"__init__", "__main__", "cli", "config", "recipes", "rundir", "errors", "system"}
STAGE_FOLDERS = {"data", "models", "train", "doctor", "tune", "evaluate", "deploy"}
# Imports made on use that point up on purpose: Run (rundir.py) is the public handle on a run,
# and its evaluate() and predict() reach the stages that do them, as visionrecipe.evaluate does.
FACADE_EDGES = {("visionrecipe.rundir", "visionrecipe.evaluate.scoring"),
                ("visionrecipe.rundir", "visionrecipe.deploy.predict")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(name: str) -> str | None:
    """The package module an import names: `visionrecipe.data.load_dataset` → `visionrecipe.data`."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(module_level_only: bool) -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        nodes = tree.body if module_level_only else ast.walk(tree)
        targets = set()
        for node in nodes:
            if isinstance(node, ast.Import):
                targets.update(imported(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets.update(imported(f"{node.module}.{alias.name}") for alias in node.names)
        graph[name] = {t for t in targets if t and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles_at_module_level():
    assert cycles(import_graph(module_level_only=True)) == []


def test_no_import_cycles_even_through_imports_made_on_use():
    graph = import_graph(module_level_only=False)
    for source, target in FACADE_EDGES:
        assert target in graph[source], f"stale exception {source} -> {target}: remove it from FACADE_EDGES"
        graph[source].discard(target)
    assert cycles(graph) == []


def test_the_cycles_issue_11_named_are_gone():
    graph = import_graph(module_level_only=False)
    assert "visionrecipe.cli" not in graph["visionrecipe.train.launch"]  # cli → launch → cli
    assert "visionrecipe.train.launch" not in graph["visionrecipe.train.loop"]  # sharded_logits moved
    assert "visionrecipe.tune.study" not in graph["visionrecipe.tune.report"]
    assert "visionrecipe.models.timm_models" not in graph["visionrecipe.models.registry"]


def test_the_top_level_holds_only_the_entry_points_and_the_stage_folders():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert modules <= TOP_MODULES, f"{sorted(modules - TOP_MODULES)} belong in a stage folder"
    assert folders == STAGE_FOLDERS


def test_the_torch_free_modules_import_no_torch():
    """`predict model.onnx` runs on onnxruntime alone: the decode, the run directory and the
    package's own data/__init__ must not pull torch in (tests/test_predict.py runs the whole path)."""
    code = ("import sys, visionrecipe, visionrecipe.data, visionrecipe.data.pil, visionrecipe.rundir, "
            "visionrecipe.deploy.onnx_runtime, visionrecipe.deploy.predict; print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
