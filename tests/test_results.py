"""cifar-results on `dvc exp show --json` documents of known content (the shape DVC 3 prints; tests/test_e2e.py runs
it on real experiments)."""

from __future__ import annotations

import copy
import json
import statistics
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT

from cifar_pipeline.params import CIFAR10_CLASSES
from cifar_pipeline.report.results import collect_runs, markdown, summarise

PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def experiment(name, seed, acc=None, tta=None, seconds=None, state="success", classes=CIFAR10_CLASSES, **changes):
    """One experiment as `dvc exp show --json` lists it; `changes` are dotted params, e.g. train__max_lr=0.01."""
    params = copy.deepcopy(PARAMS)
    params["seed"] = seed
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = params
        for key in parents:
            node = node[key]
        node[leaf] = value
    metrics = {}
    if acc is not None:
        per_class = {name: acc for name in classes}
        metrics["reports/per_class.json"] = {
            "data": {"test_acc": acc, "test_acc_flip_tta": tta, "per_class_acc": per_class}
        }
    if seconds is not None:
        metrics["reports/train/metrics.json"] = {"data": {"wall_time_s": seconds, "test": {"acc": acc}}}
    rev = f"{abs(hash(name)):040x}"[:40]
    data = {"rev": rev, "params": {"params.yaml": {"data": params}}, "metrics": metrics}
    error = {"msg": "Experiment run failed", "type": ""} if state == "failed" else None  # what DVC 3 says
    return {
        "executor": {"state": state},
        "name": name,
        "revs": [{"rev": rev, "name": name, "data": data, "error": error}],
    }


def exp_show(*experiments):
    return [
        {"rev": "workspace", "name": None, "data": {"params": {}, "metrics": {}}, "experiments": None},
        {"rev": "a" * 40, "name": "main", "data": {"params": {}, "metrics": {}}, "experiments": list(experiments)},
    ]


SWEEP = exp_show(
    experiment("s1", 1, 90.1, 90.9, 4800.0),
    experiment("s2", 2, 90.5, 91.2, 5000.0),
    experiment("s3", 3, 89.8, 90.6, 5200.0),
    experiment("lr-s1", 1, 91.0, 91.5, 4900.0, train__max_lr=0.004),
    experiment("small", 1, 85.3, 85.9, 2400.0, model__name="dilated_net"),
    # A failed run carries its baseline's metrics files (DVC shows them): it must still not count.
    experiment("broken", 4, 89.9, 90.0, 10.0, state="failed"),
    experiment("waiting", 5, state="queued"),
)


def test_runs_are_grouped_by_every_param_but_the_seed_with_their_spread():
    document = summarise(collect_runs(SWEEP))
    groups = {(g["model"], g["params"]["train.max_lr"]): g for g in document["groups"]}
    assert set(groups) == {("custom_resnet", "auto"), ("custom_resnet", 0.004), ("dilated_net", "auto")}

    default = groups["custom_resnet", "auto"]
    assert default["n"] == 3 and [r["seed"] for r in default["runs"]] == [1, 2, 3]
    acc = default["test_acc"]
    assert acc["n"] == 3 and acc["mean"] == pytest.approx(90.1333, abs=1e-4)  # (90.1 + 90.5 + 89.8) / 3
    assert acc["std"] == pytest.approx(statistics.stdev([90.1, 90.5, 89.8]), abs=1e-4)  # sample std, 0.3512
    assert acc["std"] == pytest.approx(0.3512, abs=1e-4)
    assert (acc["min"], acc["max"]) == (89.8, 90.5)
    assert default["test_acc_flip_tta"]["mean"] == pytest.approx(90.9)
    assert default["train_time_s"]["mean"] == pytest.approx(5000.0)
    assert (default["target"], default["reached_target"]) == (90.0, 2)  # the mission's target for custom_resnet
    assert default["differs"] == {"model.name": "custom_resnet", "train.max_lr": "auto"}

    one = groups["custom_resnet", 0.004]
    assert one["n"] == 1 and one["test_acc"]["std"] is None and one["reached_target"] == 1
    small = groups["dilated_net", "auto"]
    assert (small["target"], small["reached_target"]) == (85.0, 1)

    assert [(r["name"], r["state"], r["seed"]) for r in document["failed"]] == [("broken", "failed", 4)]
    assert [(r["name"], r["state"]) for r in document["unfinished"]] == [("waiting", "queued")]


def test_the_markdown_gives_mean_and_std_with_n_and_names_what_did_not_count():
    text = markdown(summarise(collect_runs(SWEEP)))
    rows = [line for line in text.splitlines() if line.startswith("| model.name=")]
    assert rows[0] == (
        "| model.name=custom_resnet, train.max_lr=auto | 3 | 90.13 ± 0.35% | 89.80 - 90.50% | 90.90 ± 0.30% | "
        "83.3 min | 2/3 ≥ 90% |"
    )
    assert "| model.name=custom_resnet, train.max_lr=0.004 | 1 | 91.00 ± n/a% |" in rows[1]
    assert (
        "- broken (seed 4, model.name=custom_resnet, train.max_lr=auto): Experiment run failed "
        "(its log: dvc queue logs broken)"
    ) in text
    assert "- waiting (seed 5, model.name=custom_resnet, train.max_lr=auto) (queued)" in text


def test_ignored_params_merge_groups_and_a_target_overrides_the_missions():
    runs = collect_runs(
        exp_show(
            experiment("w0", 1, 80.0, 80.0, 60.0, data__num_workers=0),
            experiment("w2", 2, 82.0, 82.0, 60.0, data__num_workers=2),
        )
    )
    assert [g["n"] for g in summarise(runs)["groups"]] == [1, 1]
    merged = summarise(runs, ("seed", "data.num_workers"), target=81.0)["groups"]
    assert len(merged) == 1 and merged[0]["n"] == 2 and merged[0]["reached_target"] == 1
    assert merged[0]["test_acc"]["mean"] == 81.0 and merged[0]["test_acc"]["std"] == pytest.approx(2**0.5, abs=1e-4)


def test_an_experiment_identical_to_another_is_one_run_named_as_its_duplicate():
    """A `dvc exp run` that changed nothing (after `dvc exp apply`, say) makes a second experiment with the same params,
    seed and results: one run, not n = 2 with a spread of zero."""
    document = summarise(
        collect_runs(
            exp_show(
                experiment("s1", 1, 90.1, 90.9, 4800.0),
                experiment("again", 1, 90.1, 90.9, 4800.0),
                experiment("s2", 2, 90.5, 91.2, 5000.0),
                experiment("same-seed-other-run", 1, 90.3, 91.0, 4700.0),  # a rerun that trained again: it counts
            )
        )
    )
    (group,) = document["groups"]
    assert group["n"] == 3 and [r["name"] for r in group["runs"]] == ["s1", "s2", "same-seed-other-run"]
    assert group["duplicates"] == [{"name": "again", "rev": group["duplicates"][0]["rev"], "of": "s1"}]
    assert group["test_acc"]["mean"] == pytest.approx(statistics.mean([90.1, 90.5, 90.3]))
    assert "- again: a duplicate of s1" in markdown(document)


def test_the_missions_target_applies_to_cifar10_only():
    own = ("cats", "dogs", "owls")
    document = summarise(
        collect_runs(
            exp_show(
                experiment("cifar", 1, 86.0, model__name="dilated_net"),
                experiment("own", 1, 100.0, classes=own, model__name="dilated_net", data__url="data/own"),
            )
        )
    )
    cifar, other = document["groups"]
    assert (cifar["target"], cifar["reached_target"]) == (85.0, 1)
    assert (other["target"], other["reached_target"]) == (None, None)
    assert "| - |" in markdown(document).splitlines()[3]
    given = summarise(collect_runs(exp_show(experiment("own", 1, 99.0, classes=own))), target=99.5)
    assert (given["groups"][0]["target"], given["groups"][0]["reached_target"]) == (99.5, 0)


def test_a_finished_run_without_the_reports_metrics_is_listed_as_failed():
    document = summarise(collect_runs(exp_show(experiment("no-report", 1, seconds=100.0))))
    assert document["groups"] == []
    assert document["failed"][0]["error"] == "no test_acc in reports/per_class.json"


def cifar_results(*args, cwd):
    command = [sys.executable, "-c", "from cifar_pipeline.use.cli import results_main; results_main()", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_command_writes_markdown_and_json_from_a_saved_exp_show(tmp_path):
    (tmp_path / "exp.json").write_text(json.dumps(SWEEP))
    result = cifar_results("--from-json", "exp.json", "--out", "out/results", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out/results.md").read_text() == markdown(summarise(collect_runs(SWEEP)))
    assert json.loads((tmp_path / "out/results.json").read_text()) == summarise(collect_runs(SWEEP))
    assert result.stdout.splitlines()[-1] == "wrote out/results.md and out/results.json"


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (lambda d: (d / "x.json").write_text("{oops"), ["--from-json", "x.json"], "--from-json x.json: cannot read"),
        (lambda d: (d / "x.json").write_text("{}"), ["--from-json", "x.json"], "expected the JSON list"),
        (lambda d: None, [], "`dvc exp show --json` failed in"),  # not a DVC repository
    ],
)
def test_bad_input_exits_with_one_clear_line(tmp_path, setup, args, message):
    setup(tmp_path)
    result = cifar_results(*args, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {message}"), result.stderr
    assert not (tmp_path / "reports").exists()
