"""Results with their spread (`cifar-results`): the experiments that `dvc exp show --json` lists, grouped by every
param but the seed, with n, mean, standard deviation, min and max of each group's test accuracy.

A run is one experiment (`dvc exp run`, or one of a queued sweep). The workspace row is left out (it repeats the
last applied experiment or holds uncommitted results), and so are the commits' own rows: a commit made with
`dvc exp branch` or after `dvc exp apply` would count its experiment twice. Failed experiments are listed with their
params, never dropped silently; queued and running ones are counted as not finished. Experiments with the same
params (seed included) and the same metrics are one run (a `dvc exp run` that changed nothing, say, after `dvc exp
apply`): counted once, the others listed as its duplicates.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cifar_pipeline import paths
from cifar_pipeline.params import CIFAR10_CLASSES
from cifar_pipeline.stage import PipelineError

# The CIFAR-10 accuracy each model is meant to reach in 24 epochs (the project's targets, README). It applies to runs
# on CIFAR-10 only (known by their classes); --target sets one for every group.
TARGETS = {"custom_resnet": 90.0, "dilated_net": 85.0}
DEFAULT_IGNORED = ("seed",)
REPORT_METRICS = str(paths.REPORTS / "per_class.json")
TRAIN_METRICS = str(paths.TRAIN_METRICS)


@dataclass
class Run:
    name: str
    rev: str
    state: str  # success | failed | queued | running (DVC's executor states)
    params: dict[str, Any]  # params.yaml flattened to dotted keys
    test_acc: float | None = None  # the report's fp32 evaluation of the final model
    test_acc_flip_tta: float | None = None
    train_time_s: float | None = None
    classes: tuple[str, ...] = ()  # the report's per-class accuracies name them
    error: str = ""

    def identity(self) -> str:
        """What makes two experiments one run: every param, the seed included, and every result."""
        results = (self.test_acc, self.test_acc_flip_tta, self.train_time_s)
        return json.dumps([sorted(self.params.items()), results], default=str)


@dataclass
class Group:
    params: dict[str, Any]  # every param but the ignored ones: what its runs share
    runs: list[Run] = field(default_factory=list)
    duplicates: list[tuple[Run, Run]] = field(default_factory=list)  # (duplicate, the run it repeats)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _file_data(files: dict[str, Any], name: str) -> dict[str, Any]:
    return (files.get(name) or {}).get("data") or {}


def _run(exp: dict[str, Any], state: str) -> Run:
    data = exp.get("data") or {}
    params = flatten(_file_data(data.get("params") or {}, "params.yaml"))
    report = _file_data(data.get("metrics") or {}, REPORT_METRICS)
    train = _file_data(data.get("metrics") or {}, TRAIN_METRICS)
    error = (exp.get("error") or {}).get("msg", "")
    return Run(
        name=exp.get("name") or exp["rev"][:7],
        rev=exp["rev"],
        state=state,
        params=params,
        test_acc=report.get("test_acc"),
        test_acc_flip_tta=report.get("test_acc_flip_tta"),
        train_time_s=train.get("wall_time_s"),
        classes=tuple(report.get("per_class_acc") or ()),
        error=error,
    )


def collect_runs(exp_show: list[dict[str, Any]]) -> list[Run]:
    """Every experiment in `dvc exp show --json`'s output, under every commit it lists."""
    if not isinstance(exp_show, list):
        raise PipelineError("expected the JSON list that `dvc exp show --json` prints")
    runs = []
    for commit in exp_show:
        for exp_range in commit.get("experiments") or []:
            state = (exp_range.get("executor") or {}).get("state") or "success"
            runs.extend(_run(exp, state) for exp in exp_range.get("revs") or [])
    return runs


def finished(run: Run) -> bool:
    return run.state == "success" and run.test_acc is not None


def group_runs(runs: list[Run], ignored: tuple[str, ...] = DEFAULT_IGNORED) -> list[Group]:
    """The finished runs grouped by every param but `ignored`, in the order their first run appears; a run identical
    to one before it (Run.identity) is listed as its duplicate, not counted again."""
    groups: dict[str, Group] = {}
    seen: dict[str, Run] = {}
    for run in filter(finished, runs):
        shared = {k: v for k, v in sorted(run.params.items()) if k not in ignored}
        group = groups.setdefault(json.dumps(shared, sort_keys=True, default=str), Group(shared))
        if (original := seen.get(run.identity())) is not None:
            group.duplicates.append((run, original))
        else:
            seen[run.identity()] = run
            group.runs.append(run)
    return list(groups.values())


def spread(values: list[float | None]) -> dict[str, float | int | None] | None:
    """n, mean, sample standard deviation (None for one value), min and max of the values that are present."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return None
    n = len(present)
    mean = sum(present) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in present) / (n - 1)) if n > 1 else None
    rounded = None if std is None else round(std, 4)
    return {"n": n, "mean": round(mean, 4), "std": rounded, "min": min(present), "max": max(present)}


def target_for(group: Group, target: float | None) -> float | None:
    """`target` when given, else the model's CIFAR-10 target where every run of the group is on CIFAR-10."""
    if target is not None:
        return target
    if not all(set(run.classes) == set(CIFAR10_CLASSES) for run in group.runs):
        return None
    return TARGETS.get(group.params.get("model.name"))


def summarise(runs: list[Run], ignored: tuple[str, ...] = DEFAULT_IGNORED, target: float | None = None) -> dict:
    """The results document: one entry per group, then the runs that failed or have not finished."""
    groups = group_runs(runs, ignored)
    # Each group and each unfinished run is named by the params that tell it from the others.
    shown = [g.params for g in groups] + [r.params for r in runs if not finished(r)]
    keys = {k for params in shown for k in params if k not in ignored}
    varying = sorted(k for k in keys if len({json.dumps(p.get(k), default=str) for p in shown}) > 1)
    document: dict[str, Any] = {"ignored_params": list(ignored), "groups": [], "failed": [], "unfinished": []}
    for group in groups:
        goal = target_for(group, target)
        accs = [r.test_acc for r in group.runs]
        document["groups"].append(
            {
                "differs": {k: group.params.get(k) for k in varying},
                "model": group.params.get("model.name"),
                "n": len(group.runs),
                "runs": [{"name": r.name, "rev": r.rev, "seed": r.params.get("seed")} for r in group.runs],
                "duplicates": [{"name": d.name, "rev": d.rev, "of": o.name} for d, o in group.duplicates],
                "test_acc": spread(accs),
                "test_acc_flip_tta": spread([r.test_acc_flip_tta for r in group.runs]),
                "train_time_s": spread([r.train_time_s for r in group.runs]),
                "target": goal,
                "reached_target": None if goal is None else sum(a >= goal for a in accs),
                "params": group.params,
            }
        )
    for run in runs:
        if finished(run):
            continue
        differs = {k: run.params.get(k) for k in varying}
        entry = {
            "name": run.name,
            "rev": run.rev,
            "state": run.state,
            "seed": run.params.get("seed"),
            "differs": differs,
        }
        if run.state == "success":  # it ran, but the report's metrics are missing
            entry["error"] = run.error or f"no test_acc in {REPORT_METRICS}"
            document["failed"].append(entry)
        elif run.state == "failed":
            entry["error"] = run.error
            document["failed"].append(entry)
        else:
            document["unfinished"].append(entry)
    return document


def _mean_std(stats: dict | None, unit: str = "%", digits: int = 2) -> str:
    if stats is None:
        return "-"
    std = "n/a" if stats["std"] is None else f"{stats['std']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {std}{unit}"


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _params_text(differs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in differs.items()) or "(all runs share their params)"


def markdown(document: dict) -> str:
    lines = [
        "| params (those that differ) | n | test acc mean ± std | min - max | flip TTA mean ± std | train time | "
        "reached target |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for g in document["groups"]:
        acc, seconds = g["test_acc"], g["train_time_s"]
        time_text = "-" if seconds is None else _duration(seconds["mean"])
        reached = "-" if g["target"] is None else f"{g['reached_target']}/{g['n']} ≥ {g['target']:g}%"
        lines.append(
            f"| {_params_text({'model.name': g['model'], **g['differs']})} | {g['n']} | {_mean_std(acc)} | "
            f"{acc['min']:.2f} - {acc['max']:.2f}% | {_mean_std(g['test_acc_flip_tta'])} | {time_text} | {reached} |"
        )
    if not document["groups"]:
        lines.append("| (no finished experiment) | 0 | - | - | - | - | - |")
    lines.append("")
    ignored = ", ".join(document["ignored_params"])
    lines.append(
        f"Runs are grouped by every param but {ignored}; std is the sample standard deviation (n/a for one run); "
        "test accuracy is the report's (fp32, final model)."
    )
    duplicates = [d for g in document["groups"] for d in g["duplicates"]]
    if duplicates:
        lines += ["", "Counted once (the same params, seed included, and the same results as an earlier run):", ""]
        lines += [f"- {d['name']}: a duplicate of {d['of']}" for d in duplicates]
    for title, key in (("Failed", "failed"), ("Not finished", "unfinished")):
        if document[key]:
            lines += ["", f"{title}:", ""]
            for run in document[key]:
                why = f": {run['error']}" if run.get("error") else f" ({run['state']})"
                if run["state"] == "failed":
                    why += f" (its log: dvc queue logs {run['name']})"
                lines.append(f"- {run['name']} (seed {run['seed']}, {_params_text(run['differs'])}){why}")
    return "\n".join(lines) + "\n"


def exp_show_json(all_commits: bool = False, cwd: str | Path = ".") -> list[dict[str, Any]]:
    """`dvc exp show --json`, run with this Python's DVC."""
    command = [sys.executable, "-m", "dvc", "exp", "show", "--json", *(["--all-commits"] if all_commits else [])]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise PipelineError(f"`dvc exp show --json` failed in {Path(cwd).resolve()}: {last}")
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError as exc:
        raise PipelineError(f"`dvc exp show --json` printed something that is not JSON ({exc})") from exc
