"""Keep the README true: every param is documented, its tables match what the code computes, its commands run
(the dvc and gto ones in tests/test_e2e.py, which checks that each ran), and its layout names every module."""

import json
import os
import re
from pathlib import Path
from typing import get_args

import pytest
from conftest import ROOT

from cifar_pipeline import lr_finder
from cifar_pipeline.params import LrFindParams, Params

README = (ROOT / "README.md").read_text()


def schema_keys(model=Params, prefix=""):
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            yield from schema_keys(annotation, f"{prefix}{name}.")
        else:
            yield prefix + name


def test_every_param_is_documented_in_the_readme_table():
    table = README.split("## Parameters", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([\w.]+)` \|", table, flags=re.MULTILINE))
    assert documented == set(schema_keys())


def test_the_rule_table_names_every_rule_and_its_picks_on_the_stored_curves():
    section = README.split("### The LR range test", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)`( \(default\))? \|.*\| ([\d.e-]+) \| ([\d.e-]+) \|$", section, flags=re.MULTILINE)
    rule_field = LrFindParams.model_fields["rule"]
    assert [r[0] for r in rows] and {r[0] for r in rows} == set(get_args(rule_field.annotation))
    assert [r[0] for r in rows if r[1]] == [rule_field.default]
    curves = {}
    for model in ("custom_resnet", "dilated_net"):
        saved = json.loads((ROOT / f"docs/results/lr_find_{model}.json").read_text())
        curves[model] = {key: [point[key] for point in saved["curve"]] for key in ("lr", "loss", "raw_loss")}
        curves[model]["diverged"] = saved["diverged"]
    for rule, _, custom_resnet, dilated_net in rows:
        for model, shown in (("custom_resnet", custom_resnet), ("dilated_net", dilated_net)):
            picked = lr_finder.suggest_lr(curves[model], LrFindParams(rule=rule))
            assert f"{picked:.3g}" == shown, f"README shows {shown} for {rule} on {model}, the curve gives {picked:.3g}"


def test_the_models_table_gives_each_model_its_parameter_count():
    from cifar_pipeline.choices import MODEL_NAMES
    from cifar_pipeline.models import build_model

    table = README.split("Two models ship with it:", 1)[1].split("\n\n", 2)[1]
    rows = re.findall(r"^\| `(\w+)`(?: \(default\))? \| [^|]+ \| ([\d,]+) \| [^|]+ \|$", table, flags=re.MULTILINE)
    assert [name for name, _ in rows] == list(MODEL_NAMES), table
    for name, shown in rows:
        count = sum(p.numel() for p in build_model(name).parameters())
        assert shown == f"{count:,}", f"README shows {shown} parameters for {name}, the model has {count:,}"


def test_each_results_row_gives_the_mean_and_std_of_the_runs_it_lists():
    import statistics

    section = README.split("## Results", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    spreads = [re.search(r"\*\*([\d.]+)% ± ([\d.]+)\*\*, n = (\d+) \(seeds [^;]+; ([\d., ]+)\)", row) for row in rows]
    assert sum(1 for s in spreads if s) >= 2, "the default rows give mean ± std with n"
    for spread in filter(None, spreads):
        mean, std, n, runs = spread.groups()
        values = [float(v) for v in runs.split(",")]
        assert len(values) == int(n), spread.group(0)
        assert f"{statistics.mean(values):.2f}" == mean and f"{statistics.stdev(values):.2f}" == std, spread.group(0)


def using_the_model_blocks(language: str) -> list[str]:
    section = README.split("## Using the model", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.DOTALL)


@pytest.mark.slow
def test_using_the_model_commands_run_as_shown(tiny_model, tmp_path):
    """Every cifar-* command and the Python example of "Using the model", in a project with a trained model."""
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
    commands = [line.split("  #")[0].rstrip() for line in lines if line.startswith("cifar-")]
    assert any(c.startswith("cifar-predict") for c in commands) and any(c.startswith("cifar-export") for c in commands)
    outputs = {}
    for command in commands:
        result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{command}\n{result.stderr}"
        outputs[command] = result.stdout
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
    section = README.split("## Layout", 1)[1].split("\n## ", 1)[0]
    package = ROOT / "src" / "cifar_pipeline"
    modules = {p.name for p in package.glob("*.py") if p.name != "__init__.py"} | {"models/"}
    named = set(re.findall(r"\b(\w+\.py|models/)", section))
    assert modules <= named, f"README's Layout does not name {sorted(modules - named)}"
    existing = {p.name for p in ROOT.glob("*/**/*.py")}
    assert {name for name in named if name.endswith(".py")} <= existing, "README's Layout names a file that is gone"


def test_what_the_readme_commands_write_is_ignored_by_git():
    """`dvc plots show` and `cifar-export models/model.onnx` leave files that `git add -A` must not pick up."""
    import subprocess

    written = ["dvc_plots/index.html", "dvc_plots/static/workspace_reports_lr_find.png", "models/model.onnx"]
    result = subprocess.run(["git", "check-ignore", "--no-index", *written], cwd=ROOT, capture_output=True, text=True)
    assert result.stdout.split() == written
