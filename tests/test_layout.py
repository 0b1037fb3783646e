"""The package's shape: every module in a layer, imports only downward (function-local ones
included), no import circle, short modules and short functions on the training path."""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "vgg_ablation"

# Lowest first. A module may import from its own layer or below, never above.
# fmt: off
LAYERS = [
    ("foundation", {"__init__", "errors", "files", "config", "sequential"}),
    ("stores", {"tracking", "outbox", "checkpoints", "labserver", "archive"}),
    ("data and nets", {"datasets", "batches", "data", "models", "design", "module", "distributed"}),
    ("statistics", {"runtable", "plans", "analysis"}),
    ("a study's cells", {"cells", "reference_cells"}),
    ("one cell's objects", {"build", "fitting", "profiling"}),
    ("one cell's run", {"cell_run", "progress"}),
    ("tasks and documents", {"train", "report_plots", "report_sections", "report", "bench_report",
                             "bench_cells", "bench", "travel"}),
    ("the orchestrator", {"sweeps", "cluster", "phases", "study"}),
    ("around a study", {"gpucheck", "dashboard", "ui"}),
    ("the command line", {"cli", "__main__"}),
]
# fmt: on
LAYER = {module: i for i, (_, modules) in enumerate(LAYERS) for module in modules}
# The modules a training run goes through: no function there longer than about 60 lines.
TRAINING_PATH = {"config", "tracking", "outbox", "checkpoints", "datasets", "batches", "data", "models",
                 "module", "distributed", "cells", "build", "fitting", "profiling", "cell_run", "train"}  # fmt: skip
LONG_MODULE = 450  # lines; a longer one says why at its top


def imports() -> dict[str, set[str]]:
    """Every package module's imports of other package modules, function-local ones included."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vgg_ablation"):
                parts = node.module.split(".")
                names = [parts[1]] if len(parts) > 1 else [a.name for a in node.names]
                found.update(n for n in names if (PACKAGE / f"{n}.py").exists())
            elif isinstance(node, ast.Import):
                found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("vgg_ablation."))
        graph[path.stem] = found - {path.stem}
    return graph


def test_every_module_has_a_layer():
    assert set(imports()) == set(LAYER), set(imports()) ^ set(LAYER)


def test_imports_only_go_down():
    upward = [
        f"{module} ({LAYERS[LAYER[module]][0]}) imports {target} ({LAYERS[LAYER[target]][0]})"
        for module, targets in imports().items()
        for target in targets
        if LAYER[target] > LAYER[module]
    ]
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    graph = imports()
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                pytest.fail("import circle: " + " -> ".join([*path[path.index(target) :], target]))
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_long_modules_say_why(path):
    text = path.read_text()
    lines = len(text.splitlines())
    if lines > LONG_MODULE:
        docstring = ast.get_docstring(ast.parse(text)) or ""
        stated = re.search(r"About (\d+) lines, one concern", docstring)
        assert stated, f"{path.name}: {lines} lines, no reason given"
        assert abs(int(stated.group(1)) - lines) <= 0.1 * lines, (
            f"{path.name} says {stated.group(1)} lines, has {lines}"
        )


def test_functions_on_the_training_path_are_short():
    long = []
    for module in TRAINING_PATH:
        for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{module}.{node.name}: {lines} lines")
    assert not long, long


def test_arch_reaches_the_model_and_its_param_through_one_resolution():
    # build.model_for is the one path from a config to models.build_model
    callers = [
        path.stem
        for path in PACKAGE.glob("*.py")
        if path.stem not in ("models", "build", "design") and "build_model(" in path.read_text()
    ]
    assert callers == [], callers


def test_a_study_checks_its_data_and_nets_without_lightning():
    """A study's orchestrator (and the report and CLI it reaches) checks its data and nets without
    importing Lightning, which brings torchmetrics, scipy.signal, matplotlib and torch._dynamo
    (fitting.py says what that costs), and builds its nets' shapes without drawing weights on the
    meta device, which would import torch._dynamo (models.initialise)."""
    import subprocess
    import sys

    heavy = ["pytorch_lightning", "lightning_fabric", "torchmetrics", "torch._dynamo"]
    code = (
        "import sys, vgg_ablation.cli, vgg_ablation.study, vgg_ablation.report, vgg_ablation.build; "
        "from vgg_ablation.config import compose; "
        "vgg_ablation.study.check_study(compose(['experiment=smoke', 'study.archs=[A,A-LRN,B,C,D,E,B-5x5]'])); "
        f"print([m for m in {heavy!r} if m in sys.modules])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_the_docs_draw_the_same_layers():
    """docs/layout.md's table and LAYERS above are two copies of one picture: they must agree."""
    text = (PACKAGE.parent / "docs" / "layout.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "`" in line.split("|")[2]]
    drawn = [(r.split("|")[1].strip(), set(re.findall(r"`(\w+)`", r.split("|")[2]))) for r in rows]
    assert drawn == [(name, modules) for name, modules in LAYERS]
