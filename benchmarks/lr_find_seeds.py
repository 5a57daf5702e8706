"""How far the range test's pick moves with the seed, and how much averaging tests (lr_find.repeats) steadies it.

    python benchmarks/lr_find_seeds.py run dilated_net 45 46 47    # one lr-find stage's test per seed, added to
                                                                    # docs/results/lr_find_<model>_seeds.json
    python benchmarks/lr_find_seeds.py summary dilated_net          # the tables of docs/results/lr_find_seeds.md

`run` goes from the project root after `dvc repro compute-mean-std` (it reads data/ and params.yaml as the lr-find
stage does) and runs the stage's own test (lr_find.run_range_test, one test each) with params.yaml as it is but
`model.name` and `seed`. `summary` reads the stored curves only: each rule's pick on each curve, then the
descent_end pick on the mean of every group of k curves (lr_find.mean_curve, what lr_find.repeats: k computes),
with the spread of the picks.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np

from cifar_pipeline.params import LrFindParams, load_params, parse_params
from cifar_pipeline.stage import PipelineError
from cifar_pipeline.training import lr_find

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"
GROUPS = (1, 2, 3, 5)
# The max LRs each model's 24-epoch runs did well at (docs/results/lr_find_seeds.md lists them); its edges are a
# judgement between those measurements. dilated_net: 84.84-85.10% from 0.0088 to 0.0168 in bf16, about a point less at
# 0.0020 and at 0.0387. custom_resnet: 89.93% at 0.00166 and 90.28% at 0.01, 0.7 points less at 0.000667.
GOOD_BANDS = {"dilated_net": (0.006, 0.025), "custom_resnet": (0.0015, 0.012)}


def curves_path(model: str) -> Path:
    return RESULTS / f"lr_find_{model}_seeds.json"


def run(model: str, seeds: list[int]) -> None:
    path = curves_path(model)
    stored = json.loads(path.read_text()) if path.exists() else {"model": model, "tests": []}
    base = load_params().model_dump(mode="json")
    for seed in seeds:
        params = parse_params({**base, "seed": seed, "model": {**base["model"], "name": model}})
        start = time.perf_counter()
        result = lr_find.run_range_test(params)
        seconds = time.perf_counter() - start
        stored["tests"] = [t for t in stored["tests"] if t["seed"] != seed] + [
            {"seed": seed, "source": "benchmarks/lr_find_seeds.py run", "wall_time_s": round(seconds, 1), **result}
        ]
        stored["tests"].sort(key=lambda t: t["seed"])
        path.write_text(json.dumps(stored))
        print(f"{model} seed {seed}: {len(result['lr'])} steps, {seconds:.0f} s", flush=True)


def pick(result: dict, rule: str) -> float | None:
    try:
        return lr_find.suggest_lr(result, LrFindParams(rule=rule))
    except PipelineError:
        return None


def spread(picks: list[float], band: tuple[float, float]) -> dict:
    """Median, 10th-90th percentile, extremes, the standard deviation of log10 (0.1: picks within a factor 1.26),
    and how many fall outside `band`."""
    logs = np.log10(picks)
    p10, p90 = 10 ** np.percentile(logs, [10, 90])
    return {
        "n": len(picks),
        "median": float(np.median(picks)),
        "p10": float(p10),
        "p90": float(p90),
        "min": min(picks),
        "max": max(picks),
        "std_log10": float(logs.std(ddof=1)) if len(picks) > 1 else None,  # of one pick: none
        "outside": sum(not band[0] <= p <= band[1] for p in picks),
    }


def summarise(model: str) -> dict:
    tests = json.loads(curves_path(model).read_text())["tests"]
    per_seed = {t["seed"]: {rule: pick(t, rule) for rule in lr_find.RULES} for t in tests}
    smooth = LrFindParams().smooth
    groups = {
        k: spread(
            [pick(lr_find.mean_curve(list(g), smooth), "descent_end") for g in itertools.combinations(tests, k)],
            GOOD_BANDS[model],
        )
        for k in GROUPS
        if k <= len(tests)
    }
    return {"model": model, "per_seed": per_seed, "descent_end": groups}


def markdown(summary: dict) -> str:
    rules, band = list(lr_find.RULES), GOOD_BANDS[summary["model"]]
    lines = ["| seed | " + " | ".join(f"`{r}`" for r in rules) + " |", "|---:|" + "---:|" * len(rules)]
    for seed, picks in summary["per_seed"].items():
        lines.append(f"| {seed} | " + " | ".join("-" if picks[r] is None else f"{picks[r]:.3g}" for r in rules) + " |")
    lines += [
        "",
        f"| tests averaged (lr_find.repeats) | groups | median | 10-90% | min - max | std of log10 | "
        f"outside {band[0]:g}-{band[1]:g} |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k, s in summary["descent_end"].items():
        std = "-" if s["std_log10"] is None else f"{s['std_log10']:.3f}"
        lines.append(
            f"| {k} | {s['n']} | {s['median']:.3g} | {s['p10']:.3g} - {s['p90']:.3g} | {s['min']:.3g} - {s['max']:.3g} "
            f"| {std} | {s['outside']} ({s['outside'] / s['n']:.0%}) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("run", "summary"))
    parser.add_argument("model")
    parser.add_argument("seeds", nargs="*", type=int)
    args = parser.parse_args()
    if args.command == "run":
        run(args.model, args.seeds)
    else:
        print(markdown(summarise(args.model)))


if __name__ == "__main__":
    main()
