"""lr-find stage: the LR range test -> reports/lr_find.json (curve and suggested max LR) and reports/lr_find.png."""

import _venv  # noqa: F401  (first: reruns the stage with .venv's python where `python` lacks the package)

from cifar_pipeline import paths
from cifar_pipeline.params import load_params
from cifar_pipeline.stage import run_stage
from cifar_pipeline.training import lr_find


def main() -> None:
    params = load_params()
    cfg = params.lr_find
    result = lr_find.run_range_test(params)
    suggested = None
    try:
        suggested = lr_find.suggest_lr(result, cfg)
    finally:
        # Also when no LR could be suggested: the curve shows the user why (DVC keeps a failed stage's files).
        lr_find.save_plot(paths.LR_FIND_PLOT, result, suggested, cfg)
        lr_find.save_results(paths.LR_FIND, result, suggested, cfg.rule, cfg.num_iter, cfg.repeats)
    stop = "diverged" if result["diverged"] else "ran to the end"
    print(f"suggested max LR {suggested:.4g} ({cfg.rule} rule); the test {stop} after {len(result['lr'])} steps")


if __name__ == "__main__":
    run_stage(main, time_file=paths.LR_FIND_TIME)
