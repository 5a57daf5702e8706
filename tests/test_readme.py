"""Keep the README true: every param is documented, and every dvc command it shows is exercised by a test."""

import re

from conftest import ROOT

from cifar_pipeline.params import Params

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
