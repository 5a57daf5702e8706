"""dvc.yaml tells the truth about code: each stage's deps hold every package file its script imports, and no other.

A file a stage uses but does not declare would let `dvc repro` skip a stage whose result the change alters; a file
declared but unused reruns a stage for nothing.
"""

import ast
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from cifar_pipeline.resume import NOT_CODE_DEPS, imported_package_files, module_file

PACKAGE = "cifar_pipeline"
SOURCE = ROOT / "src"
NOT_DEPS = {f"src/{PACKAGE}/{name}" for name in NOT_CODE_DEPS}  # how errors are worded and files written
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def used_files(script: Path) -> set[str]:
    """Every package file `script` loads at module level, transitively, relative to the project root: the same
    closure the resume state's fingerprint hashes for the train stage (resume.imported_package_files)."""
    return {str(file.relative_to(ROOT)) for file in imported_package_files(script, SOURCE / PACKAGE)}


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
            files |= {file for file in (module_file(name, SOURCE / PACKAGE) for name in names) if file is not None}
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
