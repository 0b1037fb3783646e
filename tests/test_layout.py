"""The package's shape: every module in a layer, imports only downward (function-local ones
included), no import circle, short modules and short functions on the training path."""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "vgg_ablation"
LAYOUT_DOC = PACKAGE.parent / "docs" / "layout.md"


def read_layers() -> list[tuple[str, str, set[str]]]:
    """docs/layout.md's table, the one copy of the layers: (layer, folder, modules), lowest first."""
    rows = []
    for line in LAYOUT_DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"`[\w/]+/`", cells[1]):
            folder = cells[1].strip("`").removeprefix("vgg_ablation/").rstrip("/")
            rows.append((cells[0], folder, set(re.findall(r"`(\w+)`", cells[2]))))
    return rows


LAYERS = read_layers()


def dotted(folder: str, module: str) -> str:
    """A module's name below the package: "errors", "tracking.stores"."""
    if module == "__main__" or not folder:  # __main__ sits at the top, where `python -m` finds it
        return module
    return f"{folder}.{module}"


LAYER = {dotted(folder, m): i for i, (_, folder, modules) in enumerate(LAYERS) for m in modules}
# The modules a training run goes through: no function there longer than about 60 lines.
TRAINING_PATH = {"config", "tracking.stores", "tracking.outbox", "training.checkpoints", "data.datasets",
                 "data.batches", "data.modules", "nets.models", "training.module", "training.distributed",
                 "study.cells", "training.build", "training.fitting", "training.profiling",
                 "training.cell_run", "training.train"}  # fmt: skip
LONG_MODULE = 450  # lines; a longer one says why at its top


def module_files() -> dict[str, Path]:
    """Every module of the package by its dotted name below it (the folders' __init__ files apart:
    a folder's docstring, nothing to import)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[0] in ("conf", "sample_data") or (len(parts) > 1 and parts[-1] == "__init__"):
            continue
        found[".".join(parts)] = path
    return found


def imports() -> dict[str, set[str]]:
    """Every package module's imports of other package modules, function-local ones included."""
    modules = module_files()
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vgg_ablation"):
                base = node.module.removeprefix("vgg_ablation").lstrip(".")
                candidates = [f"{base}.{a.name}".lstrip(".") for a in node.names] + [base]
                found.update(c for c in candidates if c in modules)
            elif isinstance(node, ast.Import):
                named = [
                    a.name.removeprefix("vgg_ablation.")
                    for a in node.names
                    if a.name.startswith("vgg_ablation.")
                ]
                found.update(n for n in named if n in modules)
        graph[name] = found - {name}
    return graph


def test_the_docs_table_is_the_tree():
    """Each folder holds exactly the modules its row lists, and every module is in a row."""
    assert [folder for _, folder, _ in LAYERS][:1] == [""] and len(LAYERS) >= 8, LAYERS
    for _, folder, modules in LAYERS:
        here = {p.stem for p in (PACKAGE / folder).glob("*.py") if p.stem != "__init__" or not folder}
        if folder == "commands":
            here.add("__main__")
        elif not folder:
            here.discard("__main__")
        assert here == modules, (folder, here ^ modules)
        assert not folder or ast.get_docstring(ast.parse((PACKAGE / folder / "__init__.py").read_text()))
    assert set(module_files()) == set(LAYER), set(module_files()) ^ set(LAYER)


def test_imports_only_go_down():
    upward = [
        f"{module} ({LAYERS[LAYER[module]][0]}) imports {target} ({LAYERS[LAYER[target]][0]})"
        for module, targets in imports().items()
        for target in targets
        if LAYER[target] > LAYER[module]
    ]
    assert not upward, "\n".join(upward)


def test_the_import_reader_sees_every_kind_of_import():
    """The checks above are only as good as this reader: each way of importing is seen."""
    graph = imports()
    assert "tracking.stores" in graph["runner.study"]  # from vgg_ablation.tracking import stores
    assert "study.cells" in graph["runner.study"]  # from vgg_ablation.study.cells import (...)
    assert "report.document" in graph["runner.study"]  # a function-local import
    assert "errors" in graph["config"]  # from vgg_ablation.errors import UserError


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


@pytest.mark.parametrize("path", sorted(module_files().values()), ids=lambda p: str(p.relative_to(PACKAGE)))
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
        for node in ast.walk(ast.parse(module_files()[module].read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{module}.{node.name}: {lines} lines")
    assert not long, long


def test_arch_reaches_the_model_and_its_param_through_one_resolution():
    # build.model_for is the one path from a config to models.build_model
    callers = [
        name
        for name, path in module_files().items()
        if name not in ("nets.models", "training.build", "nets.design") and "build_model(" in path.read_text()
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
        "import sys, vgg_ablation.commands.cli, vgg_ablation.runner.study, vgg_ablation.report.document, vgg_ablation.training.build; "
        "from vgg_ablation.config import compose; "
        "vgg_ablation.runner.study.check_study(compose(['experiment=smoke', 'study.archs=[A,A-LRN,B,C,D,E,B-5x5]'])); "
        f"print([m for m in {heavy!r} if m in sys.modules])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
