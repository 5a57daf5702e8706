"""Keep the README and docs/ true: every param is documented once, their tables match what the code computes, their
links resolve, their commands run (every dvc and gto one in an end-to-end test), and the layout names every module.

Each test finds what it checks by its content (a command's first words, the first cell of a table's rows), never by
a heading or the order of the sections.
"""

import ast
import json
import os
import re
import statistics
from pathlib import Path
from typing import get_args

import pytest
import yaml
from conftest import ROOT
from doc_pages import PAGES, blocks, commands, documented, page, relative, settings

from cifar_pipeline.params import LrFindParams, Params, ParamsError, parse_params
from cifar_pipeline.training import lr_find

README = page("README.md")


def schema_keys(model=Params, prefix=""):
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            yield from schema_keys(annotation, f"{prefix}{name}.")
        else:
            yield prefix + name


def param_rows(text: str) -> set[str]:
    """The keys of the params table's rows: `| \\`key\\` | default | meaning |`."""
    rows = re.findall(r"^\| `([\w.]+)` \|[^|\n]*\|[^|\n]*\|$", text, flags=re.MULTILINE)
    return set(rows) & set(schema_keys())


def test_every_param_is_documented_once_in_the_parameters_page():
    assert param_rows(page("docs/parameters.md")) == set(schema_keys())
    for path in PAGES:
        if path != ROOT / "docs/parameters.md":
            assert not param_rows(path.read_text()), f"{relative(path)} describes params: docs/parameters.md does"


def test_the_rule_table_names_every_rule_and_its_picks_on_the_stored_curves():
    rule_field = LrFindParams.model_fields["rule"]
    rules = set(get_args(rule_field.annotation))
    row = re.compile(r"^\| `(\w+)`( \(default\))? \|.*\| ([\d.e-]+) \| ([\d.e-]+) \|$", flags=re.MULTILINE)
    rows = [r for path in PAGES for r in row.findall(path.read_text()) if r[0] in rules]
    assert sorted(r[0] for r in rows) == sorted(rules), "one row for each rule"
    assert [r[0] for r in rows if r[1]] == [rule_field.default]
    curves = {}
    for model in ("custom_resnet", "dilated_net"):
        saved = json.loads((ROOT / f"docs/results/lr_find_{model}.json").read_text())
        curves[model] = {key: [point[key] for point in saved["curve"]] for key in ("lr", "loss", "raw_loss")}
        curves[model]["diverged"] = saved["diverged"]
    for rule, _, custom_resnet, dilated_net in rows:
        for model, shown in (("custom_resnet", custom_resnet), ("dilated_net", dilated_net)):
            picked = lr_find.suggest_lr(curves[model], LrFindParams(rule=rule))
            assert f"{picked:.3g}" == shown, (
                f"the docs show {shown} for {rule} on {model}, the curve gives {picked:.3g}"
            )


def test_the_models_table_gives_each_model_its_parameter_count():
    from cifar_pipeline.models import build_model
    from cifar_pipeline.params import MODEL_NAMES

    row = re.compile(r"^\| `(\w+)`(?: \(default\))? \| [^|]+ \| ([\d,]+) \| [^|]+ \|$", flags=re.MULTILINE)
    rows = [(name, shown) for name, shown in row.findall(README) if name in MODEL_NAMES]
    assert [name for name, _ in rows] == list(MODEL_NAMES)
    for name, shown in rows:
        count = sum(p.numel() for p in build_model(name).parameters())
        assert shown == f"{count:,}", f"README shows {shown} parameters for {name}, the model has {count:,}"


SPREAD = re.compile(r"\*\*([\d.]+)% ± ([\d.]+)\*\*, n = (\d+) \(seeds [^;]+; ([\d., ]+)\)")


def test_each_results_row_gives_the_mean_and_std_of_the_runs_it_lists():
    assert len(SPREAD.findall(README)) >= 2, "the README's results give each default's mean ± std with n"
    spreads = [spread for path in PAGES for spread in SPREAD.finditer(path.read_text())]
    for spread in spreads:
        mean, std, n, runs = spread.groups()
        values = [float(v) for v in runs.split(",")]
        assert len(values) == int(n), spread.group(0)
        assert f"{statistics.mean(values):.2f}" == mean and f"{statistics.stdev(values):.2f}" == std, spread.group(0)


def test_the_readme_is_a_front_door_with_the_results_and_the_first_command_up_front():
    lines = README.splitlines()
    assert len(lines) <= 150
    top = "\n".join(lines[:60])
    assert SPREAD.search(top) and "dvc exp run -S model.name=dilated_net" in top


def test_the_full_run_after_the_first_run_puts_back_every_key_it_set(tmp_path):
    """`dvc exp run -S` leaves its values in params.yaml: the README's full run after the first one sets each of the
    first run's keys back to the shipped value (applied as DVC applies `-S`), and no other key."""
    from dvc.utils.hydra import apply_overrides
    from dvc.utils.serialize import load_yaml  # as DVC reads params: YAML 1.2, where 1e-07 is a number

    first = documented("dvc exp run -S model.name=dilated_net", "README.md")
    back = documented("dvc exp run -S model.name=custom_resnet", "README.md")
    assert set(settings(back)) == set(settings(first))
    params = tmp_path / "params.yaml"
    params.write_text(page("params.yaml"))
    shipped = load_yaml(params)
    apply_overrides(params, [f"{key}={value}" for key, value in settings(first).items()])
    assert load_yaml(params) != shipped
    apply_overrides(params, [f"{key}={value}" for key, value in settings(back).items()])
    assert load_yaml(params) == shipped
    assert parse_params(yaml.safe_load(params.read_text())) == parse_params(yaml.safe_load(page("params.yaml")))


def test_the_docs_show_the_error_a_broken_param_gives():
    """docs/pipeline.md's example of a params error is what check-params prints for it."""
    [shown] = [block for block in blocks(page("docs/pipeline.md"), "") if block.startswith("error: ")]
    key, value = re.search(r"^  ([\w.]+) = (\S+):", shown, flags=re.MULTILINE).groups()
    shipped = yaml.safe_load(page("params.yaml"))
    broken = yaml.safe_load(page("params.yaml"))
    section, name = key.split(".")
    broken[section][name] = yaml.safe_load(value)
    with pytest.raises(ParamsError) as error:
        parse_params(broken, committed=shipped)
    assert shown == f"error: {error.value}\n"


def test_no_page_advises_checking_out_params_yaml():
    """Putting back the whole file would throw away the user's other changes (a data.url, say): errors say how to put
    back the keys in error."""
    for path in PAGES:
        assert not re.search(r"git checkout[^\n`]*params\.yaml", path.read_text()), relative(path)


def test_the_commit_the_docs_advise_holds_what_git_keeps():
    """After a run: dvc.lock, params.yaml and the outputs that DVC does not cache (cache: false)."""
    words = documented("git add ", "docs/experiments.md")
    stages = yaml.safe_load(page("dvc.yaml"))["stages"]
    kept = set()
    for stage in stages.values():
        for out in stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
            if isinstance(out, dict):
                [(path, options)] = out.items()
                if options.get("cache") is False:
                    kept.add(path)
    assert kept == {"reports/per_class.json", "reports/params_check.json"}
    assert {"dvc.lock", "params.yaml"} | kept <= set(words[2:])


def shown_dvc_commands() -> set[tuple[str, ...]]:
    """Every dvc and gto command of the pages' shell blocks: the tool and its first two words that are not options or
    placeholders (`dvc exp show --only-changed` is ("dvc", "exp", "show"))."""
    shown = set()
    for path in PAGES:
        for block in blocks(path.read_text()):
            for line in commands(block):
                if line.startswith(("dvc ", "gto ")):
                    words = [w for w in line.split()[:3] if not w.startswith(("-", "<"))]
                    shown.add(tuple(words))
    return shown


def commands_the_tests_run() -> set[tuple[str, ...]]:
    """The dvc and gto commands the end-to-end tests run, read from their source: `dvc(cwd, "exp", "run", ...)` and
    `_dvc(repo, ...)` run dvc; `run(cwd, "gto", "show", ...)` runs gto. The tool and its first two words that are not
    options, as `shown_dvc_commands`."""
    found = set()
    for name in ("test_e2e.py", "test_report.py"):
        for node in ast.walk(ast.parse((ROOT / "tests" / name).read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
                continue
            words = []
            for arg in node.args[1:]:
                if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
                    break
                words.append(arg.value)
            if node.func.id in ("dvc", "_dvc"):
                tool = "dvc"
            elif node.func.id == "run" and words[:1] in (["dvc"], ["gto"]):
                tool, words = words[0], words[1:]
            else:
                continue
            if words:  # a call with its words in a variable (`*command`) says nothing here
                found.add((tool, *[w for w in words if not w.startswith("-")][:2]))
    return found


def test_every_dvc_and_gto_command_the_pages_show_is_run_by_an_end_to_end_test():
    shown, tested = shown_dvc_commands(), commands_the_tests_run()
    assert ("dvc", "exp", "run") in shown and ("dvc", "exp", "run") in tested
    missing = sorted(" ".join(words) for words in shown if not any(t[: len(words)] == words for t in tested))
    assert not missing, f"the pages show commands that no end-to-end test runs: {missing}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but hyphens dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_and_picture_of_the_pages_resolves():
    for path in PAGES:
        text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.DOTALL | re.MULTILINE)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            assert linked.exists(), f"{relative(path)} links to {target}, which does not exist"
            if anchor:
                headings = re.findall(r"^#+ (.*)$", linked.read_text(), flags=re.MULTILINE)
                assert anchor in {slug(h) for h in headings}, f"{relative(path)} links to {target}: no such heading"


def using_the_model_blocks(language: str) -> list[str]:
    return blocks(page("docs/using-the-model.md"), language)


@pytest.mark.slow
def test_using_the_model_commands_run_as_shown(tiny_model, tmp_path):
    """Every cifar-* command and the Python example of docs/using-the-model.md, in a project with a trained model."""
    import shutil
    import subprocess
    import sys

    from archives import CLASSES
    from PIL import Image
    from tiny_model import colour_images

    model, _, _ = tiny_model
    (tmp_path / "models").mkdir()
    for name in ("model.pt", "best.pt"):
        shutil.copy(model, tmp_path / "models" / name)
    images, labels = colour_images(per_class=1, seed=3)
    (tmp_path / "my_photos/holidays").mkdir(parents=True)
    for image, label in zip(images, labels, strict=True):
        folder = "my_photos" if label % 2 else "my_photos/holidays"
        Image.fromarray(image).resize((96, 96)).save(tmp_path / folder / f"{CLASSES[label]}.jpg", quality=95)

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    lines = [line for block in using_the_model_blocks("bash") for line in block.splitlines()]
    shown = [line.split("  #")[0].rstrip() for line in lines if line.startswith("cifar-")]
    assert any(c.startswith("cifar-predict") for c in shown) and any(c.startswith("cifar-export") for c in shown)
    outputs = {}
    for line in shown:
        result = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{line}\n{result.stderr}"
        outputs[line] = result.stdout
    assert outputs["cifar-predict my_photos/cat.jpg"].startswith("my_photos/cat.jpg: cat ")
    predictions = json.loads((tmp_path / "predictions.json").read_text())["predictions"]
    assert {p["file"]: p["top_k"][0]["class"] for p in predictions} == {
        str(path.relative_to(tmp_path)): path.stem for path in sorted((tmp_path / "my_photos").rglob("*.jpg"))
    }

    [example] = using_the_model_blocks("python")
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "cat\n"


def test_the_layout_names_every_module_of_the_package():
    [layout] = [block for path in PAGES for block in blocks(path.read_text(), "") if "\nsrc/cifar_pipeline/" in block]
    package = ROOT / "src" / "cifar_pipeline"
    modules = {p.name for p in package.rglob("*.py") if p.name != "__init__.py"}
    folders = {f"{p.name}/" for p in package.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    named = set(re.findall(r"\b(\w+\.py|\w+/)", layout))
    assert modules | folders <= named, f"the layout does not name {sorted((modules | folders) - named)}"
    existing = {p.name for p in ROOT.glob("*/**/*.py")}
    assert {name for name in named if name.endswith(".py")} <= existing, "the layout names a file that is gone"


def test_what_the_documented_commands_write_is_ignored_by_git():
    """`dvc plots show` and `cifar-export models/model.onnx` leave files that `git add -A` must not pick up."""
    import subprocess

    written = ["dvc_plots/index.html", "dvc_plots/static/workspace_reports_lr_find.png", "models/model.onnx"]
    result = subprocess.run(["git", "check-ignore", "--no-index", *written], cwd=ROOT, capture_output=True, text=True)
    assert result.stdout.split() == written
