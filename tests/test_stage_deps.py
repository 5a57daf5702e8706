"""dvc.yaml tells the truth about code: each stage depends on its script and the package folders (and top-level files)
that hold every package file its script imports, and on none that holds nothing it imports.

A file a stage uses but does not declare would let `dvc repro` skip a stage whose result the change alters; a folder
declared but unused reruns a stage for nothing.
"""

import ast
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from cifar_pipeline.training.resume import TRAIN_CODE, code_files

PACKAGE = "cifar_pipeline"
SOURCE = ROOT / "src"
PACKAGE_DIR = SOURCE / PACKAGE
# How errors are worded and files written (stage.py), and the package's empty __init__: no stage's dependency.
NOT_DEPS = {f"src/{PACKAGE}/stage.py", f"src/{PACKAGE}/__init__.py"}
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_file(module: str) -> Path | None:
    """The file of the package's `module` (dotted, from the package's name on), or None."""
    path = PACKAGE_DIR.joinpath(*module.split(".")[1:])  # cifar_pipeline.models.x -> package_dir/models/x
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports(path: Path, module_level_only: bool = True) -> set[Path]:
    """The package files `path` imports: at module level (what loading it runs), or anywhere in it."""
    nodes = ast.parse(path.read_text()).body if module_level_only else ast.walk(ast.parse(path.read_text()))
    files = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE]
        else:
            continue
        for file in filter(None, map(module_file, names)):
            files |= {file, file.parent / "__init__.py"}  # a module loads its package's __init__ first
    return {file for file in files if file.is_file()} - {path}


def used_files(script: Path) -> set[str]:
    """Every package file `script` loads at module level, transitively, relative to the project root."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        for file in imports(todo.pop()):
            if file not in seen:
                seen.add(file)
                todo.append(file)
    return {str(file.relative_to(ROOT)) for file in seen}


def code_deps(stage: str) -> list[str]:
    deps = [dep if isinstance(dep, str) else next(iter(dep)) for dep in STAGES[stage]["deps"]]
    return [dep for dep in deps if dep.startswith("src/")]


def covering_dep(file: str, deps: list[str]) -> str | None:
    return next((dep for dep in deps if file == dep or file.startswith(dep.rstrip("/") + "/")), None)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_hold_the_package_files_it_imports_and_nothing_for_nothing(stage):
    script = STAGES[stage]["cmd"].split()[-1]
    assert script in STAGES[stage]["deps"]
    used = used_files(ROOT / script) - NOT_DEPS
    deps = code_deps(stage)
    undeclared = sorted(file for file in used if covering_dep(file, deps) is None)
    assert not undeclared, f"{stage} imports {undeclared} but dvc.yaml does not list them"
    unused = [dep for dep in deps if not any(covering_dep(file, [dep]) for file in used)]
    assert not unused, f"{stage} lists {unused} in dvc.yaml but imports nothing from them"
    # By folder: a folder, or one of the package's top-level files.
    assert all((ROOT / dep).is_dir() or (ROOT / dep).parent == PACKAGE_DIR for dep in deps)


def test_the_resume_fingerprint_hashes_exactly_the_train_stages_code_deps():
    assert code_deps("train") == [f"src/{PACKAGE}/{name}" for name in TRAIN_CODE]
    hashed = {str(file.relative_to(ROOT)) for file in code_files()}
    assert used_files(ROOT / "stages/train.py") - NOT_DEPS <= hashed


def test_the_package_has_no_import_cycle():
    # A cycle makes the order of imports matter and hides which module a stage really needs.
    graph = {path: imports(path, module_level_only=False) for path in PACKAGE_DIR.rglob("*.py")}
    for start in graph:
        todo, seen = list(graph[start]), set()
        while todo:
            file = todo.pop()
            assert file != start or start.name == "__init__.py", f"{start.relative_to(SOURCE)} imports itself"
            if file not in seen:
                seen.add(file)
                todo.extend(graph.get(file, ()))


def test_code_no_stage_runs_is_outside_every_stage():
    # The commands' code (cifar-predict, cifar-export, cifar-results) must not rerun a stage when it changes, and the
    # report's code must not rerun training.
    for stage in STAGES:
        assert not any(dep.startswith(f"src/{PACKAGE}/use") for dep in code_deps(stage))
        assert stage == "report" or f"src/{PACKAGE}/report" not in code_deps(stage)
    scripts = [ROOT / stage["cmd"].split()[-1] for stage in STAGES.values()]
    assert not any(f"src/{PACKAGE}/report/results.py" in used_files(script) for script in scripts)
