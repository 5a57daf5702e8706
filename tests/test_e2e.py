"""End to end: the real `dvc` commands on a tiny configuration, in a temporary git repository.

One module-scoped project runs the pipeline once; the tests then exercise what a user does next, in order:
repro again, change params, run experiments, queue them, compare them, push and pull through a local remote.
"""

import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from archives import CLASSES, learnable_archive
from conftest import GLOO_ABORT, ROOT, follow_undo_advice, gloo_aborted
from doc_pages import documented, exp_show_command
from PIL import Image

pytestmark = pytest.mark.e2e

STAGES = ["check-params", "download", "compute-mean-std", "lr-find", "train", "report"]

# Small enough for two CPU cores, large enough for the LR range test to see a descent.
TINY_PARAMS = {
    "data": {"md5": None, "num_workers": 0},
    "model": {"name": "dilated_net", "dropout": 0.0},
    "lr_find": {"start_lr": 1e-5, "end_lr": 10.0, "num_iter": 30},
    "train": {"epochs": 2, "peak_epoch": 1, "batch_size": 50, "device": "cpu"},
    "report": {"misclassified": 8},
}


def deep_update(base: dict, changes: dict) -> dict:
    for key, value in changes.items():
        if isinstance(value, dict):
            deep_update(base.setdefault(key, {}), value)
        else:
            base[key] = value
    return base


def run(cwd: Path, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    env = env or dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def dvc(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(cwd, sys.executable, "-m", "dvc", *args, check=check)


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w-]+)'", output)


def make_project(path: Path, archive: Path, tiny: bool = True) -> Path:
    """A copy of this repository's pipeline in a fresh git + DVC repository, with tiny params (or params.yaml as
    shipped but for data.url), committed."""
    path.mkdir()
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, path / name)
    for folder in ("stages", "src", "vendor"):
        shutil.copytree(ROOT / folder, path / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    if tiny:
        deep_update(params, TINY_PARAMS)
    params["data"]["url"] = str(archive)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(path, "git", "init", "-q")
    run(path, "git", "config", "user.email", "test@example.invalid")
    run(path, "git", "config", "user.name", "test")
    dvc(path, "init", "-q")
    shutil.copy(ROOT / ".dvc/config", path / ".dvc/config")
    run(path, "git", "add", "-A")
    run(path, "git", "commit", "-qm", "tiny pipeline")
    return path


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("e2e")
    archive = base / "tiny-cifar.tar.gz"
    learnable_archive(archive)
    path = make_project(base / "project", archive)
    result = dvc(path, "repro")
    assert stages_run(result.stdout) == STAGES
    run(path, "git", "add", "-A")
    run(path, "git", "commit", "-qm", "first run")
    return path


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="the tests' Python is not a virtual environment")
def test_the_venvs_dvc_runs_the_stages_without_activating_the_venv(tmp_path):
    """`.venv/bin/dvc repro` with the venv not activated: the stage commands' `python` is another one, which lacks
    the project's packages (here: a python without site-packages first on PATH)."""
    archive = tmp_path / "tiny-cifar.tar.gz"
    learnable_archive(archive, per_class_train=2, per_class_test=1)
    path = make_project(tmp_path / "project", archive)
    (path / ".venv").symlink_to(sys.prefix)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -S -E "$@"\n')
    (tmp_path / "bin/python").chmod(0o755)
    env = dict(os.environ, PATH=os.pathsep.join([str(tmp_path / "bin"), "/usr/bin", "/bin"]))
    command = [str(path / ".venv/bin/dvc"), "repro", "compute-mean-std"]
    result = subprocess.run(command, cwd=path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert stages_run(result.stdout) == ["check-params", "download", "compute-mean-std"]
    assert "running the stage with" in result.stderr and "Traceback" not in result.stderr
    assert json.loads((path / "data/stats.json").read_text())["count"] == 20


def metrics(path: Path) -> dict:
    return json.loads((path / "reports/train/metrics.json").read_text())


def test_the_readme_first_run_finishes_in_minutes_on_a_fresh_clone(tmp_path):
    # The README's first command, to the letter, on params.yaml as shipped; the archive (data.url, as docs/own-data.md
    # says to add for a local copy) is learnable_archive's, just large enough for its subset sizes.
    words = documented("dvc exp run -S model.name=dilated_net", "README.md")
    archive = tmp_path / "cifar.tar.gz"
    learnable_archive(archive, per_class_train=200, per_class_test=50)  # 2,000 and 500 images
    path = make_project(tmp_path / "clone", archive, tiny=False)
    started = time.monotonic()
    result = dvc(path, *words[1:], "-S", "data.md5=null")
    assert stages_run(result.stdout) == STAGES
    assert time.monotonic() - started < 600, "the first run is advertised as about a minute"
    summary = (path / "reports/summary.md").read_text()
    assert "(500 test images)" in summary or "of 500)" in summary
    assert json.loads((path / "reports/train/metrics.json").read_text())["step"] == 3


def run_cache_stages(project: Path) -> list[str]:
    """The stage script of every entry in DVC's run cache, in order (one entry per stage and set of inputs)."""
    entries = sorted((project / ".dvc/cache/runs").glob("*/*/*"))
    return sorted(yaml.safe_load(entry.read_text())["cmd"].split("/")[-1].removesuffix(".py") for entry in entries)


def wait_for_queue(project: Path) -> str:
    """`dvc queue start` returns at once, leaving a worker to run the queue: wait for it to empty."""
    deadline = time.monotonic() + 600
    while re.search(r"\b(Queued|Running)\b", status := dvc(project, "queue", "status").stdout):
        assert time.monotonic() < deadline, status
        time.sleep(2)
    return status


def test_a_sweep_restores_what_it_does_not_touch_compares_in_150_columns_and_the_kept_run_travels(tmp_path):
    """docs/experiments.md on a real one-param sweep in a fresh project whose commit holds no dvc.lock (a fresh clone,
    or a queued experiment, which starts from the last commit): every stage whose inputs an earlier run had is
    restored (DVC's run cache, or the workspace's dvc.lock) instead of run again, here and in another clone that
    shares only a DVC remote; the documented `dvc exp show` shows each experiment's accuracies and the swept param
    within 150 columns; the documented commit of the run kept leaves nothing for Git, and after the documented push a
    fresh clone gets every output with `dvc pull` and reruns nothing."""
    archive, storage = tmp_path / "tiny-cifar.tar.gz", tmp_path / "storage"
    learnable_archive(archive)
    a = make_project(tmp_path / "a", archive)  # its commit holds no dvc.lock
    assert stages_run(dvc(a, "repro").stdout) == STAGES
    saved = ["compute_mean_std", "download", "lr_find", "report", "train"]  # check-params runs in a second
    assert run_cache_stages(a) == saved

    dvc(a, "exp", "run", "--queue", "-S", "train.max_lr=0.004,0.03")
    dvc(a, "queue", "start", "-j", "1")
    assert "Failed" not in wait_for_queue(a)
    swept = {name: row for name, row in exp_rows(a).items() if row["params"]["train"]["max_lr"] != "auto"}
    assert sorted(row["params"]["train"]["max_lr"] for row in swept.values()) == [0.004, 0.03], swept
    for name in swept:
        log = dvc(a, "queue", "logs", name).stdout
        assert stages_run(log) == ["check-params", "train", "report"], log
        for stage in ("download", "compute-mean-std", "lr-find"):
            assert re.search(f"Stage '{stage}' (didn't change, skipping|is cached - skipping run)", log), log
    assert run_cache_stages(a) == sorted(saved + ["report", "report", "train", "train"])

    # As a terminal wide enough for the whole table shows it (dvc exp show reads COLUMNS).
    env = dict(os.environ, COLUMNS="1000", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    table = run(a, sys.executable, "-m", "dvc", *exp_show_command()[1:], "--no-pager", env=env).stdout
    lines = [line.rstrip() for line in table.splitlines() if line.strip()]
    assert max(len(line) for line in lines) <= 150, table
    # The accuracies and the max LR used, those of them that differ between rows (tiny runs may tie), then the param.
    header = next(line for line in lines if "Experiment" in line).split()
    assert header[:4] == ["Experiment", "State", "test_acc", "test_acc_flip_tta"], table
    assert set(header[4:-1]) <= {"max_lr", "train.acc", "best.test_acc"} and header[-1] == "train.max_lr", table
    for name, row in swept.items():
        [line] = [line for line in lines if f"[{name}]" in line]
        assert line.split()[-1] == str(row["params"]["train"]["max_lr"]), table

    # Another machine: a clone of the commit without dvc.lock that shares only a DVC remote, run cache included.
    dvc(a, "remote", "add", "--local", "-d", "storage", str(storage))
    dvc(a, *documented("dvc push", "docs/experiments.md")[1:])
    b = tmp_path / "b"
    run(tmp_path, "git", "clone", "-q", str(a), str(b))
    dvc(b, "remote", "add", "--local", "-d", "storage", str(storage))
    result = dvc(b, "repro", "--pull")  # pulls the run cache's entries, then each stage's outputs from them
    # The report runs again: DVC does not pull the Git-kept metric (cache: false) a run cache entry names.
    assert stages_run(result.stdout) == ["check-params", "report"], result.stdout
    for stage in ("download", "compute-mean-std", "lr-find", "train"):
        assert f"Stage '{stage}' is cached - skipping run" in result.stdout
    for output in ("models/model.pt", "reports/per_class.json", "reports/lr_find.json", "data/stats.json"):
        assert (b / output).read_bytes() == (a / output).read_bytes(), output

    # Keep the better run: the documented commit and push; a fresh clone gets it whole.
    kept = max(swept, key=lambda name: exp_rows(a)[name]["metrics"]["test"]["acc"])
    dvc(a, "exp", "apply", kept)
    run(a, *documented("git add ", "docs/experiments.md"))
    run(a, *documented("git commit ", "docs/experiments.md"))
    assert run(a, "git", "status", "--porcelain").stdout == ""
    dvc(a, *documented("dvc push", "docs/experiments.md")[1:])
    fresh = tmp_path / "fresh"
    run(tmp_path, "git", "clone", "-q", str(a), str(fresh))
    dvc(fresh, "remote", "add", "--local", "-d", "storage", str(storage))
    dvc(fresh, "pull")
    assert stages_run(dvc(fresh, "repro").stdout) == []
    assert (
        yaml.safe_load((fresh / "params.yaml").read_text())["train"]["max_lr"]
        == swept[kept]["params"]["train"]["max_lr"]
    )
    assert (fresh / "models/model.pt").read_bytes() == (a / "models/model.pt").read_bytes()


def test_dag_has_the_six_stages_in_order_and_checks_params_first(project):
    edges = set(re.findall(r'"([\w-]+)" -> "([\w-]+)"', dvc(project, "dag", "--dot").stdout))
    for upstream, downstream in itertools.pairwise(STAGES):
        assert (upstream, downstream) in edges
    assert all(("check-params", stage) in edges for stage in STAGES[1:])


def test_first_run_writes_every_output(project):
    for output in [
        "data/cifar10/train.npz",
        "data/cifar10/test.npz",
        "data/stats.json",
        "reports/lr_find.json",
        "reports/lr_find.png",
        "models/model.pt",
        "models/best.pt",
        "reports/train/metrics.json",
        "reports/train_samples.png",
        "reports/augmentations.yaml",
        "reports/summary.md",
        "reports/misclassified.png",
        "reports/metrics_curves.png",
        "reports/confusion_matrix.png",
        "reports/predictions.csv",
        "reports/per_class.json",
        "reports/model_summary.txt",
    ]:
        assert (project / output).is_file(), output
    with np.load(project / "data/cifar10/train.npz") as train:
        assert train["images"].shape == (200, 32, 32, 3)
    assert metrics(project)["step"] == 2


def test_plots_show_renders_every_declared_plot(project):
    dvc(project, "plots", "show", "-o", "plots-page")
    page = (project / "plots-page" / "index.html").read_text()
    declared = yaml.safe_load((project / "dvc.yaml").read_text())["plots"]
    for plot in declared:
        name = plot if isinstance(plot, str) else next(iter(plot))
        assert (Path(name).name if name.endswith(".png") else name) in page, name


def test_second_repro_reruns_nothing(project):
    assert "up to date" in dvc(project, "status").stdout
    result = dvc(project, "repro")
    assert stages_run(result.stdout) == []
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in result.stdout


def test_a_rerun_on_the_same_inputs_or_another_worker_count_reruns_nothing_after_it(project):
    # Outputs that later stages read are functions of their inputs (times go to files no stage depends on), and
    # data.num_workers cannot change the batches: neither may cost a retraining.
    for stage in ("download", "compute-mean-std"):
        result = dvc(project, "repro", "-f", "-s", stage)
        assert stages_run(result.stdout) == [stage]
        assert "up to date" in dvc(project, "status").stdout, f"a rerun of {stage} left work behind"
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["num_workers"] = 1
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        # Only check-params, which validates every key, sees the change; it writes the same file, so nothing follows.
        status = dvc(project, "status").stdout
        assert [line for line in status.splitlines() if line and not line[0].isspace()] == ["check-params:"], status
        assert stages_run(dvc(project, "repro").stdout) == ["check-params"]
    finally:
        restore(project)


def test_model_registry_serves_the_trained_model_by_name_and_version(project, tmp_path):
    from dvc.repo import Repo

    # What DVC Studio's registry reads: the artifact declared in dvc.yaml, with its type, description and labels.
    declared = Repo(str(project)).artifacts.read()["dvc.yaml"]["cifar10-classifier"]
    assert declared.path == "models/model.pt" and declared.type == "model"
    assert (
        "CIFAR-10" in declared.desc
        and "your own image folders" in declared.desc
        and {"cifar10", "pytorch"} <= set(declared.labels)
    )

    registered = run(project, "gto", "register", "cifar10-classifier", "--version", "v1.0.0")
    assert "cifar10-classifier@v1.0.0" in registered.stdout + registered.stderr
    assert json.loads(run(project, "gto", "show", "--json").stdout)["cifar10-classifier"]["version"] == "v1.0.0"
    model = project / "models/model.pt"
    for rev in (["--rev", "v1.0.0"], []):  # a given version, then the latest
        out = tmp_path / f"model{len(rev)}.pt"
        result = dvc(project, "artifacts", "get", str(project), "cifar10-classifier", *rev, "-o", str(out))
        assert f"Downloaded 1 file(s) to '{out}'" in result.stdout + result.stderr
        assert out.read_bytes() == model.read_bytes()

    # The model from the registry classifies an image.
    with np.load(project / "data/cifar10/test.npz") as test:
        Image.fromarray(test["images"][0]).save(tmp_path / "test0.png")
    predicted = run(tmp_path, "cifar-predict", "test0.png", "--model", str(out), "--json").stdout
    top = json.loads(predicted)["predictions"][0]["top_k"]
    assert len(top) == 3 and top[0]["class"] in CLASSES and 0 <= top[0]["probability"] <= 1


def restore(project: Path) -> None:
    """Back to the committed state: git-tracked files (params, dvc.lock, metrics) and DVC-cached outputs."""
    # From HEAD, not the index: the project's .dvc/config has core.autostage, so dvc stages what it changes.
    run(project, "git", "reset", "-q", "--hard")
    dvc(project, "checkout", "-q", "--force")


def set_params(project: Path, changes: dict) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    (project / "params.yaml").write_text(yaml.safe_dump(deep_update(params, changes), sort_keys=False))


def test_changed_train_param_reruns_only_train_and_report(project):
    set_params(project, {"train": {"div_factor": 20.0}})
    try:
        assert stages_run(dvc(project, "repro").stdout) == ["check-params", "train", "report"]
    finally:
        restore(project)


def test_changed_augment_param_reruns_lr_find_train_and_report(project):
    set_params(project, {"augment": {"rotate_limit": 5.0}})
    try:
        assert stages_run(dvc(project, "repro").stdout) == ["check-params", "lr-find", "train", "report"]
    finally:
        restore(project)
    assert "up to date" in dvc(project, "status").stdout


def test_failing_stage_exits_clearly_and_dvc_status_tells_the_truth(project):
    set_params(project, {"data": {"test_subset": 1000}})
    try:
        result = dvc(project, "repro", check=False)
        assert result.returncode != 0
        assert "error: data.test_subset = 1000 is larger than the test split" in result.stderr + result.stdout
        assert "Traceback" not in result.stderr + result.stdout
        assert stages_run(result.stdout) == ["check-params", "train"]
        # The failed stage is not recorded as done: dvc.lock still holds the last good run, and status says so.
        status = dvc(project, "status").stdout
        assert "train:" in status and "modified:           data.test_subset" in status
        assert "report:" not in status.split("train:")[0]
        assert not list((project / "models").glob("*.tmp*"))
    finally:
        restore(project)
    assert "up to date" in dvc(project, "status").stdout


def outputs_and_status(project: Path) -> tuple[dict[str, bytes], str]:
    """Every output file's bytes (DVC-cached and git-tracked alike), and what `dvc status` says."""
    files = {}
    for folder in ("data", "models", "reports"):
        for path in sorted((project / folder).rglob("*")):
            if path.is_file():
                files[str(path.relative_to(project))] = path.read_bytes()
    return files, dvc(project, "status").stdout


@pytest.mark.parametrize(
    "setting, message",
    [
        ("train.max_lrr=0.1", "train.max_lrr: unknown key (did you mean 'train.max_lr'?)"),
        ("train.epochs=0", "train.epochs = 0: must be greater than or equal to 1"),
        ("model.name=vgg", "model.name = 'vgg': must be 'custom_resnet' or 'dilated_net'"),
    ],
)
def test_a_param_mistake_costs_no_output(project, setting, message):
    # check-params runs first and fails: DVC removes no other stage's outputs. The message says how to put back the
    # key alone (tests/test_params.py: other changes are kept); following it brings back a clean `dvc status`.
    before = outputs_and_status(project)
    params_file = project / "params.yaml"
    key, value = setting.split("=")
    if key == "train.max_lrr":
        # DVC's -S refuses a key that is not in params.yaml (it wants +train.max_lrr): a typo comes by an edit.
        assert "Could not override 'train.max_lrr'" in dvc(project, "exp", "run", "-S", setting, check=False).stderr
        params_file.write_text(params_file.read_text().replace("  max_lr:", f"  max_lrr: {value}\n  max_lr:", 1))
        commands = [["repro"]]
    else:
        commands = [["exp", "run", "-S", setting], ["repro"]]  # exp run leaves the value; repro meets it again
    for command in commands:
        result = dvc(project, *command, check=False)
        output = result.stdout + result.stderr
        assert result.returncode != 0 and message in output and "Put back just this key" in output, output
        assert stages_run(result.stdout) == ["check-params"] and "Traceback" not in output
        assert outputs_and_status(project)[0] == before[0]
    assert follow_undo_advice(params_file, output) == [key]
    assert outputs_and_status(project) == before
    restore(project)


def exp_rows(project: Path) -> dict[str, dict]:
    """`dvc exp show --json` flattened to {experiment name: {"params": ..., "metrics": ...}}."""
    rows = {}
    for commit in json.loads(dvc(project, "exp", "show", "--json").stdout):
        for exp in [commit] + [e for branch in commit.get("experiments") or [] for e in branch["revs"]]:
            data = exp.get("data") or {}
            params = data.get("params", {}).get("params.yaml", {}).get("data", {})
            metric = data.get("metrics", {}).get("reports/train/metrics.json", {}).get("data", {})
            rows[exp.get("name") or exp["rev"]] = {"params": params, "metrics": metric}
    return rows


def test_exp_run_with_a_number_skips_lr_find_and_trains_with_it(project):
    before = metrics(project)
    result = dvc(project, "exp", "run", "-n", "lr-002", "-S", "train.max_lr=0.02")
    assert stages_run(result.stdout) == ["check-params", "train", "report"]
    # DVC warns of each output without a recorded hash, which only a never-run pipeline has (README.md).
    assert "No file hash info found" not in result.stdout + result.stderr
    after = metrics(project)
    assert after["max_lr"] == pytest.approx(0.02)
    assert after["max_lr"] != pytest.approx(before["max_lr"])
    assert after["test"]["loss"] != before["test"]["loss"]
    row = exp_rows(project)["lr-002"]
    assert row["params"]["train"]["max_lr"] == 0.02
    assert row["metrics"]["max_lr"] == pytest.approx(0.02)
    restore(project)


def test_an_exp_run_killed_in_train_resumes_on_the_next_exp_run(project):
    """Before it runs, `dvc exp run` checks out the outputs dvc.lock records: an output of a stage that never
    finished (no entry, as on a first run) is deleted, models/best.pt among them. The resumed run must continue after
    its saved epoch and still end with its own best model."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    del lock["stages"]["train"], lock["stages"]["report"]  # as if train had never finished here
    (project / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    args = ("exp", "run", "-n", "killed", "-S", "train.epochs=4")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    process = subprocess.Popen(
        [sys.executable, "-m", "dvc", *args],
        cwd=project,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill takes dvc and the stage's processes at once
    )
    state = project / ".resume/train.pt"
    deadline = time.monotonic() + 600
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    saved = torch.load(state, weights_only=True)["epoch"]
    assert saved in (1, 2, 3)

    result = dvc(project, *args)
    assert f"resuming after epoch {saved} of 4" in result.stdout, result.stdout
    assert f"epoch {saved}/4" not in result.stdout and "epoch 4/4" in result.stdout
    after = metrics(project)
    best = torch.load(project / "models/best.pt", weights_only=True)
    assert after["step"] == 4
    assert (best["epoch"], best["test_acc"]) == (after["best"]["epoch"], after["best"]["test_acc"])
    assert not state.exists()
    assert exp_rows(project)["killed"]["metrics"]["step"] == 4
    restore(project)


def report_accuracies(project: Path) -> dict[str, tuple[str, int, float | None]]:
    """DVC's own view of every experiment: {name: (state, seed, the report's test_acc)}. A failed one carries its
    baseline's metrics files."""
    found = {}
    for commit in json.loads(dvc(project, "exp", "show", "--json").stdout):
        for branch in commit.get("experiments") or []:
            for exp in branch["revs"]:
                data = exp.get("data") or {}
                seed = data["params"]["params.yaml"]["data"]["seed"]
                acc = data.get("metrics", {}).get("reports/per_class.json", {}).get("data", {}).get("test_acc")
                found[exp["name"]] = ((branch.get("executor") or {}).get("state", "success"), seed, acc)
    return found


def test_a_queued_seed_sweep_is_summarised_compared_applied_and_branched(project, tmp_path):
    # docs/experiments.md's seed sweep (hydra's range: 1, 2), and a run that fails at check-params. One queue for all
    # the experiment commands: each queued run costs the suite seconds.
    dvc(project, "exp", "run", "--queue", "-S", "seed=range(1,3)", "-S", "train.max_lr=0.015")
    dvc(project, "exp", "run", "--queue", "-n", "broken", "-S", "seed=9", "-S", "model.name=vgg")
    dvc(project, "queue", "start", "-j", "1")
    status = wait_for_queue(project)
    assert "Failed" in status, status

    seen = report_accuracies(project)
    sweep = sorted(acc for state, seed, acc in seen.values() if seed in (1, 2) and state == "success")
    assert len(sweep) == 2 and None not in sweep, seen
    out = tmp_path / "results"
    result = run(project, "cifar-results", "--target", str(sweep[1]), "--out", str(out))
    document = json.loads((tmp_path / "results.json").read_text())
    assert result.stdout.startswith((tmp_path / "results.md").read_text())

    group = next(g for g in document["groups"] if g["params"]["train.max_lr"] == 0.015)
    assert group["n"] == 2 and sorted(r["seed"] for r in group["runs"]) == [1, 2]
    acc = group["test_acc"]
    assert acc["mean"] == pytest.approx(statistics.mean(sweep), abs=1e-4)
    assert acc["std"] == pytest.approx(statistics.stdev(sweep), abs=1e-4)
    assert (acc["min"], acc["max"]) == (sweep[0], sweep[-1])
    assert group["reached_target"] == 1 + (sweep[0] == sweep[1])  # the target is the better run's accuracy
    assert group["train_time_s"]["n"] == 2 and group["test_acc_flip_tta"]["n"] == 2
    assert "seed" not in group["params"] and group["params"]["train.max_lr"] == 0.015
    # Every other finished experiment of this module is in a group of its own params (max LR 0.02, ...).
    assert sum(g["n"] for g in document["groups"]) == sum(state == "success" for state, _, _ in seen.values())

    broken = [run for run in document["failed"] if run["seed"] == 9]
    assert len(broken) == 1 and broken[0]["state"] == "failed", document["failed"]
    assert "- broken (seed 9, model.name=vgg" in result.stdout and "dvc queue logs broken" in result.stdout

    # The sweep's runs compared, one applied to the workspace, the other kept as a branch.
    rows = exp_rows(project)
    swept = {name: row for name, row in rows.items() if row["params"].get("seed") in (1, 2)}
    assert len(swept) == 2 and {round(row["metrics"]["max_lr"], 6) for row in swept.values()} == {0.015}, rows
    names = sorted(swept, key=lambda n: swept[n]["params"]["seed"])
    diff = dvc(project, "plots", "diff", names[0], names[1], "-o", "plots-diff").stdout
    assert (project / "plots-diff" / "index.html").is_file(), diff

    dvc(project, "exp", "apply", names[1])
    applied = yaml.safe_load((project / "params.yaml").read_text())
    assert (applied["seed"], applied["train"]["max_lr"]) == (2, 0.015)
    assert metrics(project) == swept[names[1]]["metrics"]
    changed = dvc(project, "params", "diff").stdout
    assert "seed" in changed and "max_lr" in changed, changed
    assert "reports/train/metrics.json" in dvc(project, "metrics", "diff").stdout

    dvc(project, "exp", "branch", names[0], "seed-1")
    shown = run(project, "git", "show", "seed-1:params.yaml").stdout
    assert yaml.safe_load(shown)["seed"] == 1
    restore(project)


def test_push_and_pull_through_a_local_remote(project, tmp_path):
    dvc(project, "remote", "add", "-d", "local", str(tmp_path / "remote"))
    dvc(project, "push")
    model = (project / "models/model.pt").read_bytes()
    shutil.rmtree(project / ".dvc" / "cache")
    for output in ("models", "data/cifar10"):
        shutil.rmtree(project / output)
    dvc(project, "pull")
    assert (project / "models/model.pt").read_bytes() == model
    assert (project / "data/cifar10/train.npz").is_file()
    assert "up to date" in dvc(project, "status").stdout


def test_an_experiment_from_another_clone_arrives_with_its_metrics_and_model(project, tmp_path):
    """Two machines: this project (A) runs an experiment and pushes it; a fresh clone (B) pulls it, sees its metrics in
    `dvc exp show` and gets its model. A bare Git repository and a local folder stand in for the remotes."""
    origin, storage = tmp_path / "origin.git", tmp_path / "dvc-storage"
    run(tmp_path, "git", "init", "-q", "--bare", "--initial-branch=main", str(origin))
    run(project, "git", "remote", "add", "shared", str(origin))
    # --local: the remote stays out of the module project's commits; a real project commits it (docs/experiments.md).
    dvc(project, "remote", "add", "--local", "-d", "storage", str(storage))
    try:
        run(project, "git", "push", "-q", "shared", "HEAD:refs/heads/main")
        dvc(project, "exp", "run", "-n", "from-a", "-S", "train.div_factor=25")
        a_metrics, a_model = metrics(project), (project / "models/model.pt").read_bytes()
        dvc(project, "exp", "push", "shared", "from-a")

        b = tmp_path / "b"
        run(tmp_path, "git", "clone", "-q", str(origin), str(b))
        dvc(b, "remote", "add", "--local", "-d", "storage", str(storage))
        assert "from-a" not in dvc(b, "exp", "show").stdout
        dvc(b, "exp", "pull", "origin", "from-a")
        rows = exp_rows(b)
        assert rows["from-a"]["params"]["train"]["div_factor"] == 25
        assert rows["from-a"]["metrics"]["test"] == a_metrics["test"]
        dvc(b, "exp", "apply", "from-a")
        dvc(b, "pull")
        assert (b / "models/model.pt").read_bytes() == a_model
    finally:
        run(project, "git", "remote", "remove", "shared")
        dvc(project, "remote", "remove", "--local", "storage")
        restore(project)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_run_on_two_processes_or_on_two_machines_trains_the_same_run(project, tmp_path):
    """docs/scaling.md, "More than one GPU, or more than one machine", on the CPU (gloo): `train.devices: 2` under
    `dvc exp run`, then the two-machine recipe, with a clone in another folder as the second machine and one process on
    each. Both are one run on two processes, with the same shares of the same batches: the same metrics to the last
    digit."""
    try:
        command = ("exp", "run", "-n", "two-processes", "-S", "train.devices=2")
        result = dvc(project, *command, check=False)
        if gloo_aborted(result):  # the rerun resumes after the last saved epoch
            warnings.warn(f"a training process aborted, run again:\n{result.stdout}\n{result.stderr}", stacklevel=1)
            result = dvc(project, *command)
        assert result.returncode == 0, result.stderr
        assert "starting 2 training processes with torchrun" in result.stdout
        assert exp_rows(project)["two-processes"]["params"]["train"]["devices"] == 2
        two_processes = metrics(project)
        restore(project)

        # Node 0: every stage before train (up to date here), then node 1: a clone at the same commit, given the train
        # stage's inputs (docs/scaling.md's rsync).
        assert stages_run(dvc(project, "repro", "lr-find").stdout) == []
        node1 = tmp_path / "node1"
        run(tmp_path, "git", "clone", "-q", str(project), str(node1))
        for path in ("params.yaml", "data", "reports/lr_find.json"):
            if (project / path).is_dir():
                shutil.copytree(project / path, node1 / path, dirs_exist_ok=True)
            else:
                shutil.copy(project / path, node1 / path)
        # One thread a process, as torchrun sets it for several processes on a machine (the run above): another
        # thread count adds the convolutions' sums in another order, which would end the run a little elsewhere.
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        env["OMP_NUM_THREADS"] = "1"

        def start(rank: int, folder: Path, port: str) -> subprocess.Popen:
            return subprocess.Popen(
                [
                    "torchrun",
                    "--nnodes",
                    "2",
                    "--nproc-per-node",
                    "1",
                    "--node-rank",
                    str(rank),
                    "--master-addr",
                    "127.0.0.1",
                    "--master-port",
                    port,
                    "stages/train.py",
                ],
                cwd=folder,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )

        for attempt in (1, 2):
            port = str(free_port())
            nodes = [start(rank, folder, port) for rank, folder in enumerate((project, node1))]
            outputs = [node.communicate(timeout=600)[0] for node in nodes]
            if attempt == 1 and any(GLOO_ABORT in output for output in outputs):  # the rerun resumes
                warnings.warn("a training process aborted, run again:\n" + "\n".join(outputs), stacklevel=1)
                continue
            break
        assert [node.returncode for node in nodes] == [0, 0], outputs
        assert "on 2 processes (cpu, gloo)" in outputs[0] and "epoch 2/2" not in outputs[1]
        # Process 0, on node 0, writes everything: node 1's clone has no new file and no changed one.
        assert run(node1, "git", "status", "--porcelain", "--ignored=no").stdout == ""
        assert not (node1 / "models/model.pt").exists() and not (node1 / "reports/train_samples.png").exists()
        timing = ("epoch_time_s", "images_per_s", "wall_time_s")
        assert {k: v for k, v in metrics(project).items() if k not in timing} == {
            k: v for k, v in two_processes.items() if k not in timing
        }

        dvc(project, "commit", "-f", "train")
        assert stages_run(dvc(project, "repro").stdout) == ["report"]
        assert "up to date" in dvc(project, "status").stdout
    finally:
        restore(project)


def test_the_spot_recipe_resumes_on_the_next_machine_and_pushes_the_experiment(project, tmp_path):
    """cloud/spot_run.sh as cloud/sky.yaml runs it, on two machines that share only the remotes and RESUME_DIR (the
    bucket): A is taken back (killed) in the middle of the train stage; B, a fresh clone, restores the stages before
    train from the DVC remote's run cache, resumes after A's last saved epoch and pushes the experiment."""
    origin, storage, bucket = tmp_path / "origin.git", tmp_path / "dvc-storage", tmp_path / "bucket"
    run(tmp_path, "git", "init", "-q", "--bare", "--initial-branch=main", str(origin))
    run(project, "git", "push", "-q", str(origin), "HEAD:refs/heads/main")

    def machine(name: str) -> Path:
        clone = tmp_path / name
        run(tmp_path, "git", "clone", "-q", str(origin), str(clone))
        dvc(
            clone, "remote", "add", "--local", "-d", "storage", str(storage)
        )  # a real project commits it (docs/experiments.md)
        return clone

    a = machine("a")
    # The params to run, committed on the branch the recipe clones. A new seed: dvc.lock's entries for the stages
    # before train no longer match, so machine B can only restore them from the DVC remote's run cache.
    set_params(a, {"seed": 7, "train": {"epochs": 4}})
    run(a, "git", "commit", "-qam", "seed 7, 4 epochs")
    run(a, "git", "push", "-q", "origin", "HEAD:main")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env["RESUME_DIR"] = str(bucket)
    process = subprocess.Popen(
        [str(ROOT / "cloud/spot_run.sh"), "spot"],
        cwd=a,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    state = bucket / "spot/train.pt"
    deadline = time.monotonic() + 600
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the machine is gone
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    saved = torch.load(state, weights_only=True)["epoch"]

    b = machine("b")
    result = run(b, str(ROOT / "cloud/spot_run.sh"), "spot", env=env)
    assert "Running stage 'lr-find'" not in result.stdout  # restored from the run cache: the same pick as on A
    assert "Stage 'lr-find' is cached - skipping run" in result.stdout, result.stdout
    assert f"resuming after epoch {saved} of 4" in result.stdout, result.stdout
    assert not (bucket / "spot").exists()

    c = machine("c")  # anyone, later
    dvc(c, "exp", "pull", "origin", "spot")
    row = exp_rows(c)["spot"]
    assert row["params"]["train"]["epochs"] == 4 and row["metrics"]["step"] == 4
    assert row["metrics"]["test"] == metrics(b)["test"]
