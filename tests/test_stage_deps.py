"""dvc.yaml tells the truth about code: each stage's deps hold every package file its script imports, and no other.

A file a stage uses but does not declare would let `dvc repro` skip a stage whose result the change alters; a file
declared but unused reruns a stage for nothing.
"""

import ast
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

PACKAGE = "cifar_pipeline"
SOURCE = ROOT / "src"
# How errors are worded and how files are written (atomically), not what a stage computes: left out on purpose.
NOT_DEPS = {"src/cifar_pipeline/__init__.py", "src/cifar_pipeline/errors.py", "src/cifar_pipeline/atomic.py"}
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_file(module: str) -> Path | None:
    path = SOURCE.joinpath(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_files(path: Path) -> set[Path]:
    """The package files `path` imports at module level (imports inside functions run only when called, and the
    one there, params.py's model-name check, validates a name without using the models)."""
    files = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE]
        else:
            continue
        files |= {file for file in map(module_file, names) if file is not None}
    return files


def used_files(script: Path) -> set[str]:
    """Every package file `script` loads, transitively, relative to the project root."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        for file in imported_files(todo.pop()):
            if file not in seen:
                seen.add(file)
                todo.append(file)
                # A package's __init__ is loaded with any of its modules.
                init = file.parent / "__init__.py"
                if init != file and init.is_file() and init not in seen:
                    seen.add(init)
                    todo.append(init)
    return {str(file.relative_to(ROOT)) for file in seen}


def covering_dep(file: str, deps: list[str]) -> str | None:
    return next((dep for dep in deps if file == dep or file.startswith(dep.rstrip("/") + "/")), None)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_list_exactly_the_package_files_it_imports(stage):
    script = STAGES[stage]["cmd"].split()[-1]
    deps = [dep if isinstance(dep, str) else next(iter(dep)) for dep in STAGES[stage]["deps"]]
    assert script in deps
    used = used_files(ROOT / script) - NOT_DEPS
    undeclared = sorted(file for file in used if covering_dep(file, deps) is None)
    assert not undeclared, f"{stage} imports {undeclared} but dvc.yaml does not list them"
    code_deps = [dep for dep in deps if dep.startswith("src/")]
    unused = [dep for dep in code_deps if not any(covering_dep(file, [dep]) for file in used)]
    assert not unused, f"{stage} lists {unused} in dvc.yaml but does not import them"


def all_imports(path: Path) -> set[Path]:
    """Every package file `path` imports anywhere: at module level, inside functions, under TYPE_CHECKING."""
    files = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            files |= {file for file in map(module_file, names) if file is not None}
    return files - {path}


def test_the_package_has_no_import_cycle():
    # A cycle makes the order of imports matter and hides which module a stage really needs.
    graph = {path: all_imports(path) for path in (SOURCE / PACKAGE).rglob("*.py")}
    package_init = SOURCE / PACKAGE / "__init__.py"
    for start in graph:
        todo, seen = list(graph[start]), set()
        while todo:
            file = todo.pop()
            assert file != start or start == package_init, f"{start.relative_to(SOURCE)} imports itself through a cycle"
            if file not in seen:
                seen.add(file)
                todo.extend(graph.get(file, ()))


def test_code_no_stage_runs_is_outside_every_stage():
    # The commands' code (cifar-predict, cifar-export, cifar-results) must not rerun a stage when it changes.
    for module in ("cli.py", "predict.py", "classifier.py", "export.py", "results.py"):
        assert not any(
            f"src/{PACKAGE}/{module}" in used_files(ROOT / stage["cmd"].split()[-1]) for stage in STAGES.values()
        )
