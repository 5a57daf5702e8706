"""Keep the README true: every param is documented, and every dvc command it shows is exercised by a test."""

import json
import re
from typing import get_args

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


def test_every_dvc_command_in_the_readme_is_exercised_by_the_end_to_end_tests():
    e2e = (ROOT / "tests" / "test_e2e.py").read_text()
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL))
    lines = [line.split("#")[0] for line in blocks.splitlines()]
    commands = {tuple(line.split()[1:3]) for line in lines if line.startswith("dvc ")}
    assert commands
    for sub in commands:
        words = [w for w in sub if not w.startswith("-") and not w.startswith("<")]
        pattern = r"dvc\(\s*\w+,\s*" + r",\s*".join(f'"{w}"' for w in words)
        assert re.search(pattern, e2e), f"README shows `dvc {' '.join(sub)}` but no end-to-end test runs it"


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
